//! flanneld with the VXLAN backend on an `ip netns` cluster with a real etcd:
//! reachability, joins and leaves, restarts, etcd outages, a deleted device,
//! and a lease written by a flannel (Go) node.
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::thread;
use std::time::{Duration, Instant};

use netns_tests::{Cluster, ClusterSpec, Container, Node, PingStats, ping, require_root, wait_for};

const POLL: Duration = Duration::from_millis(20);

fn cluster_with(spec: ClusterSpec) -> Cluster {
    require_root().unwrap();
    Cluster::start(spec).unwrap()
}

fn cluster(nodes: usize) -> Cluster {
    cluster_with(ClusterSpec {
        nodes,
        ..ClusterSpec::default()
    })
}

/// The node's IPv4 routes, as `ip route` prints them.
fn routes(node: &Node) -> String {
    node.exec_ok(["ip", "-4", "route", "show"]).unwrap()
}

fn has_route(node: &Node, subnet: &str) -> bool {
    routes(node).lines().any(|l| l.starts_with(subnet))
}

/// The node's lease subnet (`10.244.7.0/24`), from its subnet.env.
fn subnet_of(node: &Node) -> String {
    let env = node.wait_subnet_env(Duration::from_secs(30)).unwrap();
    env.subnet_network().unwrap().to_string()
}

/// Pings `to` from `from` every 20 ms in a background thread, `count` times.
fn ping_in_background(from: &Container, to: Ipv4Addr, count: u32) -> thread::JoinHandle<PingStats> {
    let netns = from.netns().to_owned();
    thread::spawn(move || ping(&netns, to, count, Duration::from_millis(20)).unwrap())
}

/// Every container reaches every other container across three nodes.
#[test]
fn all_pairs_ping_on_three_nodes() {
    let cluster = cluster(3);
    let containers: Vec<_> = (0..3)
        .map(|i| cluster.node(i).add_container().unwrap())
        .collect();
    for a in &containers {
        for b in &containers {
            if a.ip() != b.ip() {
                cluster.wait_reachable(a, b).unwrap();
            }
        }
    }
    // The device is what flannel makes.
    let link = cluster
        .node(0)
        .exec_ok(["ip", "-d", "link", "show", "flannel.1"])
        .unwrap();
    for expected in [
        "mtu 1450",
        "vxlan id 1",
        "dstport 8472",
        "nolearning",
        "dev eth0",
    ] {
        assert!(link.contains(expected), "missing {expected:?} in {link}");
    }
    let env = cluster
        .node(0)
        .wait_subnet_env(Duration::from_secs(1))
        .unwrap();
    assert_eq!(env.mtu, Some(1450));
    assert_eq!(env.ipmasq, Some(false));
}

/// A joining node shows up on every peer within 1 s of holding its lease;
/// a node whose lease is deleted disappears from every peer within 1 s.
#[test]
fn join_and_leave_propagate_within_one_second() {
    let mut cluster = cluster(3);
    cluster.add_node().unwrap();
    let newcomer = cluster.node(3);
    let subnet = subnet_of(newcomer);
    let joined = Instant::now();
    for i in 0..3 {
        let node = cluster.node(i);
        wait_for(
            &format!("route to {subnet} on node {i}"),
            Duration::from_secs(1),
            POLL,
            || has_route(node, &subnet),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    }
    eprintln!(
        "join seen on all peers {:?} after subnet.env",
        joined.elapsed()
    );

    assert_eq!(newcomer.stop_flanneld().and_then(|s| s.code()), Some(0));
    let key = format!("/coreos.com/network/subnets/{}", subnet.replace('/', "-"));
    cluster.etcd().etcdctl_ok(["del", key.as_str()]).unwrap();
    let left = Instant::now();
    for i in 0..3 {
        let node = cluster.node(i);
        wait_for(
            &format!("no route to {subnet} on node {i}"),
            Duration::from_secs(1),
            POLL,
            || !has_route(node, &subnet),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
        let neighbours = node
            .exec_ok(["ip", "neigh", "show", "dev", "flannel.1"])
            .unwrap();
        assert!(
            !neighbours.contains(subnet.trim_end_matches("/24")),
            "{neighbours}"
        );
    }
    eprintln!(
        "leave seen on all peers {:?} after the delete",
        left.elapsed()
    );
}

/// SIGKILL and restart of flanneld keep the subnet and lose no ping at a
/// 20 ms interval; SIGTERM exits 0 and leaves the data path in place.
#[test]
fn restarts_are_hitless() {
    let cluster = cluster(2);
    let a = cluster.node(0).add_container().unwrap();
    let b = cluster.node(1).add_container().unwrap();
    cluster.wait_reachable(&a, &b).unwrap();
    let before = subnet_of(cluster.node(0));

    let pings = ping_in_background(&a, b.ip(), 250);
    thread::sleep(Duration::from_millis(500));
    cluster.node(0).signal_flanneld("KILL").unwrap();
    cluster
        .node(0)
        .wait_flanneld_exit(Duration::from_secs(5))
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    std::fs::remove_file(cluster.node(0).subnet_file()).unwrap();
    cluster.node(0).restart_flanneld().unwrap();
    assert_eq!(
        subnet_of(cluster.node(0)),
        before,
        "the restarted node kept its subnet"
    );

    let status = cluster.node(1).stop_flanneld().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
    let stats = pings.join().unwrap();
    assert_eq!(stats.received, stats.transmitted, "lost pings: {stats:?}");
    assert!(
        routes(cluster.node(1)).contains("dev flannel.1"),
        "data path left in place"
    );
    assert!(a.ping(b.ip(), 2).unwrap().all_received());
}

/// etcd stopped for 20 s: no ping lost, every daemon alive, and every
/// lease renewed once etcd is back.
#[test]
fn etcd_outage_loses_nothing() {
    let cluster = cluster_with(ClusterSpec {
        nodes: 2,
        // Renew every 10 s, so renewals fall inside the outage.
        flanneld_args: vec![
            "--subnet-lease-ttl=70".into(),
            "--subnet-lease-renew-margin=1".into(),
        ],
        ..ClusterSpec::default()
    });
    let a = cluster.node(0).add_container().unwrap();
    let b = cluster.node(1).add_container().unwrap();
    cluster.wait_reachable(&a, &b).unwrap();

    let pings = ping_in_background(&a, b.ip(), 1250);
    cluster.etcd().stop_member(0).unwrap();
    thread::sleep(Duration::from_secs(20));
    cluster.etcd().start_member(0).unwrap();
    let back = lease_revisions(&cluster).0;

    let stats = pings.join().unwrap();
    assert_eq!(stats.received, stats.transmitted, "lost pings: {stats:?}");
    for node in cluster.nodes() {
        assert!(
            node.flanneld_pid().is_some(),
            "flanneld died on {}",
            node.netns()
        );
        assert!(node.wait_flanneld_exit(Duration::ZERO).is_none());
    }
    wait_for(
        "every lease renewed after the outage",
        Duration::from_secs(25),
        Duration::from_millis(500),
        || {
            let (_, mods) = lease_revisions(&cluster);
            mods.len() == 2 && mods.iter().all(|m| *m > back)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
}

/// The store revision and every lease's mod revision.
fn lease_revisions(cluster: &Cluster) -> (i64, Vec<i64>) {
    let out = cluster
        .etcd()
        .etcdctl_ok([
            "get",
            "/coreos.com/network/subnets/",
            "--prefix",
            "-w",
            "json",
        ])
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let revision = json["header"]["revision"].as_i64().unwrap();
    let mods = json["kvs"]
        .as_array()
        .map(|kvs| {
            kvs.iter()
                .filter_map(|kv| kv["mod_revision"].as_i64())
                .collect()
        })
        .unwrap_or_default();
    (revision, mods)
}

/// With a 3-member etcd, killing the leader does not disturb the daemons:
/// traffic flows and a node joining afterwards is still seen by everyone.
#[test]
fn etcd_leader_loss_is_survived() {
    let mut cluster = cluster_with(ClusterSpec {
        nodes: 2,
        etcd_members: 3,
        ..ClusterSpec::default()
    });
    let a = cluster.node(0).add_container().unwrap();
    let b = cluster.node(1).add_container().unwrap();
    cluster.wait_reachable(&a, &b).unwrap();
    // Make the first endpoint every daemon lists the leader, then kill it:
    // clients must fail over to the other members.
    make_leader(&cluster, 0);
    let pings = ping_in_background(&a, b.ip(), 250);
    let leader = cluster.etcd().leader_index().unwrap();
    assert_eq!(leader, 0);
    cluster.etcd().kill_member(leader).unwrap();
    let stats = pings.join().unwrap();
    assert_eq!(stats.received, stats.transmitted, "lost pings: {stats:?}");

    cluster.add_node().unwrap();
    let subnet = subnet_of(cluster.node(2));
    for i in 0..2 {
        let node = cluster.node(i);
        wait_for(
            &format!("route to {subnet} on node {i}"),
            Duration::from_secs(10),
            POLL,
            || has_route(node, &subnet),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    }
    assert!(cluster.nodes().iter().all(|n| n.flanneld_pid().is_some()));
}

/// Moves etcd leadership to member `i` (`etcdctl move-leader`).
fn make_leader(cluster: &Cluster, i: usize) {
    if cluster.etcd().leader_index() == Some(i) {
        return;
    }
    let endpoint = cluster.etcd().endpoint(i).unwrap();
    let status = cluster
        .etcd()
        .etcdctl_ok([
            "endpoint",
            "status",
            "-w",
            "json",
            "--endpoints",
            endpoint.as_str(),
        ])
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&status).unwrap();
    let id = json[0]["Status"]["header"]["member_id"].as_u64().unwrap();
    cluster
        .etcd()
        .etcdctl_ok(["move-leader", &format!("{id:x}")])
        .unwrap();
    wait_for(
        "the new etcd leader",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || cluster.etcd().leader_index() == Some(i),
    )
    .unwrap();
}

/// Someone deletes flannel.1: flanneld recreates it and replays every peer
/// within 2 s.
#[test]
fn deleted_device_is_restored_within_two_seconds() {
    let cluster = cluster(3);
    let a = cluster.node(0).add_container().unwrap();
    let b = cluster.node(1).add_container().unwrap();
    let c = cluster.node(2).add_container().unwrap();
    cluster.wait_reachable(&a, &b).unwrap();
    cluster.wait_reachable(&a, &c).unwrap();
    let mac_before = cluster
        .node(0)
        .exec_ok(["cat", "/sys/class/net/flannel.1/address"]);

    cluster
        .node(0)
        .exec_ok(["ip", "link", "del", "flannel.1"])
        .unwrap();
    let deleted = Instant::now();
    for peer in [&b, &c] {
        wait_for(
            &format!("{} reachable again", peer.ip()),
            Duration::from_secs(2),
            POLL,
            || a.ping(peer.ip(), 1).is_ok_and(|s| s.all_received()),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    }
    eprintln!("reachable again {:?} after the delete", deleted.elapsed());
    let mac_after = cluster
        .node(0)
        .exec_ok(["cat", "/sys/class/net/flannel.1/address"]);
    assert_eq!(
        mac_before.unwrap(),
        mac_after.unwrap(),
        "the published VTEP MAC is kept"
    );
}

/// A lease written by a flannel (Go) node, byte for byte, is honoured: a
/// hand-built flannel-style node is reached from ours and reaches us.
#[test]
fn flannel_go_lease_is_honoured() {
    let mut cluster = cluster_with(ClusterSpec {
        nodes: 1,
        ..ClusterSpec::default()
    });
    let ours = cluster.node(0).add_container().unwrap();
    let our_subnet = subnet_of(cluster.node(0));
    let our_ip = cluster.node(0).underlay_ip();
    let our_mac = cluster
        .node(0)
        .exec_ok(["cat", "/sys/class/net/flannel.1/address"])
        .unwrap();

    // A node that runs no flanneld of ours: configured as flannel would.
    let go = cluster.add_node_plain().unwrap();
    let go_ip = go.underlay_ip();
    let go_mac = "7a:11:22:33:44:55";
    let sh = |cmd: &str| go.exec_ok(["sh", "-c", cmd]).unwrap();
    sh(&format!(
        "ip link add flannel.1 type vxlan id 1 local {go_ip} dev eth0 nolearning dstport 8472 && \
         ip link set flannel.1 address {go_mac} mtu 1450 up && \
         ip addr add 10.244.200.0/32 dev flannel.1"
    ));
    let our_base = our_subnet.trim_end_matches("/24");
    let our_mac = our_mac.trim();
    sh(&format!(
        "ip neigh replace {our_base} lladdr {our_mac} dev flannel.1 nud permanent && \
         bridge fdb replace {our_mac} dev flannel.1 dst {our_ip} self permanent && \
         ip route replace {our_subnet} via {our_base} dev flannel.1 onlink"
    ));
    let theirs = go
        .add_container_in("10.244.200.0/24".parse().unwrap(), 1450)
        .unwrap();
    // Exactly what flannel v0.28 writes.
    let value = format!(
        r#"{{"PublicIP":"{go_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{go_mac}"}}}}"#
    );
    cluster
        .etcd()
        .put_leased("/coreos.com/network/subnets/10.244.200.0-24", &value, 600)
        .unwrap();
    cluster.wait_reachable(&ours, &theirs).unwrap();
    cluster.wait_reachable(&theirs, &ours).unwrap();
}

/// `--ip-masq` installs flannel's masquerade and forward rules in the node,
/// and a rule deleted or duplicated by someone else is repaired.
#[test]
fn iptables_rules_are_installed_and_repaired() {
    let cluster = cluster_with(ClusterSpec {
        nodes: 1,
        flanneld_args: vec!["--ip-masq".into(), "--iptables-resync=1".into()],
        ..ClusterSpec::default()
    });
    let node = cluster.node(0);
    let env = node.wait_subnet_env(Duration::from_secs(10)).unwrap();
    assert_eq!(env.ipmasq, Some(true));
    let subnet = env.subnet_network().unwrap().to_string();
    let rules = |table: &str, chain: &str| {
        node.exec_ok(["iptables", "-t", table, "-S", chain])
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("-A"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    wait_for(
        "masquerade rules",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || rules("nat", "FLANNEL-POSTRTG").len() == 6,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", node.log_tail(40)));
    let masq = rules("nat", "FLANNEL-POSTRTG").join("\n");
    assert!(
        masq.contains(&format!("-s {subnet} -d 10.244.0.0/16")),
        "{masq}"
    );
    assert!(masq.contains("MASQUERADE --random-fully"), "{masq}");
    assert_eq!(rules("filter", "FLANNEL-FWD").len(), 2);
    assert!(
        rules("nat", "POSTROUTING")
            .iter()
            .any(|r| r.contains("FLANNEL-POSTRTG"))
    );
    assert!(
        rules("filter", "FORWARD")
            .iter()
            .any(|r| r.contains("FLANNEL-FWD"))
    );

    // Someone deletes one rule and duplicates another: both are repaired.
    node.exec_ok(["iptables", "-t", "filter", "-D", "FLANNEL-FWD", "1"])
        .unwrap();
    node.exec_ok([
        "iptables",
        "-t",
        "nat",
        "-A",
        "FLANNEL-POSTRTG",
        "-m",
        "mark",
        "--mark",
        "0x4000/0x4000",
        "-m",
        "comment",
        "--comment",
        "flanneld masq",
        "-j",
        "RETURN",
    ])
    .unwrap();
    wait_for(
        "repaired rules",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || rules("filter", "FLANNEL-FWD").len() == 2 && rules("nat", "FLANNEL-POSTRTG").len() == 6,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", node.log_tail(40)));
}

/// A node that comes back with a new VTEP MAC (its device was recreated
/// while flanneld was down) leaves no stale FDB entry or neighbour on peers.
#[test]
fn changed_vtep_mac_leaves_nothing_stale() {
    let cluster = cluster(2);
    let a = cluster.node(0).add_container().unwrap();
    let b = cluster.node(1).add_container().unwrap();
    cluster.wait_reachable(&a, &b).unwrap();
    let mac = |node: &Node| {
        node.exec_ok(["cat", "/sys/class/net/flannel.1/address"])
            .unwrap()
            .trim()
            .to_owned()
    };
    let old_mac = mac(cluster.node(1));
    assert_eq!(
        cluster.node(1).stop_flanneld().and_then(|s| s.code()),
        Some(0)
    );
    cluster
        .node(1)
        .exec_ok(["ip", "link", "del", "flannel.1"])
        .unwrap();
    cluster.node(1).restart_flanneld().unwrap();
    wait_for(
        "a new device on node 1",
        Duration::from_secs(10),
        POLL,
        || {
            cluster
                .node(1)
                .exec_ok(["cat", "/sys/class/net/flannel.1/address"])
                .is_ok_and(|m| m.trim() != old_mac)
        },
    )
    .unwrap();
    let new_mac = mac(cluster.node(1));
    let fdb = |node: &Node| {
        node.exec_ok(["bridge", "fdb", "show", "dev", "flannel.1"])
            .unwrap()
    };
    wait_for(
        "node 0 to learn the new MAC",
        Duration::from_secs(10),
        POLL,
        || fdb(cluster.node(0)).contains(&new_mac),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    let fdb0 = fdb(cluster.node(0));
    assert!(!fdb0.contains(&old_mac), "stale FDB entry left: {fdb0}");
    let neigh0 = cluster
        .node(0)
        .exec_ok(["ip", "neigh", "show", "dev", "flannel.1"])
        .unwrap();
    assert!(
        !neigh0.contains(&old_mac) && neigh0.contains(&new_mac),
        "{neigh0}"
    );
    cluster.wait_reachable(&a, &b).unwrap();
}

/// A peer removed while a node's flanneld was down is removed from that
/// node's kernel when it starts again (full resync at start).
#[test]
fn restart_removes_peers_that_left_meanwhile() {
    let cluster = cluster(3);
    let gone = subnet_of(cluster.node(2));
    wait_for(
        "route to node 2 on node 0",
        Duration::from_secs(10),
        POLL,
        || has_route(cluster.node(0), &gone),
    )
    .unwrap();
    assert_eq!(
        cluster.node(0).stop_flanneld().and_then(|s| s.code()),
        Some(0)
    );
    assert_eq!(
        cluster.node(2).stop_flanneld().and_then(|s| s.code()),
        Some(0)
    );
    let key = format!("/coreos.com/network/subnets/{}", gone.replace('/', "-"));
    cluster.etcd().etcdctl_ok(["del", key.as_str()]).unwrap();
    assert!(
        has_route(cluster.node(0), &gone),
        "nothing removes it while flanneld is down"
    );

    cluster.node(0).restart_flanneld().unwrap();
    wait_for(
        "the stale route removed on node 0",
        Duration::from_secs(10),
        POLL,
        || !has_route(cluster.node(0), &gone),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    let neigh = cluster
        .node(0)
        .exec_ok(["ip", "neigh", "show", "dev", "flannel.1"])
        .unwrap();
    assert!(!neigh.contains(gone.trim_end_matches("/24")), "{neigh}");
    // The remaining peer is untouched.
    let kept = subnet_of(cluster.node(1));
    assert!(has_route(cluster.node(0), &kept));
}

/// With `DirectRouting`, peers on the same L2 segment are routed over the
/// underlay without the tunnel, and still reachable.
#[test]
fn direct_routing_skips_the_tunnel_on_one_segment() {
    let cluster = cluster_with(ClusterSpec {
        nodes: 2,
        config: r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#
            .into(),
        ..ClusterSpec::default()
    });
    let a = cluster.node(0).add_container().unwrap();
    let b = cluster.node(1).add_container().unwrap();
    let peer_subnet = subnet_of(cluster.node(1));
    let peer_ip = cluster.node(1).underlay_ip().to_string();
    wait_for("a direct route", Duration::from_secs(10), POLL, || {
        routes(cluster.node(0))
            .lines()
            .any(|l| l.starts_with(&peer_subnet) && l.contains(&format!("via {peer_ip} dev eth0")))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    let fdb = cluster
        .node(0)
        .exec_ok(["bridge", "fdb", "show", "dev", "flannel.1"])
        .unwrap();
    assert!(!fdb.contains("dst"), "no tunnel entries: {fdb}");
    cluster.wait_reachable(&a, &b).unwrap();
}
