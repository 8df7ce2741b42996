//! b. Time to program N peers: N fake leases in etcd, then flanneld started
//! on a node and timed until the node has N routes on `flannel.1`; the
//! anchor applies the same 3N entries with `bridge -batch` and `ip -batch`
//! in a fresh namespace with an identical device.
//! d. flanneld's and etcd's peak RSS (VmHWM) after the run.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netns_tests::{Cluster, ClusterSpec, EtcdCluster, IP_TIMEOUT, Node, run};

use crate::util::{
    fake_mac, hand_vxlan_device, lease_key, lease_value, ms, peer_commands, route_count, vm_hwm_kb,
};

/// The network config of this section: room for 65,536 /24 leases.
const CONFIG: &str = r#"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;
/// Puts per `etcdctl txn` (etcd's default `--max-txn-ops` is 128).
const TXN_OPS: usize = 128;
/// `etcdctl txn` processes run at once.
const WRITERS: usize = 4;
/// How often the route count is polled.
const POLL: Duration = Duration::from_millis(20);
/// How long flanneld may take to program every peer.
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(120);
/// Timeout of one `etcdctl txn` and of one `ip -batch`/`bridge -batch`.
const BATCH_TIMEOUT: Duration = Duration::from_secs(60);

/// One fake peer.
struct Peer {
    /// The network address of its /24.
    base: Ipv4Addr,
    /// Its PublicIP (inside the underlay /24; no such host exists).
    public_ip: Ipv4Addr,
    /// Its VtepMAC.
    mac: String,
}

/// What flanneld's own log says about the start (seconds since its first
/// log line, from the log timestamps).
#[derive(Default)]
pub(crate) struct LogTimes {
    /// `holding lease`.
    pub(crate) lease: Option<f64>,
    /// `created the VXLAN device`.
    pub(crate) device: Option<f64>,
    /// `kernel state resynced with the peer set`, and its `applied=`.
    pub(crate) resynced: Option<(f64, String)>,
    /// The debug line `programmed peers`: `ops=`, `elapsed=` (needs
    /// `FLANNELD_RUST_LOG=info,backends=debug`, as bench.sh sets).
    pub(crate) programmed: Option<(String, String)>,
}

/// The figures of one section-b run.
pub(crate) struct PeerRun {
    /// Peers.
    pub(crate) n: usize,
    /// Writing the N leases into etcd.
    pub(crate) write: Duration,
    /// From starting flanneld until `flannel.1` existed (first poll that saw it).
    pub(crate) device: Option<Duration>,
    /// From starting flanneld until N routes were on `flannel.1`.
    pub(crate) ours: Duration,
    /// flanneld's log.
    pub(crate) log: LogTimes,
    /// The same 3N entries with `bridge -batch` + `ip -batch`.
    pub(crate) anchor: Duration,
    /// flanneld's VmHWM after programming, kB.
    pub(crate) flanneld_hwm_kb: u64,
    /// etcd's VmHWM at the same moment, kB.
    pub(crate) etcd_hwm_kb: u64,
}

/// Runs section b with `n` peers.
pub(crate) fn run_peers(n: usize) -> Result<PeerRun> {
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        config: CONFIG.to_owned(),
        start_flanneld: false,
        ..ClusterSpec::default()
    })
    .context("cannot start the cluster")?;
    let peers = fake_peers(&cluster, n)?;
    let write = write_leases(cluster.etcd(), &peers)?;
    let stored = count_leases(cluster.etcd())?;
    if stored != n {
        bail!("{stored} leases in etcd after writing {n}");
    }

    let node = cluster.node(0);
    let started = Instant::now();
    node.start_flanneld(&[])?;
    let (device, ours) = wait_routes(node, n, started)?;
    let log = log_times(&node.log_path());
    let flanneld_pid = node.flanneld_pid().context("flanneld is not running")?;
    let flanneld_hwm_kb = vm_hwm_kb(flanneld_pid)?;
    let etcd_pid = cluster
        .etcd()
        .member_pid(0)
        .context("etcd is not running")?;
    let etcd_hwm_kb = vm_hwm_kb(etcd_pid)?;

    cluster.add_node_plain()?;
    let anchor = anchor_batch(cluster.node(1), &peers, cluster.dir())?;
    Ok(PeerRun {
        n,
        write,
        device,
        ours,
        log,
        anchor,
        flanneld_hwm_kb,
        etcd_hwm_kb,
    })
}

/// `n` fake peers: `10.<1 + i/256>.<i%256>.0/24`, PublicIP
/// `198.18.<k>.<100 + i%150>` (no node has those), unique MACs.
fn fake_peers(cluster: &Cluster, n: usize) -> Result<Vec<Peer>> {
    let [a, b, c, _] = cluster.underlay_net().ip().octets();
    (0..n)
        .map(|i| {
            let index = u16::try_from(i).context("at most 65,535 peers")?;
            let [hi, lo] = index.to_be_bytes();
            let second = hi.checked_add(1).context("too many peers")?;
            let host = u8::try_from(100 + i % 150).context("i % 150 + 100 fits in u8")?;
            Ok(Peer {
                base: Ipv4Addr::new(10, second, lo, 0),
                public_ip: Ipv4Addr::new(a, b, c, host),
                mac: fake_mac(0xb0, index),
            })
        })
        .collect()
}

/// Writes every peer's lease (attached to one etcd lease of 1 h) with
/// `etcdctl txn` batches of [`TXN_OPS`] puts, [`WRITERS`] processes at once.
fn write_leases(etcd: &EtcdCluster, peers: &[Peer]) -> Result<Duration> {
    let started = Instant::now();
    let lease = etcd.grant_lease(3600)?;
    let mut txns = Vec::new();
    for chunk in peers.chunks(TXN_OPS) {
        // Compares (none), a blank line, the success ops, two blank lines.
        let mut text = String::from("\n");
        for p in chunk {
            let value = serde_json::to_string(&lease_value(p.public_ip, &p.mac))?;
            text.push_str(&format!(
                "put --lease={lease} {} {value}\n",
                lease_key(p.base, 24)
            ));
        }
        text.push_str("\n\n");
        txns.push(text);
    }
    let netns = etcd.member_netns(0)?.to_owned();
    let endpoints = etcd.endpoints();
    thread::scope(|s| {
        let workers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let mine: Vec<&String> = txns.iter().skip(w).step_by(WRITERS).collect();
                let (netns, endpoints) = (&netns, &endpoints);
                s.spawn(move || -> Result<()> {
                    for text in mine {
                        txn(netns, endpoints, text)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .map_err(|_| anyhow::anyhow!("a lease writer thread panicked"))?
        })
    })?;
    Ok(started.elapsed())
}

/// One `etcdctl txn --interactive=false` with `text` on stdin.
fn txn(netns: &str, endpoints: &str, text: &str) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, "etcdctl"])
        .arg(format!("--endpoints={endpoints}"))
        .args(["--dial-timeout=2s", "--command-timeout=30s"])
        .args(["txn", "--interactive=false"]);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ETCDCTL_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("ETCDCTL_API", "3");
    let out = crate::util::run_with_input(&mut cmd, text.as_bytes(), BATCH_TIMEOUT)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.starts_with("SUCCESS") {
        bail!(
            "etcdctl txn failed ({}): {stdout} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The number of keys under the subnets prefix.
fn count_leases(etcd: &EtcdCluster) -> Result<usize> {
    let out = etcd.etcdctl_ok([
        "get",
        "/coreos.com/network/subnets/",
        "--prefix",
        "--keys-only",
        "--limit=1",
        "-w",
        "json",
    ])?;
    // `count` is the number of keys in the range, whatever the limit.
    let json: serde_json::Value = serde_json::from_str(&out)?;
    let count = json["count"].as_u64().unwrap_or(0);
    usize::try_from(count).context("lease count fits in usize")
}

/// Polls the route count on `flannel.1` every [`POLL`] until it reaches
/// `n`; returns (when the device was first seen, when all routes were).
fn wait_routes(node: &Node, n: usize, started: Instant) -> Result<(Option<Duration>, Duration)> {
    let mut device = None;
    let mut last = None;
    loop {
        let count = route_count(node.netns())?;
        let at = started.elapsed();
        if count.is_some() && device.is_none() {
            device = Some(at);
        }
        if count.is_some_and(|c| c >= n) {
            return Ok((device, at));
        }
        if count.is_some() {
            last = count;
        }
        if node.flanneld_pid().is_none() {
            bail!(
                "flanneld exited while programming {n} peers; log tail:\n{}",
                node.log_tail(20)
            );
        }
        if at >= PROGRAM_TIMEOUT {
            bail!(
                "flanneld did not program {n} routes within {PROGRAM_TIMEOUT:?} (last count \
                 {last:?}); log tail:\n{}",
                node.log_tail(20)
            );
        }
        thread::sleep(POLL);
    }
}

/// Applies the same 3N entries flanneld made to a fresh node with an
/// identical device: `bridge -batch` (FDB) then `ip -batch` (neighbour and
/// route per peer); returns the time of both and checks the route count.
fn anchor_batch(node: &Node, peers: &[Peer], dir: &Path) -> Result<Duration> {
    hand_vxlan_device(node, &fake_mac(0xa0, 0), Ipv4Addr::new(10, 250, 0, 0))?;
    let mut ip_lines = String::new();
    let mut fdb_lines = String::new();
    for p in peers {
        let [neigh, fdb, route] = peer_commands(p.base, 24, &p.mac, p.public_ip);
        ip_lines.push_str(&format!("{neigh}\n{route}\n"));
        fdb_lines.push_str(&format!("{fdb}\n"));
    }
    let ip_file = dir.join("anchor-ip.batch");
    let fdb_file = dir.join("anchor-fdb.batch");
    std::fs::write(&ip_file, ip_lines)?;
    std::fs::write(&fdb_file, fdb_lines)?;
    let ns = node.netns();
    let started = Instant::now();
    for (tool, file) in [("bridge", &fdb_file), ("ip", &ip_file)] {
        let out = run(
            Command::new(tool).args(["-n", ns, "-batch"]).arg(file),
            BATCH_TIMEOUT,
        )?;
        if !out.status.success() {
            bail!(
                "`{tool} -n {ns} -batch {}` failed: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let elapsed = started.elapsed();
    let routes = route_count(ns)?.unwrap_or(0);
    if routes != peers.len() {
        bail!(
            "the anchor made {routes} routes, not {} (took {})",
            peers.len(),
            ms(elapsed)
        );
    }
    // The neighbour and FDB entries too, to be sure the batches did all.
    let neigh = run(
        Command::new("ip").args(["-n", ns, "neigh", "show", "dev", "flannel.1"]),
        IP_TIMEOUT,
    )?;
    let neighbours = neigh
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    if neighbours != peers.len() {
        bail!(
            "the anchor made {neighbours} neighbours, not {}",
            peers.len()
        );
    }
    Ok(elapsed)
}

/// Reads flanneld's log (the last start only): seconds from its first line
/// to the milestones, and the `programmed peers` figures.
fn log_times(path: &Path) -> LogTimes {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let tail = text
        .rfind("=== netns-tests: starting")
        .map_or(text.as_str(), |i| &text[i..]);
    let mut times = LogTimes::default();
    let mut first = None;
    for line in tail.lines().skip(1) {
        let Some(t) = line.split_whitespace().next().and_then(time_of_day) else {
            continue;
        };
        let first = *first.get_or_insert(t);
        let since = if t >= first {
            t - first
        } else {
            t + 86_400.0 - first
        };
        if line.contains("holding lease") && times.lease.is_none() {
            times.lease = Some(since);
        } else if line.contains("created the VXLAN device") && times.device.is_none() {
            times.device = Some(since);
        } else if line.contains("kernel state resynced") && times.resynced.is_none() {
            times.resynced = Some((since, field(line, "applied").unwrap_or_default()));
        } else if line.contains("programmed peers") && times.programmed.is_none() {
            times.programmed = Some((
                field(line, "ops").unwrap_or_default(),
                field(line, "elapsed").unwrap_or_default(),
            ));
        }
    }
    times
}

/// Seconds since midnight of an RFC 3339 timestamp
/// (`2026-01-02T03:04:05.678901Z`).
fn time_of_day(stamp: &str) -> Option<f64> {
    let (_, time) = stamp.split_once('T')?;
    let time = time.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// The value of a `key=value` field of a log line.
fn field(line: &str, key: &str) -> Option<String> {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
        .map(str::to_owned)
}

/// Prints one run's figures.
pub(crate) fn print(r: &PeerRun) {
    println!(
        "  {} peers: leases written in {} (etcdctl txn, {TXN_OPS} puts each, {WRITERS} at once)",
        r.n,
        ms(r.write)
    );
    println!(
        "    ours:   flanneld start -> {} routes on flannel.1: {}  (device seen after {})",
        r.n,
        ms(r.ours),
        r.device.map_or_else(|| "?".into(), ms)
    );
    let secs = |s: Option<f64>| s.map_or_else(|| "?".into(), |s| format!("{:.1} ms", s * 1000.0));
    println!(
        "            flanneld log: lease held at {}, device created at {}, resynced at {} \
         (applied={})",
        secs(r.log.lease),
        secs(r.log.device),
        secs(r.log.resynced.as_ref().map(|(s, _)| *s)),
        r.log.resynced.as_ref().map_or("?", |(_, a)| a.as_str())
    );
    match &r.log.programmed {
        Some((ops, elapsed)) => {
            println!("            flanneld's own netlink apply: {ops} ops in {elapsed}");
        }
        None => println!(
            "            flanneld's own netlink apply: not in the log (run with \
             FLANNELD_RUST_LOG=info,backends=debug)"
        ),
    }
    println!(
        "    anchor: bridge -batch ({} fdb) + ip -batch ({} neigh + {} route): {}",
        r.n,
        r.n,
        r.n,
        ms(r.anchor)
    );
    println!(
        "    ours / anchor = {:.2} (ours includes flanneld's start-up: etcd connect and \
         list, lease, device creation)",
        crate::util::ratio(r.ours, r.anchor)
    );
}
