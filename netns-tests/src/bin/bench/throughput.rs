//! a. TCP throughput container to container: our flanneld's VXLAN against a
//! flannel-style kernel VXLAN pair programmed by hand with iproute2, on the
//! same switch, in the same run.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result};
use netns_tests::{Cluster, ClusterSpec, Container, Node, wait_for};

use crate::iperf::{gbit, tcp_throughput};
use crate::util::{VXLAN_DEV, hand_peer, hand_vxlan_device, ip_ok};

/// iperf3 test length.
const SECS: u32 = 5;
/// Rounds against the plain anchor (one run each, the order alternating).
const ROUNDS: usize = 3;
/// Rounds against the anchor with flannel's FORWARD rules.
const FW_ROUNDS: usize = 2;

/// The figures of section a.
pub(crate) struct Throughput {
    /// Mean over the rounds, bit/s, over our flanneld's VXLAN.
    pub(crate) ours: f64,
    /// Mean over the rounds, bit/s, over the hand-made VXLAN pair.
    pub(crate) anchor: f64,
    /// Mean bit/s over ours in the rounds against `anchor_fw`.
    pub(crate) ours_fw: f64,
    /// Mean bit/s over the hand-made pair with flanneld's FORWARD rules.
    pub(crate) anchor_fw: f64,
}

/// The hand-made pair's subnets (inside the overlay, never leased by the
/// cluster's flanneld: they are not written to etcd, and the pair's
/// namespaces are separate from the flanneld nodes anyway).
const HAND_SUBNETS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(10, 244, 250, 0),
    Ipv4Addr::new(10, 244, 251, 0),
];
/// The hand-made pair's VTEP MACs.
const HAND_MACS: [&str; 2] = ["7a:11:22:33:44:50", "7a:11:22:33:44:51"];

/// Runs section a.
pub(crate) fn run() -> Result<Throughput> {
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        ..ClusterSpec::default()
    })
    .context("cannot start the 2-node cluster")?;
    let a = cluster.node(0).add_container()?;
    let b = cluster.node(1).add_container()?;
    wait_reachable(&a, &b)?;

    cluster.add_node_plain()?;
    cluster.add_node_plain()?;
    let (h0, h1) = (cluster.node(2), cluster.node(3));
    for (i, node) in [h0, h1].into_iter().enumerate() {
        hand_vxlan_device(node, HAND_MACS[i], HAND_SUBNETS[i])?;
    }
    for (i, (node, other)) in [(h0, h1), (h1, h0)].into_iter().enumerate() {
        let j = 1 - i;
        hand_peer(node, HAND_SUBNETS[j], 24, HAND_MACS[j], other.underlay_ip())?;
    }
    let ha = h0.add_container_in(format!("{}/24", HAND_SUBNETS[0]).parse()?, 1450)?;
    let hb = h1.add_container_in(format!("{}/24", HAND_SUBNETS[1]).parse()?, 1450)?;
    wait_reachable(&ha, &hb)?;

    println!(
        "  ours:   {} ({}) -> {} ({}), flanneld's {VXLAN_DEV}",
        a.ip(),
        cluster.node(0).netns(),
        b.ip(),
        cluster.node(1).netns()
    );
    println!("          {}", device_summary(cluster.node(0)));
    println!(
        "  anchor: {} ({}) -> {} ({}), {VXLAN_DEV} made with ip link/neigh, bridge fdb, ip route",
        ha.ip(),
        h0.netns(),
        hb.ip(),
        h1.netns()
    );
    println!("          {}", device_summary(h0));

    let ours_run =
        || tcp_throughput(b.netns(), b.ip(), a.netns(), SECS).context("iperf3 over ours");
    let anchor_run = || {
        tcp_throughput(hb.netns(), hb.ip(), ha.netns(), SECS)
            .context("iperf3 over the hand-made pair")
    };
    let (ours, anchor) = rounds(ROUNDS, "anchor", &ours_run, &anchor_run)?;

    // flanneld (like flannel) adds FORWARD accept rules for the network on
    // its nodes; netfilter's forward hook then costs every packet a little.
    // The same rules on the hand-made pair show how much of a gap that is.
    for node in [h0, h1] {
        forward_rules(node.netns())?;
    }
    println!(
        "  with flannel's FORWARD rules (iptables chain FLANNEL-FWD) added to the anchor's nodes:"
    );
    let (ours_fw, anchor_fw) = rounds(FW_ROUNDS, "anchor+fw", &ours_run, &anchor_run)?;
    Ok(Throughput {
        ours,
        anchor,
        ours_fw,
        anchor_fw,
    })
}

/// `n` rounds of one iperf3 run each over ours and over the anchor, the
/// order alternating; prints each and returns the means.
fn rounds(
    n: usize,
    name: &str,
    ours_run: &dyn Fn() -> Result<f64>,
    anchor_run: &dyn Fn() -> Result<f64>,
) -> Result<(f64, f64)> {
    let mut ours = Vec::new();
    let mut anchor = Vec::new();
    for round in 1..=n {
        let (o, h) = if round % 2 == 1 {
            let o = ours_run()?;
            (o, anchor_run()?)
        } else {
            let h = anchor_run()?;
            (ours_run()?, h)
        };
        println!(
            "  round {round}: ours {}  {name} {}  ratio {:.3}",
            gbit(o),
            gbit(h),
            o / h
        );
        ours.push(o);
        anchor.push(h);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    Ok((mean(&ours), mean(&anchor)))
}

/// Adds the FORWARD rules flanneld installs (`FLANNEL-FWD`, accepting
/// 10.244.0.0/16 both ways) in `netns`.
fn forward_rules(netns: &str) -> Result<()> {
    let comment = ["-m", "comment", "--comment", "flanneld forward"];
    let ipt = |args: &[&str]| -> Result<()> {
        let mut all = vec!["netns", "exec", netns, "iptables", "-w", "5"];
        all.extend_from_slice(args);
        ip_ok(&all).map(drop)
    };
    ipt(&["-N", "FLANNEL-FWD"])?;
    for dir in ["-s", "-d"] {
        let mut rule = vec!["-A", "FLANNEL-FWD", dir, "10.244.0.0/16"];
        rule.extend_from_slice(&comment);
        rule.extend_from_slice(&["-j", "ACCEPT"]);
        ipt(&rule)?;
    }
    let mut jump = vec!["-A", "FORWARD"];
    jump.extend_from_slice(&comment);
    jump.extend_from_slice(&["-j", "FLANNEL-FWD"]);
    ipt(&jump)
}

/// Waits up to 10 s until `a` pings `b`.
fn wait_reachable(a: &Container, b: &Container) -> Result<()> {
    wait_for(
        &format!("{} -> {}", a.ip(), b.ip()),
        Duration::from_secs(10),
        Duration::from_millis(200),
        || a.ping(b.ip(), 1).is_ok_and(|s| s.all_received()),
    )
    .with_context(|| format!("{} does not reach {}", a.ip(), b.ip()))
}

/// The interesting part of `ip -d link show flannel.1`: MTU and the vxlan
/// line, plus the TX checksum offload state.
fn device_summary(node: &Node) -> String {
    let link = node
        .exec_ok(["ip", "-d", "link", "show", VXLAN_DEV])
        .unwrap_or_default();
    let mtu = link
        .split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .unwrap_or("?")
        .to_owned();
    // The vxlan attributes, up to the generic link attributes.
    let vxlan = link
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("vxlan "))
        .map_or("?", |l| l.find(" addrgenmode").map_or(l, |i| &l[..i]))
        .to_owned();
    let csum = node
        .exec_ok(["ethtool", "-k", VXLAN_DEV])
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.trim_start().starts_with("tx-checksum-ip-generic:"))
                .map(|l| l.trim().to_owned())
        })
        .unwrap_or_else(|| "tx-checksum-ip-generic: ?".into());
    let gso = link
        .split_whitespace()
        .skip_while(|w| *w != "gso_max_size")
        .nth(1)
        .unwrap_or("?")
        .to_owned();
    if vxlan == "?" {
        return "(cannot read the device)".into();
    }
    format!("mtu {mtu}, {vxlan}, gso_max_size {gso}, {csum}")
}
