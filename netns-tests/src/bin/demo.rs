//! The netns cluster demo (`sudo netns-tests/scripts/demo.sh`).
//!
//! Builds a 3-node cluster in network namespaces (a real etcd, our flanneld
//! on every node, one container per node), explains what it built, prints
//! a container-to-container reachability matrix and the overlay's TCP
//! throughput next to the underlay's, then tears everything down. Exits 0
//! when every container reaches every other one, 1 otherwise.

#[path = "bench/iperf.rs"]
mod iperf;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use netns_tests::{Cluster, ClusterSpec, Container, list_netns, require_root, wait_for};

/// Nodes in the demo cluster.
const NODES: usize = 3;
/// How long the first reachability check waits for the overlay to converge.
const CONVERGENCE: Duration = Duration::from_secs(10);
/// iperf3 test length.
const IPERF_SECS: u32 = 5;

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("demo: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Builds, shows and tears down the cluster; `Ok(true)` if all pairs reach
/// each other.
fn run() -> Result<bool> {
    require_root().context("the demo creates network namespaces")?;
    println!("Starting a {NODES}-node flannel cluster in network namespaces...");
    let cluster = Cluster::start(ClusterSpec {
        nodes: NODES,
        ..ClusterSpec::default()
    })
    .context("cannot start the cluster")?;
    let result = show(&cluster);
    let prefix = format!("{}-", cluster.prefix());
    let ours = |names: Vec<String>| -> Vec<String> {
        names
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect()
    };
    let before = ours(list_netns()?).len();
    let flanneld = cluster
        .nodes()
        .iter()
        .filter(|n| n.flanneld_pid().is_some())
        .count();
    drop(cluster);
    let left = ours(list_netns()?);
    println!();
    if left.is_empty() {
        println!(
            "Cleaned up: stopped etcd and {flanneld} flanneld (by PID), deleted all {before} \
             namespaces ({prefix}*) and the cluster's temporary directory."
        );
    } else {
        println!("Cleanup left namespaces behind: {left:?}");
    }
    let all_ok = result?;
    println!(
        "{}",
        if all_ok {
            "Result: every container reached every other container."
        } else {
            "Result: some container pairs were NOT reachable (exit 1)."
        }
    );
    Ok(all_ok)
}

/// Explains the cluster, prints the matrix and the throughput; `Ok(true)`
/// if all pairs reach each other.
fn show(cluster: &Cluster) -> Result<bool> {
    let containers: Vec<Container> = cluster
        .nodes()
        .iter()
        .map(|n| n.add_container())
        .collect::<Result<_, _>>()
        .context("cannot add the containers")?;
    explain(cluster, &containers)?;
    let (all_ok, first_ok) = matrix(&containers)?;
    throughput(cluster, &containers, first_ok);
    Ok(all_ok)
}

/// Prints what was built.
fn explain(cluster: &Cluster, containers: &[Container]) -> Result<()> {
    let etcd = cluster.etcd();
    println!();
    println!("What was built (namespace prefix {}):", cluster.prefix());
    println!(
        "  underlay   {}: a switch namespace {} with bridge br0; every node's eth0 is plugged in",
        cluster.underlay_net(),
        cluster.switch_netns()
    );
    println!(
        "  etcd 3.4   {} (namespace {}), holding /coreos.com/network/config:",
        etcd.endpoints(),
        etcd.member_netns(0)?
    );
    println!("             {}", cluster.spec().config);
    println!(
        "  flanneld   one per node: leases a /24 from etcd, writes subnet.env, creates the VXLAN \
         device flannel.1"
    );
    println!(
        "             and programs a neighbour, an FDB entry and a route for every other node's \
         lease"
    );
    println!();
    println!(
        "  {:<6} {:<14} {:<15} {:<16} {:<18} {:<16} MTU",
        "node", "namespace", "underlay IP", "leased subnet", "VTEP MAC", "container IP"
    );
    for (node, c) in cluster.nodes().iter().zip(containers) {
        let env = node.wait_subnet_env(Duration::from_secs(1))?;
        let subnet = env
            .subnet_network()
            .map_or_else(|| "?".to_owned(), |s| s.to_string());
        let mac = node
            .exec_ok(["cat", "/sys/class/net/flannel.1/address"])
            .map_or_else(|_| "?".to_owned(), |m| m.trim().to_owned());
        let line = format!(
            "  {:<6} {:<14} {:<15} {:<16} {:<18} {:<16} {:<6}",
            node.index(),
            node.netns(),
            node.underlay_ip().to_string(),
            subnet,
            mac,
            c.ip().to_string(),
            c.mtu()
        );
        println!("{}", line.trim_end());
    }
    println!();
    println!(
        "  Each container ({}c0, ...) was attached by our CNI plugin `flannel` (bridge cni0, a veth, \
         an address from the node's subnet, a default route via the bridge);",
        cluster.node(0).netns()
    );
    println!(
        "  traffic to another node's subnet goes through flannel.1, VXLAN-encapsulated (VNI 1, \
         UDP 8472) over the underlay."
    );
    Ok(())
}

/// Prints the reachability matrix; returns (all pairs ok, the first pair ok).
fn matrix(containers: &[Container]) -> Result<(bool, bool)> {
    println!();
    println!(
        "Reachability (1 ping per pair; the first pair may take up to {CONVERGENCE:?} to \
         converge):"
    );
    let width = 16;
    let mut header = format!("  {:<width$}", "from \\ to");
    for c in containers {
        header.push_str(&format!("{:<width$}", c.ip().to_string()));
    }
    println!("{}", header.trim_end());
    let mut all_ok = true;
    let mut first_ok = None;
    for a in containers {
        let mut row = format!("  {:<width$}", a.ip().to_string());
        for b in containers {
            let cell = if a == b {
                "-"
            } else {
                let ok = if first_ok.is_none() {
                    let ok = wait_for(
                        &format!("{} -> {}", a.ip(), b.ip()),
                        CONVERGENCE,
                        Duration::from_millis(200),
                        || a.ping(b.ip(), 1).is_ok_and(|s| s.all_received()),
                    )
                    .is_ok();
                    first_ok = Some(ok);
                    ok
                } else {
                    a.ping(b.ip(), 1).is_ok_and(|s| s.all_received())
                };
                all_ok &= ok;
                if ok { "ok" } else { "FAIL" }
            };
            row.push_str(&format!("{cell:<width$}"));
        }
        println!("{}", row.trim_end());
    }
    Ok((all_ok, first_ok.unwrap_or(false)))
}

/// Prints the overlay and underlay TCP throughput and their ratio.
fn throughput(cluster: &Cluster, containers: &[Container], overlay_ok: bool) {
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let (c0, c1) = (&containers[0], &containers[1]);
    println!();
    println!("TCP throughput (iperf3, 1 stream, {IPERF_SECS} s, receiver side):");
    let overlay = if overlay_ok {
        iperf::tcp_throughput(c1.netns(), c1.ip(), c0.netns(), IPERF_SECS)
    } else {
        Err(anyhow::anyhow!(
            "skipped: the containers do not reach each other"
        ))
    };
    let underlay = iperf::tcp_throughput(n1.netns(), n1.underlay_ip(), n0.netns(), IPERF_SECS);
    let show = |r: &Result<f64>| match r {
        Ok(bps) => iperf::gbit(*bps),
        Err(e) => format!("FAILED ({e:#})"),
    };
    let rows = [
        (
            format!(
                "overlay   container {} -> container {} (VXLAN)",
                c0.ip(),
                c1.ip()
            ),
            show(&overlay),
        ),
        (
            format!(
                "underlay  node {} -> node {} (no encapsulation)",
                n0.underlay_ip(),
                n1.underlay_ip()
            ),
            show(&underlay),
        ),
    ];
    let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    for (label, value) in rows {
        println!("  {label:<width$}  {value}");
    }
    if let (Ok(o), Ok(u)) = (&overlay, &underlay) {
        println!(
            "  overlay / underlay = {:.2} (the VXLAN cost: encapsulation, 50 bytes less MTU, \
             two more hops through cni0)",
            o / u
        );
    }
}
