//! Self-tests of the cluster harness. They need root (they create network
//! namespaces) and fail loudly without it. None of them needs flanneld: a
//! small shell stub stands in for it where a daemon is needed.

// Test helpers may unwrap: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use netns_tests::{
    Cluster, ClusterSpec, DEFAULT_NETWORK_CONFIG, HarnessError, ip, is_root, list_netns,
    sweep_stale, unique_prefix, wait_for,
};

/// Panics unless we are root: these tests never skip.
fn require_root() {
    assert!(
        is_root(),
        "the netns-tests harness tests must run as root (they create network namespaces); \
         run them with sudo"
    );
}

/// A spec without flanneld.
fn spec(nodes: usize, etcd_members: usize) -> ClusterSpec {
    ClusterSpec {
        nodes,
        etcd_members,
        start_flanneld: false,
        ..ClusterSpec::default()
    }
}

/// Asserts that nothing of a dropped cluster remains: no namespace with its
/// prefix, no process with the given PIDs, no directory.
fn assert_gone(prefix: &str, pids: &[u32], dir: &Path) {
    let own = format!("{prefix}-");
    let left: Vec<String> = list_netns()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(&own))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still exists after the cluster was dropped"
        );
    }
    assert!(!dir.exists(), "{} still exists", dir.display());
}

/// Asserts that the root namespace has no address in the underlay range.
fn assert_root_namespace_untouched() {
    let addrs = ip(["-o", "-4", "addr"]).unwrap();
    assert!(
        !addrs.contains(" 198.18.") && !addrs.contains(" 198.19."),
        "an underlay address leaked into the root namespace:\n{addrs}"
    );
}

#[test]
fn two_nodes_reach_each_other_etcd_and_containers() {
    require_root();
    let cluster = Cluster::start(spec(2, 1)).unwrap();
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let net = cluster.underlay_net();
    assert_eq!(net.prefix(), 24);
    assert!(net.contains(n0.underlay_ip()) && net.contains(n1.underlay_ip()));
    assert_eq!(n0.underlay_ip().octets()[3], 10);
    assert_eq!(n1.underlay_ip().octets()[3], 11);
    assert_eq!(n1.netns(), format!("{}-n1", cluster.prefix()));

    // Underlay.
    let stats = n0.ping(n1.underlay_ip(), 3).unwrap();
    assert!(stats.all_received(), "n0 -> n1: {stats:?}");
    assert!(stats.rtt_avg_ms.is_some());
    let stats = n1.ping(n0.underlay_ip(), 3).unwrap();
    assert!(stats.all_received(), "n1 -> n0: {stats:?}");
    let forward = n0.exec_ok(["sysctl", "-n", "net.ipv4.ip_forward"]).unwrap();
    assert_eq!(forward.trim(), "1");
    let eth0 = n0.exec_ok(["ip", "-o", "link", "show", "eth0"]).unwrap();
    assert!(eth0.contains("mtu 1500"), "{eth0}");

    // etcd: from its own namespace, and from a node.
    let etcd = cluster.etcd();
    assert_eq!(etcd.member_count(), 1);
    assert_eq!(
        etcd.member_netns(0).unwrap(),
        format!("{}-etcd", cluster.prefix())
    );
    etcd.put("/netns-tests/hello", "world").unwrap();
    assert_eq!(
        etcd.get("/netns-tests/hello").unwrap().as_deref(),
        Some("world")
    );
    assert_eq!(etcd.get("/netns-tests/none").unwrap(), None);
    assert_eq!(
        etcd.get("/coreos.com/network/config").unwrap().as_deref(),
        Some(DEFAULT_NETWORK_CONFIG)
    );
    let out = etcd.etcdctl(["get", "/netns-tests/hello"]).unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/netns-tests/hello\nworld\n"
    );
    let endpoints = format!("--endpoints={}", etcd.endpoints());
    let out = n1
        .exec([
            "etcdctl",
            &endpoints,
            "--dial-timeout=2s",
            "endpoint",
            "health",
        ])
        .unwrap();
    assert!(
        out.status.success(),
        "a node cannot reach etcd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = etcd.etcdctl_in(n0.netns(), ["endpoint", "health"]).unwrap();
    assert!(out.status.success());

    // Two containers on node 0 in a hand-made subnet.
    let subnet = "10.244.77.0/24".parse().unwrap();
    let a = n0.add_container_in(subnet, 1450).unwrap();
    let b = n0.add_container_in(subnet, 1450).unwrap();
    assert_eq!(a.ip(), Ipv4Addr::new(10, 244, 77, 2));
    assert_eq!(b.ip(), Ipv4Addr::new(10, 244, 77, 3));
    assert_eq!(a.gateway(), Ipv4Addr::new(10, 244, 77, 1));
    assert_eq!(a.netns(), format!("{}c0", n0.netns()));
    assert!(a.ping(b.ip(), 3).unwrap().all_received());
    assert!(b.ping(a.ip(), 3).unwrap().all_received());
    assert!(a.ping(a.gateway(), 2).unwrap().all_received());
    let link =
        String::from_utf8(a.exec(["ip", "-o", "link", "show", "eth0"]).unwrap().stdout).unwrap();
    assert!(link.contains("mtu 1450"), "{link}");
    let other = "10.244.78.0/24".parse().unwrap();
    assert!(
        matches!(
            n0.add_container_in(other, 1450),
            Err(HarnessError::Invalid(_))
        ),
        "a second subnet on one node must be refused"
    );
    assert_eq!(n0.containers().len(), 2);
    n0.remove_container(&b).unwrap();
    assert!(!list_netns().unwrap().contains(&b.netns().to_owned()));
    assert_eq!(n0.containers(), vec![a.clone()]);

    assert_root_namespace_untouched();

    let prefix = cluster.prefix().to_owned();
    let etcd_pid = etcd.member_pid(0).unwrap();
    let dir = cluster.dir().to_owned();
    drop(cluster);
    assert_gone(&prefix, &[etcd_pid], &dir);
}

#[test]
fn three_member_etcd_elects_a_new_leader_after_the_leader_dies() {
    require_root();
    let cluster = Cluster::start(spec(1, 3)).unwrap();
    let etcd = cluster.etcd();
    assert_eq!(etcd.member_count(), 3);
    assert_eq!(etcd.endpoints().split(',').count(), 3);
    assert_eq!(
        etcd.member_netns(2).unwrap(),
        format!("{}-etcd3", cluster.prefix())
    );

    let out = etcd.etcdctl(["endpoint", "health"]).unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for i in 0..3 {
        let ep = etcd.endpoint(i).unwrap();
        assert!(
            text.contains(&format!("{ep} is healthy")),
            "{ep} not healthy:\n{text}"
        );
    }
    assert!(etcd.is_healthy());

    let mut leader = None;
    wait_for(
        "a leader",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || {
            leader = etcd.leader_index();
            leader.is_some()
        },
    )
    .unwrap();
    let leader = leader.unwrap();
    let pids: Vec<u32> = (0..3).map(|i| etcd.member_pid(i).unwrap()).collect();

    let status = etcd.kill_member(leader).unwrap().unwrap();
    assert_eq!(status.signal(), Some(9));
    assert_eq!(etcd.member_pid(leader), None);
    assert!(!Path::new(&format!("/proc/{}", pids[leader])).exists());

    let mut new_leader = None;
    wait_for(
        "a new healthy leader",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || {
            new_leader = etcd.leader_index();
            etcd.is_healthy() && new_leader.is_some_and(|l| l != leader)
        },
    )
    .unwrap();
    etcd.put("/netns-tests/after", "leader-kill").unwrap();
    let node_ns = cluster.node(0).netns();
    let out = etcd
        .etcdctl_in(node_ns, ["get", "/netns-tests/after"])
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("leader-kill"));

    // The killed member comes back on its data dir and catches up.
    etcd.start_member(leader).unwrap();
    assert!(etcd.is_healthy());
    let ep = etcd.endpoint(leader).unwrap();
    let out = etcd
        .etcdctl_ok([
            &format!("--endpoints={ep}"),
            "get",
            "/netns-tests/after",
            "--print-value-only",
            "--consistency=s",
        ])
        .unwrap();
    assert_eq!(out.trim(), "leader-kill");

    let prefix = cluster.prefix().to_owned();
    let mut pids = pids;
    pids.push(etcd.member_pid(leader).unwrap());
    let dir = cluster.dir().to_owned();
    drop(cluster);
    assert_gone(&prefix, &pids, &dir);
}

/// A stand-in for flanneld: parses `--subnet-file=`, routes every possible
/// peer subnet `10.244.<host>.0/24` host-gw style via `198.18.<k>.<host>`,
/// writes subnet.env for `10.244.<own host>.0/24` and runs until SIGTERM.
const STUB_FLANNELD: &str = r#"#!/bin/sh
set -eu
trap 'echo "stub flanneld: TERM"; exit 0' TERM
subnet_file=
for arg in "$@"; do
    case "$arg" in --subnet-file=*) subnet_file=${arg#--subnet-file=} ;; esac
done
echo "stub flanneld: args $*"
set -- $(ip -4 -o addr show dev eth0)
addr=${4%/*}
net=${addr%.*}
me=${addr##*.}
for peer in $(seq 10 20); do
    [ "$peer" = "$me" ] || ip route replace "10.244.$peer.0/24" via "$net.$peer" dev eth0
done
printf 'FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.%s.1/24\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n' \
    "$me" >"$subnet_file.tmp"
mv "$subnet_file.tmp" "$subnet_file"
while :; do sleep 0.1; done
"#;

/// Writes [`STUB_FLANNELD`] into `dir` and returns its path.
fn write_stub(dir: &Path) -> PathBuf {
    let path = dir.join("stub-flanneld");
    std::fs::write(&path, STUB_FLANNELD).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn flanneld_lifecycle_with_a_stub_daemon_and_cross_node_containers() {
    require_root();
    let stub_dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        start_flanneld: true,
        flanneld_args: vec!["--from-spec".into()],
        flanneld_bin: Some(write_stub(stub_dir.path())),
        ..ClusterSpec::default()
    })
    .unwrap();
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let env0 = n0.wait_subnet_env(Duration::from_secs(1)).unwrap();
    assert_eq!(env0.subnet.unwrap().to_string(), "10.244.10.1/24");
    assert_eq!(env0.mtu, Some(1500));
    let env1 = n1.wait_subnet_env(Duration::from_secs(1)).unwrap();
    assert_eq!(env1.subnet.unwrap().to_string(), "10.244.11.1/24");
    let log = std::fs::read_to_string(n0.log_path()).unwrap();
    for expected in [
        format!("--etcd-endpoints={}", cluster.etcd().endpoints()),
        "--iface=eth0".to_owned(),
        format!("--subnet-file={}", n0.subnet_file().display()),
        "--healthz-port=8471".to_owned(),
        "--from-spec".to_owned(),
    ] {
        assert!(log.contains(&expected), "{expected} not in the log:\n{log}");
    }

    // Containers from subnet.env, across nodes (the stub routes host-gw style).
    let a = n0.add_container().unwrap();
    let b = n1.add_container().unwrap();
    assert_eq!(a.ip(), Ipv4Addr::new(10, 244, 10, 2));
    assert_eq!(b.ip(), Ipv4Addr::new(10, 244, 11, 2));
    let stats = a.ping(b.ip(), 3).unwrap();
    assert!(stats.all_received(), "a -> b: {stats:?}");
    assert!(b.ping(a.ip(), 3).unwrap().all_received());

    // Second start while running is refused.
    assert!(matches!(
        n0.start_flanneld(&[]),
        Err(HarnessError::Invalid(_))
    ));

    // SIGTERM, then restart.
    let pid = n0.flanneld_pid().unwrap();
    n0.signal_flanneld("TERM").unwrap();
    let status = n0.wait_flanneld_exit(Duration::from_secs(5)).unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(n0.flanneld_pid(), None);
    assert!(
        n0.signal_flanneld("TERM").is_err(),
        "signalling an exited daemon"
    );
    n0.restart_flanneld().unwrap();
    let new_pid = n0.flanneld_pid().unwrap();
    assert_ne!(pid, new_pid);
    n0.wait_subnet_env(Duration::from_secs(10)).unwrap();
    assert!(
        std::fs::read_to_string(n0.log_path())
            .unwrap()
            .contains("stub flanneld: TERM")
    );

    // SIGKILL, then a start with extra arguments.
    n1.signal_flanneld("KILL").unwrap();
    let status = n1.wait_flanneld_exit(Duration::from_secs(5)).unwrap();
    assert_eq!(status.signal(), Some(9));
    std::fs::remove_file(n1.subnet_file()).unwrap();
    n1.start_flanneld(&["--extra-arg"]).unwrap();
    n1.wait_subnet_env(Duration::from_secs(10)).unwrap();
    assert!(
        std::fs::read_to_string(n1.log_path())
            .unwrap()
            .contains("--extra-arg")
    );
    // Restart keeps the extra arguments; stop_flanneld gets TERM through.
    n1.restart_flanneld().unwrap();
    // Each start logs its command line, and the stub echoes its arguments.
    let extra_in_log = || {
        let log = std::fs::read_to_string(n1.log_path()).unwrap();
        log.matches("--extra-arg").count() == 2 * 2
    };
    wait_for(
        "the restart's log lines",
        Duration::from_secs(5),
        Duration::from_millis(50),
        extra_in_log,
    )
    .unwrap();
    assert!(n1.stop_flanneld().unwrap().success());
    n1.start_flanneld(&[]).unwrap();

    // Traffic still flows after all that.
    assert!(a.ping(b.ip(), 2).unwrap().all_received());

    let prefix = cluster.prefix().to_owned();
    let pids = [
        n0.flanneld_pid().unwrap(),
        n1.flanneld_pid().unwrap(),
        cluster.etcd().member_pid(0).unwrap(),
    ];
    let dir = cluster.dir().to_owned();
    drop(cluster);
    assert_gone(&prefix, &pids, &dir);
}

#[test]
fn a_panicking_test_still_cleans_up() {
    require_root();
    let (tx, rx) = mpsc::channel();
    let joined = thread::spawn(move || {
        let cluster = Cluster::start(spec(1, 1)).unwrap();
        cluster
            .node(0)
            .add_container_in("10.244.9.0/24".parse().unwrap(), 1500)
            .unwrap();
        tx.send((
            cluster.prefix().to_owned(),
            cluster.etcd().member_pid(0).unwrap(),
            cluster.dir().to_owned(),
        ))
        .unwrap();
        panic!("deliberate panic: the drop guard must clean up and print diagnostics");
    })
    .join();
    assert!(joined.is_err(), "the thread should have panicked");
    let (prefix, pid, dir) = rx.recv().unwrap();
    assert_gone(&prefix, &[pid], &dir);
}

/// Deletes a hand-made namespace on drop.
struct NsGuard(String);

impl Drop for NsGuard {
    fn drop(&mut self) {
        let _ = ip(["netns", "del", &self.0]);
    }
}

#[test]
fn sweep_deletes_namespaces_of_dead_processes_only() {
    require_root();
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    assert!(!Path::new(&format!("/proc/{dead}")).exists());

    let stale = NsGuard(format!("ft{dead}x0-sweeptest"));
    let live = NsGuard(format!("{}-sweeptest", unique_prefix()));
    ip(["netns", "add", &stale.0]).unwrap();
    ip(["netns", "add", &live.0]).unwrap();

    // Another test process may sweep `stale` first; either way it must go.
    let _ = sweep_stale().unwrap();
    let names = list_netns().unwrap();
    assert!(
        !names.contains(&stale.0),
        "stale {} survived the sweep",
        stale.0
    );
    assert!(
        names.contains(&live.0),
        "the sweep deleted {} of a live process",
        live.0
    );
}

#[test]
fn a_missing_flanneld_binary_says_how_to_build_it() {
    require_root();
    let err = Cluster::start(ClusterSpec {
        nodes: 1,
        start_flanneld: true,
        flanneld_bin: Some("/nonexistent/flanneld".into()),
        ..ClusterSpec::default()
    })
    .unwrap_err();
    assert!(matches!(err, HarnessError::FlanneldMissing { .. }), "{err}");
    assert!(err.to_string().contains("cargo build -p flanneld"), "{err}");
}

#[test]
fn bad_specs_are_refused() {
    require_root();
    let err = Cluster::start(spec(1, 2)).unwrap_err();
    assert!(err.to_string().contains("1 or 3"), "{err}");
}
