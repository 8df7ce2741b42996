//! What only a real etcd can show: a node living through an etcd restart,
//! and a node whose lease expires while it is cut off from etcd.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::harness::{EtcdHarness, Harness};
use common::nodes::{Running, acquire, attrs, manager};
use subnet::manager::{ManagerEvent, ManagerOptions};
use subnet::store::LeaseStore;
use subnet::watch::LeaseEvent;

/// etcd stops for 3 s and comes back on the same data; peers change and
/// history is compacted afterwards. The node's view ends exactly right, with
/// no event lost or invented, its own lease untouched, and renewals resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_etcd_restart_and_compaction() {
    let mut h = EtcdHarness::new().await;
    let options = ManagerOptions {
        ttl: Duration::from_secs(12),
        renew_margin: Duration::from_secs(9),
        renew_retry: Duration::from_millis(300),
        max_backoff: Duration::from_millis(500),
    };
    let mut node = manager(h.node_store().await, 1, options);
    let own = node.acquire(None).await.unwrap();
    let own_key = own.stored.lease.key;
    let b = acquire(&h, 2).await.stored.lease;
    let c = acquire(&h, 3).await.stored.lease;
    let mut running = Running::start(node, own);
    running
        .wait_until(Duration::from_secs(5), "peers b and c", |r| {
            r.view.len() == 2
        })
        .await;

    h.server.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    h.server.restart();

    let d = acquire(&h, 4).await.stored.lease;
    h.delete_raw(&b.key.to_string()).await;
    h.compact().await;

    let mut expected = vec![c.key, d.key];
    expected.sort();
    running
        .wait_until(Duration::from_secs(20), "peers c and d", |r| {
            r.peer_keys() == expected
        })
        .await;
    let renewals_before = running.count(|e| matches!(e, ManagerEvent::LeaseRenewed { .. }));
    running
        .wait_until(
            Duration::from_secs(10),
            "a renewal after the restart",
            |r| r.count(|e| matches!(e, ManagerEvent::LeaseRenewed { .. })) > renewals_before,
        )
        .await;

    let removed_b =
        running.count_changes(|e| matches!(e, LeaseEvent::Removed(l) if l.key == b.key));
    let removed_c =
        running.count_changes(|e| matches!(e, LeaseEvent::Removed(l) if l.key == c.key));
    let added_d = running.count_changes(|e| matches!(e, LeaseEvent::Added(l) if l.key == d.key));
    let log = running.stop().await;
    assert_eq!((removed_b, removed_c, added_d), (1, 0, 1), "{log:#?}");
    assert!(
        !log.iter()
            .any(|e| matches!(e, ManagerEvent::LeaseReacquired { .. }))
    );

    let listing = h.store().list().await.unwrap();
    let mine = listing
        .leases
        .iter()
        .find(|s| s.lease.key == own_key)
        .unwrap();
    assert_eq!(mine.lease.attrs, attrs(1), "our lease survived the restart");
}

/// A node cut off from etcd for longer than its TTL loses its lease to
/// expiry; when it can reach etcd again it takes the same subnet back and
/// says so, instead of exiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_is_reacquired_after_partition() {
    let h = EtcdHarness::new().await;
    let options = ManagerOptions {
        ttl: Duration::from_secs(3),
        renew_margin: Duration::from_secs(2),
        renew_retry: Duration::from_millis(300),
        max_backoff: Duration::from_millis(500),
    };
    let mut node = manager(h.node_store().await, 1, options);
    let own = node.acquire(None).await.unwrap();
    let own_key = own.stored.lease.key;
    let mut running = Running::start(node, own);
    running
        .wait_until(Duration::from_secs(5), "the first snapshot", |r| {
            !r.log.is_empty()
        })
        .await;

    h.cut().await;
    // Wait (bounded) until etcd expired the lease behind the node's back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let listing = h.store().list().await.unwrap();
        if !listing.leases.iter().any(|s| s.lease.key == own_key) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.restore().await;

    running
        .wait_until(Duration::from_secs(15), "re-acquisition", |r| {
            r.count(|e| matches!(e, ManagerEvent::LeaseReacquired { .. })) == 1
        })
        .await;
    let log = running.stop().await;
    let (lost, current) = log
        .iter()
        .find_map(|e| match e {
            ManagerEvent::LeaseReacquired { lost, current } => Some((lost.key, current.key)),
            _ => None,
        })
        .unwrap();
    assert_eq!((lost, current), (own_key, own_key));
    let listing = h.store().list().await.unwrap();
    let mine = listing
        .leases
        .iter()
        .find(|s| s.lease.key == own_key)
        .unwrap();
    assert_eq!(mine.lease.attrs, attrs(1));
    assert!(!mine.is_reservation());
}
