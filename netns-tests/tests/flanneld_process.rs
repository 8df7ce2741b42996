//! flanneld as a process: exit codes, start-up while etcd is down, systemd
//! notification, health endpoints, and SIGTERM leaving the data path.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use netns_tests::{Cluster, ClusterSpec, flanneld_binary, require_root, run, wait_for};

/// Kills (by PID) and reaps the flanneld this test started, whatever happens.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs flanneld with `args` outside any cluster; returns (exit code, stderr).
fn flanneld(args: &[&str]) -> (Option<i32>, String) {
    let out = run(
        Command::new(flanneld_binary()).args(args),
        Duration::from_secs(10),
    )
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_exit_1_with_a_message_naming_them() {
    let (code, err) = flanneld(&["--no-such-flag"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--no-such-flag"), "{err}");
    let (code, err) = flanneld(&["--subnet-lease-renew-margin=0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("subnet-lease-renew-margin"), "{err}");
    let (code, err) = flanneld(&["--etcd-endpoints=not-a-url"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not-a-url"), "{err}");
    let (code, err) = flanneld(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(err.trim().starts_with(env!("CARGO_PKG_VERSION")), "{err}");
}

/// GET `path` from the health server inside `netns`: (status line, body).
fn http_get(netns: &str, path: &str) -> (String, String) {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/8471 && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
    );
    let out = run(
        Command::new("ip").args(["netns", "exec", netns, "bash", "-c", &script]),
        Duration::from_secs(5),
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text.lines().next().unwrap_or_default().trim().to_owned();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

#[test]
fn waits_for_etcd_then_notifies_systemd_and_serves_health() {
    require_root().unwrap();
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        start_flanneld: false,
        ..ClusterSpec::default()
    })
    .unwrap();
    let node = cluster.node(0);
    cluster.etcd().stop_member(0).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let subnet_file = dir.path().join("subnet.env");
    let log_path = dir.path().join("flanneld.log");
    let log = File::create(&log_path).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", node.netns()])
        .arg(flanneld_binary())
        .arg(format!("--etcd-endpoints={}", cluster.etcd().endpoints()))
        .arg("--iface=eth0")
        .arg(format!("--subnet-file={}", subnet_file.display()))
        .arg("--healthz-port=8471")
        .env("NOTIFY_SOCKET", &socket_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut daemon = Daemon(child);
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // etcd is down: flanneld stays up, says why, is alive but not ready.
    wait_for(
        "the config retry message",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || log_text().contains("Couldn't fetch network config"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", log_text()));
    assert!(
        matches!(daemon.0.try_wait(), Ok(None)),
        "flanneld exited:\n{}",
        log_text()
    );
    let (status, body) = http_get(node.netns(), "/healthz");
    assert!(status.ends_with("200 OK"), "{status}");
    assert_eq!(body, "flanneld is running");
    let (status, body) = http_get(node.netns(), "/readyz");
    assert!(status.contains("503"), "{status}");
    assert_eq!(body, "flanneld is not ready yet");
    assert!(!subnet_file.exists());

    // etcd is back: READY=1 arrives after the subnet file is written.
    cluster.etcd().start_member(0).unwrap();
    let mut buf = [0u8; 256];
    let n = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no READY=1: {e}\n{}", log_text()));
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    assert!(subnet_file.exists(), "subnet.env is written before READY=1");
    let (status, body) = http_get(node.netns(), "/readyz");
    assert!(status.ends_with("200 OK"), "{status}\n{}", log_text());
    assert_eq!(body, "flanneld is ready");

    // SIGTERM: exit 0, data path and lease left in place.
    run(
        Command::new("kill").args(["-TERM", &daemon.0.id().to_string()]),
        Duration::from_secs(5),
    )
    .unwrap();
    let mut status = None;
    wait_for(
        "flanneld to exit",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            status = daemon.0.try_wait().unwrap();
            status.is_some()
        },
    )
    .unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", log_text());
    assert!(log_text().contains("Exiting cleanly"));
    node.exec_ok(["ip", "link", "show", "flannel.1"]).unwrap();
    let leases = cluster
        .etcd()
        .etcdctl_ok([
            "get",
            "/coreos.com/network/subnets/",
            "--prefix",
            "--keys-only",
        ])
        .unwrap();
    assert_eq!(
        leases.lines().filter(|l| !l.is_empty()).count(),
        1,
        "{leases}"
    );
}
