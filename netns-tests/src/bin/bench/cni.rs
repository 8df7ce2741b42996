//! Section e: the CNI plugin's ADD and DEL latency against Debian's
//! reference `bridge` + `host-local` (what flannel's plugin delegates to),
//! interleaved op by op on two nodes of one cluster, and both plugins' peak
//! RSS.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netns_tests::{Cluster, ClusterSpec, Node, cni_plugin_binary};
use nix::sched::{CloneFlags, setns};
use serde_json::{Value, json};
use subnet::subnet_env::{SubnetEnv, write_atomic};

/// Timed operations per plugin and command.
pub(crate) const OPS: usize = 100;
/// Untimed operations first (page cache, bridge creation).
const WARMUP: usize = 3;
/// Extra ADDs under `/usr/bin/time` for the peak RSS.
const RSS_OPS: usize = 5;
/// Budget of one plugin call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The figures of section e.
pub(crate) struct CniFigures {
    pub(crate) ours_add: Vec<Duration>,
    pub(crate) ours_del: Vec<Duration>,
    pub(crate) ref_add: Vec<Duration>,
    pub(crate) ref_del: Vec<Duration>,
    /// Peak RSS of one ADD (KiB): ours, and bridge with host-local.
    pub(crate) ours_rss_kb: Option<u64>,
    pub(crate) ref_rss_kb: Option<u64>,
}

/// One plugin under test on one node.
struct Subject {
    node_ns: File,
    binary: PathBuf,
    config: Value,
    containers: Vec<String>,
}

pub(crate) fn run() -> Result<CniFigures> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        start_flanneld: false,
        config: String::new(),
        ..ClusterSpec::default()
    })?;
    let ours_node = cluster.node(0);
    let ref_node = cluster.node(1);
    write_subnet_env(ours_node, 41)?;
    write_subnet_env(ref_node, 42)?;
    let total = WARMUP + OPS + RSS_OPS;
    let ours = Subject {
        node_ns: netns_file(ours_node.netns())?,
        binary: cni_plugin_binary(),
        config: json!({
            "cniVersion": "1.0.0", "name": "bench", "type": "flannel",
            "subnetFile": ours_node.subnet_file(), "dataDir": ours_node.cni_data_dir(),
            "delegate": {"hairpinMode": true, "isDefaultGateway": true},
        }),
        containers: containers(ours_node, total)?,
    };
    // Exactly what flannel's plugin hands to `bridge` for this subnet.env.
    let reference = Subject {
        node_ns: netns_file(ref_node.netns())?,
        binary: PathBuf::from("/usr/lib/cni/bridge"),
        config: json!({
            "cniVersion": "1.0.0", "name": "bench", "type": "bridge",
            "hairpinMode": true, "isDefaultGateway": true, "isGateway": true,
            "ipMasq": false, "mtu": 1450,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.42.0/24"}]],
                     "routes": [{"dst": "10.244.0.0/16"}],
                     "dataDir": ref_node.dir().join("host-local")},
        }),
        containers: containers(ref_node, total)?,
    };
    let own_ns = netns_file("/proc/thread-self/ns/net")?;
    let mut f = CniFigures {
        ours_add: Vec::new(),
        ours_del: Vec::new(),
        ref_add: Vec::new(),
        ref_del: Vec::new(),
        ours_rss_kb: None,
        ref_rss_kb: None,
    };
    let result = (|| -> Result<()> {
        // All ADDs, then all DELs; ours and the reference alternate op by op.
        for command in ["ADD", "DEL"] {
            for i in 0..WARMUP + OPS {
                let ours_time = call(&ours, &own_ns, command, i, None)?;
                let ref_time = call(&reference, &own_ns, command, i, None)?;
                if i < WARMUP {
                    continue;
                }
                let (o, r) = if command == "ADD" {
                    (&mut f.ours_add, &mut f.ref_add)
                } else {
                    (&mut f.ours_del, &mut f.ref_del)
                };
                o.push(ours_time);
                r.push(ref_time);
            }
        }
        if Path::new("/usr/bin/time").exists() {
            for i in WARMUP + OPS..total {
                for (subject, slot) in
                    [(&ours, &mut f.ours_rss_kb), (&reference, &mut f.ref_rss_kb)]
                {
                    let mut kb = 0;
                    call(subject, &own_ns, "ADD", i, Some(&mut kb))?;
                    *slot = Some(slot.unwrap_or(0).max(kb));
                }
            }
        }
        Ok(())
    })();
    // Back home whatever happened (the calls switch namespaces).
    setns(own_ns.as_fd(), CloneFlags::CLONE_NEWNET).context("return to our namespace")?;
    result.map(|()| f)
}

fn write_subnet_env(node: &Node, third: u8) -> Result<()> {
    let env = SubnetEnv {
        networks: vec!["10.244.0.0/16".parse()?],
        subnet: Some(format!("10.244.{third}.1/24").parse()?),
        mtu: Some(1450),
        ipmasq: Some(true),
        ..SubnetEnv::default()
    };
    write_atomic(&node.subnet_file(), &env)?;
    Ok(())
}

fn containers(node: &Node, n: usize) -> Result<Vec<String>> {
    (0..n).map(|_| Ok(node.add_container_netns()?)).collect()
}

fn netns_file(name_or_path: &str) -> Result<File> {
    let path = if name_or_path.starts_with('/') {
        PathBuf::from(name_or_path)
    } else {
        Path::new("/run/netns").join(name_or_path)
    };
    File::open(&path).with_context(|| format!("open {}", path.display()))
}

/// One plugin call for container `i`, spawned from the node's namespace (the
/// child inherits this thread's namespace); returns its wall time. With
/// `rss`, runs under `/usr/bin/time -f %M` and stores the peak RSS.
fn call(
    s: &Subject,
    home: &File,
    command: &str,
    i: usize,
    rss: Option<&mut u64>,
) -> Result<Duration> {
    let container = &s.containers[i];
    let mut cmd = match rss {
        Some(_) => {
            let mut c = Command::new("/usr/bin/time");
            c.args(["-f", "%M"]).arg(&s.binary);
            c
        }
        None => Command::new(&s.binary),
    };
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", format!("/run/netns/{container}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni");
    let input = s.config.to_string();
    setns(s.node_ns.as_fd(), CloneFlags::CLONE_NEWNET).context("enter the node namespace")?;
    let started = Instant::now();
    let out = run_timed(&mut cmd, input.as_bytes());
    let elapsed = started.elapsed();
    setns(home.as_fd(), CloneFlags::CLONE_NEWNET).context("return to our namespace")?;
    let out: Output = out?;
    if !out.status.success() {
        bail!(
            "{} {command} {container} failed: {} {}",
            s.binary.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if let Some(rss) = rss {
        let text = String::from_utf8_lossy(&out.stderr);
        *rss = text
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .context("no RSS figure from /usr/bin/time")?;
    }
    Ok(elapsed)
}

/// Runs `cmd` with `input` and waits for it exactly (a waiter thread, not a
/// polling loop, so the time measured is the child's); kills it by its PID
/// after [`CALL_TIMEOUT`].
fn run_timed(cmd: &mut Command, input: &[u8]) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    let pid = child.id();
    let mut stdin = child.stdin.take().context("stdin was piped")?;
    // The config is far smaller than a pipe buffer: this write cannot block.
    stdin.write_all(input)?;
    drop(stdin);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || drop(tx.send(child.wait_with_output())));
    match rx.recv_timeout(CALL_TIMEOUT) {
        Ok(out) => Ok(out?),
        Err(_) => {
            // Our own child, by its PID; the waiter thread reaps it.
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            bail!(
                "{:?} did not finish within {CALL_TIMEOUT:?}; killed pid {pid}",
                cmd.get_program()
            )
        }
    }
}
