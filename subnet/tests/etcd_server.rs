//! Checks the etcd test-support server itself: start, put/get through `etcdctl`, stop (port
//! refuses connections), restart on the same data dir and ports (the key survives).

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::etcd_server::EtcdServer;

/// Start, use, stop, restart: the data dir and the ports survive a restart.
#[test]
fn etcd_server_start_stop_restart_keeps_data() {
    let mut server = EtcdServer::start();
    assert!(server.is_running());
    let endpoint = server.endpoint();
    assert!(endpoint.starts_with("http://127.0.0.1:"), "{endpoint}");

    let health = server.etcdctl(&["endpoint", "health"]);
    assert!(
        health.status.success(),
        "etcdctl endpoint health failed: {}{}",
        String::from_utf8_lossy(&health.stdout),
        String::from_utf8_lossy(&health.stderr)
    );

    server.etcdctl_ok(&[
        "put",
        "/coreos.com/network/config",
        r#"{"Network":"10.244.0.0/16"}"#,
    ]);
    let got = server.etcdctl_ok(&["get", "--print-value-only", "/coreos.com/network/config"]);
    assert_eq!(got.trim(), r#"{"Network":"10.244.0.0/16"}"#);

    server.stop();
    assert!(!server.is_running());
    let refused = TcpStream::connect_timeout(&server.client_addr(), Duration::from_secs(1));
    assert!(
        refused.is_err(),
        "client port {} still accepts connections after stop()",
        server.client_port()
    );
    // Stopping twice is harmless.
    server.stop();

    server.restart();
    assert!(server.is_running());
    assert_eq!(
        server.endpoint(),
        endpoint,
        "restart must keep the client port"
    );
    let got = server.etcdctl_ok(&["get", "--print-value-only", "/coreos.com/network/config"]);
    assert_eq!(
        got.trim(),
        r#"{"Network":"10.244.0.0/16"}"#,
        "data dir was not kept"
    );
}

/// Extra flags are passed through, and two servers in one process get distinct ports.
#[test]
fn etcd_server_extra_args_and_parallel_servers() {
    let a = EtcdServer::start_with_args(&["--auto-compaction-retention=1"]);
    let b = EtcdServer::start();
    assert_ne!(a.endpoint(), b.endpoint());
    a.etcdctl_ok(&["put", "k", "a"]);
    b.etcdctl_ok(&["put", "k", "b"]);
    assert_eq!(
        a.etcdctl_ok(&["get", "--print-value-only", "k"]).trim(),
        "a"
    );
    assert_eq!(
        b.etcdctl_ok(&["get", "--print-value-only", "k"]).trim(),
        "b"
    );
}
