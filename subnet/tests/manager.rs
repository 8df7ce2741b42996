//! Lease manager scenarios, each run against the in-memory store and a real
//! etcd server (see `common::harness`).
// Scenario functions are not `#[test]` functions, so clippy's
// allow-unwrap-in-tests does not reach them.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use common::harness::{DEFAULT_CONFIG, Harness};
use common::nodes::{Running, acquire, attrs, config, manager, short_ttl};
use ipnetwork::Ipv4Network;
use subnet::lease::{Lease, SubnetKey};
use subnet::manager::{LeaseManager, ManagerError, ManagerEvent, ManagerOptions, load_config};
use subnet::store::{LeaseStore, Ttl};
use subnet::subnet_env::{SubnetEnv, write_atomic};
use subnet::watch::LeaseEvent;
use tokio::time::Instant;

fn key(third: u8) -> SubnetKey {
    SubnetKey::v4(Ipv4Network::new(Ipv4Addr::new(10, 244, third, 0), 24).unwrap())
}

/// 300 nodes acquire at once on a /16 of /24s: exactly 255 distinct leases
/// and 45 clean "no free subnet" errors, checked against the store.
async fn race_of_300<H: Harness>(h: &H) {
    let mut tasks = Vec::new();
    for n in 0..300u32 {
        let store = h.node_store().await;
        tasks.push(tokio::spawn(async move {
            manager(store, n, ManagerOptions::default())
                .acquire(None)
                .await
        }));
    }
    let mut won = BTreeMap::new();
    let mut exhausted = 0;
    for (n, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(own) => {
                won.insert(attrs(u32::try_from(n).unwrap()).public_ip, own.subnet());
            }
            Err(error @ ManagerError::Exhausted { .. }) => {
                let text = error.to_string();
                assert!(
                    text.contains("no free subnet in network 10.244.0.0/16"),
                    "{text}"
                );
                assert!(
                    text.contains("10.244.1.0") && text.contains("10.244.255.0"),
                    "{text}"
                );
                exhausted += 1;
            }
            Err(other) => panic!("node {n}: unexpected error {other}"),
        }
    }
    assert_eq!(won.len(), 255);
    assert_eq!(exhausted, 45);
    let distinct: HashSet<_> = won.values().collect();
    assert_eq!(distinct.len(), 255, "two nodes hold one subnet");

    let listing = h.store().list().await.unwrap();
    assert_eq!(listing.leases.len(), 255);
    let stored: BTreeMap<_, _> = listing
        .leases
        .iter()
        .map(|s| (s.lease.attrs.public_ip, s.lease.subnet()))
        .collect();
    assert_eq!(
        stored, won,
        "the store holds exactly the leases the managers reported"
    );
}

/// A restarted node (same public IP) gets its lease back, and the TTL lease
/// of its previous run is revoked rather than leaked.
async fn reuse_after_restart<H: Harness>(h: &H) {
    let base = h.ttl_lease_count().await;
    let first = acquire(h, 7).await;
    let second = acquire(h, 7).await;
    assert_eq!(first.stored.lease.key, second.stored.lease.key);
    assert!(second.stored.mod_revision > first.stored.mod_revision);
    assert_ne!(first.stored.ttl_lease, second.stored.ttl_lease);
    assert_eq!(
        h.ttl_lease_count().await,
        base + 1,
        "the superseded TTL lease was revoked"
    );
    let listing = h.store().list().await.unwrap();
    assert_eq!(listing.leases.len(), 1);
}

/// A node whose public IP changed takes the subnet named in its old
/// subnet.env if it is free, and never one another node holds.
async fn previous_subnet_from_subnet_env<H: Harness>(h: &H) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/flannel/subnet.env");
    let first = acquire(h, 1).await;
    let gateway = Ipv4Network::new(
        Ipv4Addr::from(u32::from(first.subnet().ip()) + 1),
        first.subnet().prefix(),
    )
    .unwrap();
    let env = SubnetEnv {
        networks: vec!["10.244.0.0/16".parse().unwrap()],
        subnet: Some(gateway),
        mtu: Some(1450),
        ipmasq: Some(false),
        ..SubnetEnv::default()
    };
    write_atomic(&path, &env).unwrap();

    // The node was away long enough for its lease to expire.
    h.delete_raw(&first.stored.lease.key.to_string()).await;
    let previous = SubnetEnv::read_if_present(&path).unwrap().unwrap().subnet;
    let mut moved = manager(h.store(), 2, ManagerOptions::default());
    let again = moved.acquire(previous).await.unwrap();
    assert_eq!(
        again.subnet(),
        first.subnet(),
        "the subnet.env subnet was free and reused"
    );

    // Another node with the same stale subnet.env must not share it.
    let mut third = manager(h.store(), 3, ManagerOptions::default());
    let other = third.acquire(previous).await.unwrap();
    assert_ne!(other.subnet(), first.subnet());
    assert_eq!(h.store().list().await.unwrap().leases.len(), 2);
}

/// A key without a TTL reserves its subnet for the node with its public IP:
/// that node gets it (and it stays TTL-less), nobody else ever does.
async fn reservation_is_honoured<H: Harness>(h: &H) {
    let reserved_for = attrs(77).public_ip;
    h.put_raw(
        "10.244.77.0-24",
        &format!(r#"{{"PublicIP":"{reserved_for}"}}"#),
    )
    .await;
    let base = h.ttl_lease_count().await;

    // Everyone else fills the network around it.
    for n in 100..354 {
        let own = acquire(h, n).await;
        assert_ne!(
            own.subnet(),
            key(77).ipv4,
            "node {n} took a reserved subnet"
        );
    }
    let mut late = manager(h.store(), 400, ManagerOptions::default());
    assert!(matches!(
        late.acquire(None).await,
        Err(ManagerError::Exhausted { .. })
    ));

    let mut owner = manager(h.store(), 77, ManagerOptions::default());
    let own = owner.acquire(None).await.unwrap();
    assert_eq!(own.stored.lease.key, key(77));
    assert!(
        own.stored.is_reservation(),
        "a reservation never gets a TTL"
    );
    assert_eq!(own.expires_at, None);
    let renewed = owner.renew(&own).await.unwrap();
    assert!(matches!(renewed, subnet::manager::RenewOutcome::Renewed(_)));
    let listing = h.store().list().await.unwrap();
    let stored = listing
        .leases
        .iter()
        .find(|s| s.lease.key == key(77))
        .unwrap();
    assert!(stored.is_reservation());
    assert_eq!(
        stored.lease.attrs,
        attrs(77),
        "our backend data is published"
    );
    assert_eq!(h.ttl_lease_count().await, base + 254);
}

/// Under a short TTL, renewals keep the lease alive and leak no TTL lease.
async fn renewal_keeps_lease<H: Harness>(h: &H) {
    let options = ManagerOptions {
        ttl: Duration::from_secs(3),
        renew_margin: Duration::from_secs(2),
        renew_retry: Duration::from_millis(200),
        max_backoff: Duration::from_secs(1),
    };
    let mut node = manager(h.store(), 5, options);
    let own = node.acquire(None).await.unwrap();
    let own_key = own.stored.lease.key;
    let mut running = Running::start(node, own);
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        let listing = h.store().list().await.unwrap();
        assert!(
            listing.leases.iter().any(|s| s.lease.key == own_key),
            "the lease vanished although it is renewed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    running
        .wait_until(Duration::from_secs(5), "renewals", |r| {
            r.count(|e| matches!(e, ManagerEvent::LeaseRenewed { .. })) >= 5
        })
        .await;
    let log = running.stop().await;
    assert!(
        !log.iter()
            .any(|e| matches!(e, ManagerEvent::LeaseReacquired { .. }))
    );
    assert_eq!(
        h.ttl_lease_count().await,
        1,
        "every superseded TTL lease was revoked"
    );
}

/// Deleting a node's lease makes it take the same subnet again at once, and say so.
async fn deleted_lease_is_reacquired<H: Harness>(h: &H) {
    let mut node = manager(h.node_store().await, 9, short_ttl());
    let own = node.acquire(None).await.unwrap();
    let own_key = own.stored.lease.key;
    let mut running = Running::start(node, own);
    running
        .wait_until(Duration::from_secs(5), "the first snapshot", |r| {
            !r.log.is_empty()
        })
        .await;
    h.delete_raw(&own_key.to_string()).await;
    running
        .wait_until(Duration::from_secs(5), "re-acquisition", |r| {
            r.count(|e| matches!(e, ManagerEvent::LeaseReacquired { .. })) == 1
        })
        .await;
    let reacquired = running
        .log
        .iter()
        .find_map(|e| match e {
            ManagerEvent::LeaseReacquired { lost, current } => Some((lost.key, current.key)),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        reacquired,
        (own_key, own_key),
        "the same subnet was free and retaken"
    );
    let listing = h.store().list().await.unwrap();
    let stored = listing
        .leases
        .iter()
        .find(|s| s.lease.key == own_key)
        .unwrap();
    assert_eq!(stored.lease.attrs, attrs(9));
    running.stop().await;
}

/// A node whose watch is cut while peers change and history is compacted
/// ends with exactly the right peers, and no event is lost or invented.
async fn watch_survives_cut_and_compaction<H: Harness>(h: &H) {
    let mut node = manager(h.node_store().await, 1, short_ttl());
    let own = node.acquire(None).await.unwrap();
    let b = acquire(h, 2).await.stored.lease;
    let c = acquire(h, 3).await.stored.lease;
    let mut running = Running::start(node, own);
    running
        .wait_until(Duration::from_secs(5), "peers b and c", |r| {
            r.view.len() == 2
        })
        .await;

    h.cut().await;
    let d = acquire(h, 4).await.stored.lease;
    h.delete_raw(&b.key.to_string()).await;
    h.compact().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.restore().await;

    let mut expected = vec![c.key, d.key];
    expected.sort();
    running
        .wait_until(Duration::from_secs(15), "peers c and d", |r| {
            r.peer_keys() == expected
        })
        .await;
    assert_eq!(
        running.count_changes(|c| matches!(c, LeaseEvent::Removed(l) if l.key == b.key)),
        1
    );
    assert_eq!(
        running.count_changes(|e| matches!(e, LeaseEvent::Removed(l) if l.key == c.key)),
        0
    );
    assert_eq!(
        running.count_changes(|e| matches!(e, LeaseEvent::Added(l) if l.key == d.key)),
        1
    );
    assert_eq!(
        running.count(|e| matches!(e, ManagerEvent::LeaseReacquired { .. })),
        0
    );
    running.stop().await;
}

/// Garbage under the subnets prefix is skipped on its own: no peer is
/// removed or changed, and later valid changes still arrive.
async fn garbage_changes_nothing<H: Harness>(h: &H) {
    let mut node = manager(h.node_store().await, 1, short_ttl());
    let own = node.acquire(None).await.unwrap();
    acquire(h, 2).await;
    acquire(h, 3).await;
    let mut running = Running::start(node, own);
    running
        .wait_until(Duration::from_secs(5), "two peers", |r| r.view.len() == 2)
        .await;
    let before = running.log.len();

    h.put_raw("junk", "x").await;
    h.put_raw("10.244.200.0-24", "not json").await;
    h.put_raw("10.244.201.7-24", "{}").await;
    h.put_raw("10.244.202.0-24", r#"{"PublicIP":"not an ip"}"#)
        .await;
    h.put_raw("10.244.203.0-24", "[1,2]").await;
    let e = acquire(h, 4).await.stored.lease;

    running
        .wait_until(Duration::from_secs(5), "peer e", |r| {
            r.view.contains_key(&e.key)
        })
        .await;
    assert_eq!(
        running.log[before..],
        [ManagerEvent::PeersChanged(vec![LeaseEvent::Added(
            e.into()
        )])],
        "only the valid lease produced an event"
    );
    assert_eq!(running.view.len(), 3);
    running.stop().await;
}

/// A bad config in the store is reported with the field and value.
async fn bad_config_is_named<H: Harness>(h: &H) {
    let store = h.store();
    h.set_config(r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#)
        .await;
    let error = load_config(&store, "/coreos.com/network/config")
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("SubnetLen must be less than /31") && text.contains("31"),
        "{text}"
    );
    h.set_config(r#"{"Network":"10.244.0.0/33"}"#).await;
    let text = load_config(&store, "k").await.unwrap_err().to_string();
    assert!(
        text.contains("Network") && text.contains("10.244.0.0/33"),
        "{text}"
    );
    h.set_config("not json").await;
    assert!(load_config(&store, "k").await.is_err());
    h.set_config(DEFAULT_CONFIG).await;
    assert!(load_config(&store, "k").await.is_ok());
}

/// Creating a lease directly through the store is visible to the manager.
async fn reservation_created_through_store<H: Harness>(h: &H) {
    let lease = Lease {
        key: key(42),
        attrs: attrs(42),
    };
    h.store().create(&lease, Ttl::Never).await.unwrap();
    let own = acquire(h, 42).await;
    assert_eq!(own.stored.lease.key, key(42));
    assert!(own.stored.is_reservation());
}

both_stores!(
    race_of_300,
    reuse_after_restart,
    previous_subnet_from_subnet_env,
    reservation_is_honoured,
    renewal_keeps_lease,
    deleted_lease_is_reacquired,
    watch_survives_cut_and_compaction,
    garbage_changes_nothing,
    bad_config_is_named,
    reservation_created_through_store,
);

/// A missing config says what flannel says, so operators recognise it.
#[tokio::test]
async fn missing_config_mentions_etcd_v3() {
    let store = subnet::store::mem::MemStore::new();
    let error = load_config(&store, "/coreos.com/network/config")
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("Did you create your config using etcdv3 API?")
    );
}

/// The options are checked up front.
#[test]
fn renew_margin_must_be_below_ttl() {
    let store = subnet::store::mem::MemStore::default();
    let options = ManagerOptions {
        ttl: Duration::from_secs(60),
        renew_margin: Duration::from_secs(60),
        ..ManagerOptions::default()
    };
    let error = LeaseManager::new(store, &config(), attrs(1), options).unwrap_err();
    assert!(matches!(error, ManagerError::BadRenewMargin { .. }));
}
