//! c. Join-to-route latency on 3 nodes: one fake lease put with etcdctl,
//! timed until the route to it is on every node (polled every 5 ms); then
//! deleted, timed until the route is gone everywhere. The anchor is the
//! `etcdctl put` (and `del`) command itself.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netns_tests::{Cluster, ClusterSpec, wait_for};

use crate::util::{fake_mac, has_route, lease_key, lease_value, vm_hwm_kb};

/// Joins measured.
const SAMPLES: usize = 50;
/// How often each node's routes are polled.
const POLL: Duration = Duration::from_millis(5);
/// How long a route may take to appear or vanish.
const WAIT: Duration = Duration::from_secs(10);

/// The samples of section c.
pub(crate) struct Join {
    /// Put issued -> route on all 3 nodes.
    pub(crate) join: Vec<Duration>,
    /// The `etcdctl put` command.
    pub(crate) put: Vec<Duration>,
    /// Delete issued -> route gone on all 3 nodes.
    pub(crate) leave: Vec<Duration>,
    /// The `etcdctl del` command.
    pub(crate) del: Vec<Duration>,
    /// `etcdctl put` of a key outside the subnets prefix with nothing
    /// polling (the put's cost on an idle machine).
    pub(crate) put_idle: Vec<Duration>,
    /// `etcdctl version` in the same way (start-up only, no round trip).
    pub(crate) ctl_start: Vec<Duration>,
    /// VmHWM of node 0's flanneld (2 peers) after all the joins, kB.
    pub(crate) flanneld_hwm_kb: u64,
}

/// Runs section c.
pub(crate) fn run() -> Result<Join> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 3,
        ..ClusterSpec::default()
    })
    .context("cannot start the 3-node cluster")?;
    let namespaces: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| n.netns().to_owned())
        .collect();
    let mut own = Vec::new();
    for node in cluster.nodes() {
        let env = node.wait_subnet_env(Duration::from_secs(1))?;
        own.push(env.subnet_network().context("no FLANNEL_SUBNET")?.network());
    }
    let taken: HashSet<Ipv4Addr> = own.iter().copied().collect();
    // Converged first: every node has the routes to the others.
    for (i, ns) in namespaces.iter().enumerate() {
        for (j, subnet) in own.iter().enumerate() {
            if i != j {
                let s = format!("{subnet}/24");
                wait_for(&format!("route to {s} in {ns}"), WAIT, POLL, || {
                    has_route(ns, &s)
                })?;
            }
        }
    }
    let [a, b, c, _] = cluster.underlay_net().ip().octets();
    let public_ip = Ipv4Addr::new(a, b, c, 200);
    let etcd = cluster.etcd();
    let lease = etcd.grant_lease(3600)?;
    let subnets: Vec<Ipv4Addr> = (100..=255u8)
        .map(|x| Ipv4Addr::new(10, 244, x, 0))
        .filter(|s| !taken.contains(s))
        .take(SAMPLES)
        .collect();
    let mut result = Join {
        join: Vec::new(),
        put: Vec::new(),
        leave: Vec::new(),
        del: Vec::new(),
        put_idle: Vec::new(),
        ctl_start: Vec::new(),
        flanneld_hwm_kb: 0,
    };
    for (i, base) in subnets.iter().enumerate() {
        let index = u16::try_from(i).context("few samples")?;
        let key = lease_key(*base, 24);
        let value = lease_value(public_ip, &fake_mac(0xc0, index));
        let subnet = format!("{base}/24");
        let (join, put) = timed_change(&namespaces, &subnet, true, || {
            etcd.etcdctl_ok([
                "put",
                "--lease",
                lease.as_str(),
                key.as_str(),
                value.as_str(),
            ])
            .map(drop)
            .context("etcdctl put")
        })?;
        let (leave, del) = timed_change(&namespaces, &subnet, false, || {
            etcd.etcdctl_ok(["del", key.as_str()])
                .map(drop)
                .context("etcdctl del")
        })?;
        result.join.push(join);
        result.put.push(put);
        result.leave.push(leave);
        result.del.push(del);
    }
    for i in 0..SAMPLES {
        let value = i.to_string();
        let started = Instant::now();
        etcd.etcdctl_ok(["put", "/coreos.com/bench-rtt", value.as_str()])?;
        result.put_idle.push(started.elapsed());
        let started = Instant::now();
        etcd.etcdctl_ok(["version"])?;
        result.ctl_start.push(started.elapsed());
    }
    etcd.etcdctl_ok(["del", "/coreos.com/bench-rtt"])?;
    let pid = cluster
        .node(0)
        .flanneld_pid()
        .context("flanneld is not running")?;
    result.flanneld_hwm_kb = vm_hwm_kb(pid)?;
    Ok(result)
}

/// Runs `change` while one thread per namespace polls for the route to
/// `subnet` to be `present`; returns (change start -> the last namespace
/// saw it, the duration of `change` itself).
fn timed_change(
    namespaces: &[String],
    subnet: &str,
    present: bool,
    change: impl FnOnce() -> Result<()>,
) -> Result<(Duration, Duration)> {
    thread::scope(|s| {
        let pollers: Vec<_> = namespaces
            .iter()
            .map(|ns| {
                s.spawn(move || -> Result<Instant> {
                    let deadline = Instant::now() + WAIT;
                    loop {
                        if has_route(ns, subnet) == present {
                            return Ok(Instant::now());
                        }
                        if Instant::now() >= deadline {
                            bail!(
                                "route to {subnet} in {ns} not {} within {WAIT:?}",
                                if present { "added" } else { "removed" }
                            );
                        }
                        thread::sleep(POLL);
                    }
                })
            })
            .collect();
        let started = Instant::now();
        let changed = change();
        let took = started.elapsed();
        let mut last = started;
        for p in pollers {
            let seen = p
                .join()
                .map_err(|_| anyhow::anyhow!("a route poller panicked"))??;
            last = last.max(seen);
        }
        changed?;
        Ok((last - started, took))
    })
}
