//! flanneld with the `udp` backend on an `ip netns` cluster: flannel0 as
//! flannel makes it, cross-node reachability, a 200 MB TCP transfer with a
//! matching checksum, the MTU edge, ICMP net-unreachable, a spoofed datagram
//! dropped (and counted in the log and `/metrics`), peers joining and leaving
//! while traffic flows, a restart, a deleted flannel0, a UDP GSO train (USO),
//! and a hand-made flannel (Go) udp node.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use netns_tests::{Cluster, ClusterSpec, Container, Node, netns_exec, require_root, run, wait_for};

const UDP_CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;

fn udp_cluster(nodes: usize) -> Cluster {
    require_root().unwrap();
    Cluster::start(ClusterSpec {
        nodes,
        config: UDP_CONFIG.to_owned(),
        ..ClusterSpec::default()
    })
    .unwrap()
}

fn sh(c: &Container, script: &str) -> std::process::Output {
    c.exec(["sh", "-c", script]).unwrap()
}

#[test]
fn flannel0_is_configured_as_flannel_does_and_containers_reach_each_other() {
    let cluster = udp_cluster(3);
    for node in cluster.nodes() {
        let env = node.wait_subnet_env(Duration::from_secs(30)).unwrap();
        assert_eq!(env.mtu, Some(1472), "underlay 1500 - 28");
        let link = node
            .exec_ok(["ip", "-d", "link", "show", "flannel0"])
            .unwrap();
        assert!(link.contains("mtu 1472") && link.contains("tun"), "{link}");
        let subnet = env.subnet_network().unwrap();
        let addr = node
            .exec_ok(["ip", "-4", "-o", "addr", "show", "flannel0"])
            .unwrap();
        assert!(addr.contains(&format!("{}/32", subnet.network())), "{addr}");
        let route = node
            .exec_ok(["ip", "route", "show", "10.244.0.0/16"])
            .unwrap();
        assert!(route.contains("dev flannel0"), "{route}");
    }
    let containers: Vec<Container> = cluster
        .nodes()
        .iter()
        .map(|n| n.add_container().unwrap())
        .collect();
    for a in &containers {
        for b in &containers {
            if a != b {
                cluster.wait_reachable(a, b).unwrap();
            }
        }
    }
}

#[test]
fn a_200_mb_transfer_arrives_intact() {
    let cluster = udp_cluster(2);
    let a = cluster.node(0).add_container().unwrap();
    let b = cluster.node(1).add_container().unwrap();
    cluster.wait_reachable(&a, &b).unwrap();
    let dir = cluster.dir().join("transfer");
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join("source");
    let sink = dir.join("sink");
    run(
        Command::new("sh").arg("-c").arg(format!(
            "head -c 200000000 /dev/urandom > {}",
            source.display()
        )),
        Duration::from_secs(60),
    )
    .unwrap();
    let mut receiver = Command::new("ip")
        .args([
            "netns",
            "exec",
            b.netns(),
            "timeout",
            "60",
            "busybox",
            "nc",
            "-l",
            "-p",
            "5001",
        ])
        .stdout(std::fs::File::create(&sink).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let send = sh(
        &a,
        &format!(
            "timeout 60 bash -c 'cat {} > /dev/tcp/{}/5001'",
            source.display(),
            b.ip()
        ),
    );
    let status = receiver.wait().unwrap();
    let elapsed = started.elapsed();
    assert!(
        send.status.success(),
        "{}",
        String::from_utf8_lossy(&send.stderr)
    );
    assert!(
        status.success() || status.code() == Some(0),
        "receiver: {status}"
    );
    let sum = |p: &std::path::Path| {
        let out = run(Command::new("sha256sum").arg(p), Duration::from_secs(60)).unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(std::fs::metadata(&sink).unwrap().len(), 200_000_000);
    assert_eq!(sum(&source), sum(&sink), "the data changed on the way");
    eprintln!(
        "200 MB in {elapsed:?} ({:.2} Gbit/s)",
        1.6 / elapsed.as_secs_f64()
    );
}

#[test]
fn mtu_sized_packets_pass_and_one_byte_more_does_not() {
    let cluster = udp_cluster(2);
    let a = cluster.node(0).add_container().unwrap();
    let b = cluster.node(1).add_container().unwrap();
    cluster.wait_reachable(&a, &b).unwrap();
    // 1472 - 20 (IP) - 8 (ICMP) = 1444 bytes of payload fill the MTU exactly.
    let fits = sh(&a, &format!("ping -c 2 -W 2 -M do -s 1444 {}", b.ip()));
    assert!(
        fits.status.success(),
        "{}",
        String::from_utf8_lossy(&fits.stdout)
    );
    let over = sh(&a, &format!("ping -c 1 -W 2 -M do -s 1445 {}", b.ip()));
    assert!(
        !over.status.success(),
        "a packet over the MTU must not pass"
    );
}

#[test]
fn an_unknown_subnet_gets_icmp_net_unreachable() {
    let cluster = udp_cluster(1);
    let a = cluster.node(0).add_container().unwrap();
    let out = sh(&a, "ping -c 1 -W 2 10.244.250.9");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains("Destination Net Unreachable"),
        "{text}\n{}",
        cluster.diagnostics()
    );
}

#[test]
fn a_spoofed_datagram_from_a_non_peer_is_dropped() {
    let mut cluster = udp_cluster(2);
    let a = cluster.node(0).add_container().unwrap();
    let b = cluster.node(1).add_container().unwrap();
    cluster.wait_reachable(&a, &b).unwrap();
    let stranger = cluster.add_node_plain().unwrap().netns().to_owned();
    // From a namespace on the underlay that is not a peer: a UDP datagram
    // to node 1's flannel port carrying an ICMP echo from a's address to b.
    let packet = echo_request(a.ip(), b.ip());
    let hex: String = packet.iter().map(|b| format!("{b:02x}")).collect();
    let target = cluster.node(1).underlay_ip();
    let capture = Command::new("ip")
        .args([
            "netns",
            "exec",
            b.netns(),
            "timeout",
            "3",
            "tcpdump",
            "-n",
            "-c",
            "1",
            "-i",
            "eth0",
            "icmp",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    let sent = netns_exec(
        &stranger,
        [
            "/usr/bin/python3",
            "-c",
            &format!(
                "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\
                 .sendto(bytes.fromhex('{hex}'), ('{target}', 8285))"
            ),
        ],
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let out = capture.wait_with_output().unwrap();
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(
        !seen.contains("ICMP echo request"),
        "the spoofed packet got through: {seen}"
    );
    let log = wait_for(
        "the drop to be logged",
        Duration::from_secs(5),
        Duration::from_millis(200),
        || cluster.node(1).log_tail(200).contains("unknown_sender"),
    );
    assert!(log.is_ok(), "{}", cluster.node(1).log_tail(50));
    let metrics = metrics(cluster.node(1));
    assert!(
        metrics.contains("flannel_udp_dropped_total{reason=\"unknown_sender\"} 1"),
        "{metrics}"
    );
}

#[test]
fn peers_join_and_leave_while_traffic_flows() {
    let mut cluster = udp_cluster(2);
    let a = cluster.node(0).add_container().unwrap();
    let b = cluster.node(1).add_container().unwrap();
    cluster.wait_reachable(&a, &b).unwrap();
    let pinger = {
        let netns = a.netns().to_owned();
        let to = b.ip();
        thread::spawn(move || netns_tests::ping(&netns, to, 100, Duration::from_millis(20)))
    };
    cluster.add_node().unwrap();
    let c = cluster.node(2).add_container().unwrap();
    cluster.wait_reachable(&a, &c).unwrap();
    cluster.wait_reachable(&c, &b).unwrap();
    leave(&cluster, cluster.node(2));
    let gone = wait_for(
        "node 2's lease to leave node 0's peers",
        Duration::from_secs(5),
        Duration::from_millis(100),
        || a.ping(c.ip(), 1).is_ok_and(|s| s.received == 0),
    );
    assert!(gone.is_ok());
    let stats = pinger.join().unwrap().unwrap();
    assert!(
        stats.all_received(),
        "a -> b lost packets while a peer came and went: {stats:?}"
    );
}

/// A node leaves for good: flanneld stops and its lease is deleted.
fn leave(cluster: &Cluster, node: &Node) {
    let env = node.wait_subnet_env(Duration::from_secs(5)).unwrap();
    let subnet = env.subnet_network().unwrap();
    node.stop_flanneld();
    let key = format!(
        "/coreos.com/network/subnets/{}-{}",
        subnet.network(),
        subnet.prefix()
    );
    cluster.etcd().etcdctl_ok(["del", &key]).unwrap();
}

/// An IPv4 ICMP echo request from `src` to `dst`, checksums correct.
fn echo_request(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![
        0x45, 0, 0, 28, 0x12, 0x34, 0, 0, 64, 1, 0, 0, // header up to checksum
    ];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[8, 0, 0, 0, 0x42, 0x42, 0, 1]);
    let ip_sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    let icmp_sum = checksum(&p[20..]);
    p[22..24].copy_from_slice(&icmp_sum.to_be_bytes());
    p
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(0)
}

/// A flanneld restart (SIGTERM, start again) interrupts the userspace data
/// path for well under a second and keeps the lease.
#[test]
fn a_restart_interrupts_traffic_briefly_and_keeps_the_lease() {
    let cluster = udp_cluster(2);
    let a = cluster.node(0).add_container().unwrap();
    let b = cluster.node(1).add_container().unwrap();
    cluster.wait_reachable(&a, &b).unwrap();
    let before = cluster
        .node(1)
        .wait_subnet_env(Duration::from_secs(5))
        .unwrap()
        .subnet_network();
    let pinger = {
        let netns = a.netns().to_owned();
        let to = b.ip();
        // 3 s of pings every 10 ms.
        thread::spawn(move || netns_tests::ping(&netns, to, 300, Duration::from_millis(10)))
    };
    thread::sleep(Duration::from_millis(500));
    let restarted = Instant::now();
    cluster.node(1).restart_flanneld().unwrap();
    let took = restarted.elapsed();
    let stats = pinger.join().unwrap().unwrap();
    let lost = stats.transmitted - stats.received;
    eprintln!(
        "restart took {took:?}; {lost} of {} pings lost",
        stats.transmitted
    );
    assert!(
        lost < 50,
        "{lost} pings at 10 ms lost: the data path stopped for about {} ms",
        lost * 10
    );
    let after = cluster
        .node(1)
        .wait_subnet_env(Duration::from_secs(5))
        .unwrap()
        .subnet_network();
    assert_eq!(after, before, "the restarted node kept its subnet");
}

/// A node that speaks flannel (Go)'s udp wire format, made by hand: its
/// lease is exactly what flannel writes for udp (no BackendType), and it
/// exchanges bare IPv4 packets in UDP datagrams on port 8285 with ours.
#[test]
fn a_flannel_go_udp_node_talks_to_ours() {
    let mut cluster = udp_cluster(1);
    let ours = cluster.node(0).add_container().unwrap();
    let go = cluster.add_node_plain().unwrap().netns().to_owned();
    let go_ip = cluster.node(1).underlay_ip();
    let our_ip = cluster.node(0).underlay_ip();
    // Exactly what flannel v0.28's udp backend writes.
    let value = format!(r#"{{"PublicIP":"{go_ip}","PublicIPv6":null}}"#);
    cluster
        .etcd()
        .put_leased("/coreos.com/network/subnets/10.244.200.0-24", &value, 600)
        .unwrap();
    // The "Go node": sends an echo request from 10.244.200.5 to our
    // container in a bare UDP datagram and waits for the bare reply.
    let request: String = echo_request(Ipv4Addr::new(10, 244, 200, 5), ours.ip())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let script = format!(
        "import socket, sys\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('{go_ip}', 8285))\n\
         s.settimeout(1.0)\n\
         for attempt in range(20):\n\
         \x20   s.sendto(bytes.fromhex('{request}'), ('{our_ip}', 8285))\n\
         \x20   try:\n\
         \x20       data, peer = s.recvfrom(65535)\n\
         \x20   except socket.timeout:\n\
         \x20       continue\n\
         \x20   print(peer[0], peer[1], data.hex())\n\
         \x20   sys.exit(0)\n\
         sys.exit(1)\n"
    );
    let out = netns_exec(
        &go,
        ["/usr/bin/python3", "-c", &script],
        Duration::from_secs(40),
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "no reply from our node: {text} {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.diagnostics()
    );
    let mut fields = text.split_whitespace();
    assert_eq!(
        fields.next(),
        Some(our_ip.to_string().as_str()),
        "reply from our underlay IP"
    );
    assert_eq!(fields.next(), Some("8285"), "reply from flannel's port");
    let reply: Vec<u8> = fields
        .next()
        .unwrap()
        .as_bytes()
        .chunks(2)
        .map(|h| u8::from_str_radix(std::str::from_utf8(h).unwrap(), 16).unwrap())
        .collect();
    // A bare IPv4 packet: an echo reply from our container to the Go node's
    // container, TTL decremented by our node on the way out.
    assert_eq!(reply[0], 0x45, "an IPv4 header with no prefix");
    assert_eq!(&reply[12..16], &ours.ip().octets());
    assert_eq!(&reply[16..20], &[10, 244, 200, 5]);
    assert_eq!(reply[9], 1, "ICMP");
    assert_eq!(reply[20], 0, "echo reply");
}

/// `flannel0` deleted by hand (a network restart script, NetworkManager):
/// flanneld recreates it with its address and route, and traffic flows again.
#[test]
fn a_deleted_flannel0_is_recreated() {
    let cluster = udp_cluster(2);
    let a = cluster.node(0).add_container().unwrap();
    let b = cluster.node(1).add_container().unwrap();
    cluster.wait_reachable(&a, &b).unwrap();
    cluster
        .node(1)
        .exec_ok(["ip", "link", "del", "flannel0"])
        .unwrap();
    let deleted = Instant::now();
    cluster.wait_reachable(&a, &b).unwrap();
    eprintln!("reachable again {:?} after the deletion", deleted.elapsed());
    let route = cluster
        .node(1)
        .exec_ok(["ip", "route", "show", "10.244.0.0/16"])
        .unwrap();
    assert!(route.contains("dev flannel0"), "{route}");
    assert!(
        cluster.node(1).log_tail(100).contains("recreating it"),
        "{}",
        cluster.node(1).log_tail(30)
    );
}

/// A container sending with UDP GSO (one 12,000-byte send in 1,200-byte
/// segments) through the udp backend: with USO on flannel0 the train
/// crosses as one super-packet and is split by flanneld; either way the
/// receiver gets ten 1,200-byte datagrams, intact.
#[test]
fn a_udp_gso_train_arrives_as_its_datagrams() {
    let cluster = udp_cluster(2);
    let a = cluster.node(0).add_container().unwrap();
    let b = cluster.node(1).add_container().unwrap();
    cluster.wait_reachable(&a, &b).unwrap();
    // USO is on unless flanneld said the kernel lacks it.
    let features = cluster
        .node(0)
        .exec_ok(["ethtool", "-k", "flannel0"])
        .unwrap();
    let uso_on = features.contains("tx-udp-segmentation: on");
    let uso_missing = cluster
        .node(0)
        .log_tail(200)
        .contains("(USO) is not available");
    assert!(
        uso_on != uso_missing,
        "USO on: {uso_on}, reported missing: {uso_missing}"
    );
    let receiver = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('{}', 7000))\n\
         s.settimeout(10)\n\
         got = [s.recv(65535) for _ in range(10)]\n\
         print(' '.join(str(len(d)) for d in got))\n\
         print(all(d == bytes([i]) * 1200 for i, d in enumerate(got)))\n",
        b.ip()
    );
    let listener = Command::new("ip")
        .args([
            "netns",
            "exec",
            b.netns(),
            "timeout",
            "20",
            "/usr/bin/python3",
            "-c",
            &receiver,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    let sent_before = sent_total(cluster.node(0));
    let sender = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.SOL_UDP, 103, 1200)  # UDP_SEGMENT\n\
         s.sendto(b''.join(bytes([i]) * 1200 for i in range(10)), ('{}', 7000))\n",
        b.ip()
    );
    let sent = netns_exec(
        a.netns(),
        ["/usr/bin/python3", "-c", &sender],
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let out = listener.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        "1200 1200 1200 1200 1200 1200 1200 1200 1200 1200\nTrue",
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.node(0).log_tail(20)
    );
    // One GSO send, ten packets on the wire: the counter counts packets.
    let sent = sent_total(cluster.node(0)) - sent_before;
    assert!(sent >= 10, "flannel_udp_sent_total grew by {sent}");
}

/// The node's `/metrics` page (health port 8471, as the harness starts flanneld).
fn metrics(node: &Node) -> String {
    node.exec_ok([
        "bash",
        "-c",
        "exec 3<>/dev/tcp/127.0.0.1/8471 && printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3",
    ])
    .unwrap()
}

/// `flannel_udp_sent_total` of the node.
fn sent_total(node: &Node) -> u64 {
    let page = metrics(node);
    page.lines()
        .find_map(|l| l.strip_prefix("flannel_udp_sent_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no flannel_udp_sent_total in {page}"))
}
