//! flanneld with the VXLAN backend on an `ip netns` cluster with a real etcd.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use netns_tests::{Cluster, ClusterSpec, require_root};

fn cluster(nodes: usize) -> Cluster {
    require_root().unwrap();
    Cluster::start(ClusterSpec {
        nodes,
        ..ClusterSpec::default()
    })
    .unwrap()
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
            if a.ip() == b.ip() {
                continue;
            }
            let stats = netns_tests::wait_for(
                &format!("{} -> {}", a.ip(), b.ip()),
                Duration::from_secs(10),
                Duration::from_millis(200),
                || a.ping(b.ip(), 1).map(|s| s.all_received()).unwrap_or(false),
            );
            assert!(
                stats.is_ok(),
                "{} cannot reach {}\n{}",
                a.ip(),
                b.ip(),
                cluster.diagnostics()
            );
        }
    }
}
