//! Conformance suite of the `LeaseStore` trait: every scenario runs once against the in-memory
//! store and once against a real etcd server (see `common::harness`), so the two keep the same
//! semantics: compare-and-create, compare-and-update on the mod revision, conditional delete,
//! TTL leases (expiry, reservations, renew-style moves and revokes), ordered and resumable
//! watches, compaction, undecodable entries skipped on their own, flannel's value bytes, and
//! watches that fail when the connection is cut and work again after it is restored.
//!
//! Every wait is bounded: each watch item within 5 s, each poll loop within 10 s.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::harness::{DEFAULT_CONFIG, Harness};
use futures::StreamExt;
use subnet::lease::{Lease, LeaseAttrs, MacAddr, SubnetKey, VxlanData};
use subnet::store::{
    CreateOutcome, LeaseListing, LeaseStore, StoreError, StoredLease, Ttl, UpdateOutcome,
    WatchBatch, WatchEvent, WatchStream, Written,
};
use tokio::time::{Instant, sleep, timeout};

/// How long one watch item may take to arrive.
const WATCH_WAIT: Duration = Duration::from_secs(5);
/// How long a watch must stay silent to count as having no further events.
const QUIET: Duration = Duration::from_millis(500);
/// Pause between two polls of a bounded poll loop.
const POLL: Duration = Duration::from_millis(200);
/// Upper bound of the retry loops.
const RETRY_LIMIT: Duration = Duration::from_secs(10);

/// flannel's own bytes for a vxlan lease (what a Go node writes).
const FLANNEL_VXLAN: &str = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The key of subnet `10.244.<third_octet>.0/24`.
fn key(third_octet: u8) -> SubnetKey {
    SubnetKey::parse(&format!("10.244.{third_octet}.0-24")).expect("valid subnet key")
}

/// A vxlan lease of `10.244.<third_octet>.0/24` for the node `198.18.0.<public_last_octet>`.
fn lease(third_octet: u8, public_last_octet: u8) -> Lease {
    let vxlan = VxlanData {
        vni: 1,
        vtep_mac: MacAddr([0x02, 0, 0, 0, third_octet, public_last_octet]),
    };
    Lease {
        key: key(third_octet),
        attrs: LeaseAttrs {
            backend_type: "vxlan".to_owned(),
            backend_data: Some(vxlan.encode()),
            ..LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, public_last_octet))
        },
    }
}

/// A TTL of whole seconds.
fn expiring(seconds: u64) -> Ttl {
    Ttl::Expiring(Duration::from_secs(seconds))
}

/// Creates `lease`, which must not exist yet.
async fn created<S: LeaseStore>(store: &S, lease: &Lease, ttl: Ttl) -> Written {
    match store.create(lease, ttl).await.expect("create") {
        CreateOutcome::Created(written) => written,
        other => panic!("create of {} did not create: {other:?}", lease.key),
    }
}

/// Updates `lease`, which must still be at `expected_revision`.
async fn updated<S: LeaseStore>(
    store: &S,
    lease: &Lease,
    ttl: Ttl,
    expected_revision: i64,
) -> Written {
    match store
        .update(lease, ttl, expected_revision)
        .await
        .expect("update")
    {
        UpdateOutcome::Updated(written) => written,
        other => panic!(
            "update of {} at revision {expected_revision} did not update: {other:?}",
            lease.key
        ),
    }
}

/// The store's listing.
async fn listing<S: LeaseStore>(store: &S) -> LeaseListing {
    store.list().await.expect("list")
}

/// The listed entry of `key`, if any.
fn find<'a>(listing: &'a LeaseListing, key: &SubnetKey) -> Option<&'a StoredLease> {
    listing
        .leases
        .iter()
        .find(|stored| stored.lease.key == *key)
}

/// Starts a watch that must be accepted.
async fn watch_from<S: LeaseStore>(store: &S, from_revision: i64) -> WatchStream {
    store
        .watch(from_revision)
        .await
        .unwrap_or_else(|error| panic!("watch from revision {from_revision}: {error}"))
}

/// The next watch item, which must arrive within [`WATCH_WAIT`].
async fn next_item(stream: &mut WatchStream) -> Option<Result<WatchBatch, StoreError>> {
    timeout(WATCH_WAIT, stream.next())
        .await
        .expect("no watch item within 5 s")
}

/// The next batch, which must arrive within [`WATCH_WAIT`] and not be an error.
async fn next_batch(stream: &mut WatchStream) -> WatchBatch {
    match next_item(stream).await {
        Some(Ok(batch)) => batch,
        Some(Err(error)) => panic!("watch failed: {error}"),
        None => panic!("watch ended"),
    }
}

/// Reads batches until at least `count` events arrived; returns each event with the revision
/// of its batch. Batch revisions must be strictly increasing (empty batches included).
async fn collect_events(stream: &mut WatchStream, count: usize) -> Vec<(i64, WatchEvent)> {
    let mut events = Vec::new();
    let mut last_revision: Option<i64> = None;
    while events.len() < count {
        let batch = next_batch(stream).await;
        if let Some(last) = last_revision {
            assert!(
                batch.revision > last,
                "batch revisions not strictly increasing: {last} then {}",
                batch.revision
            );
        }
        last_revision = Some(batch.revision);
        events.extend(
            batch
                .events
                .into_iter()
                .map(|event| (batch.revision, event)),
        );
    }
    events
}

/// Asserts that the watch yields nothing (no batch, error or end) for [`QUIET`].
async fn assert_quiet(stream: &mut WatchStream) {
    if let Ok(item) = timeout(QUIET, stream.next()).await {
        panic!("expected no further watch item, got {item:?}");
    }
}

/// Asserts that watching from `from_revision` fails with [`StoreError::Compacted`] for
/// compaction revision `compacted`, either from the `watch()` call or as the first stream item.
async fn assert_compacted<S: LeaseStore>(store: &S, from_revision: i64, compacted: i64) {
    let error = match store.watch(from_revision).await {
        Err(error) => error,
        Ok(mut stream) => match next_item(&mut stream).await {
            Some(Err(error)) => error,
            other => panic!(
                "watch from compacted revision {from_revision} (compacted at {compacted}) \
                 yielded {other:?} instead of a Compacted error"
            ),
        },
    };
    match error {
        StoreError::Compacted {
            requested,
            compacted: reported,
        } => {
            assert_eq!(requested, from_revision, "Compacted.requested");
            assert_eq!(reported, compacted, "Compacted.compacted");
        }
        other => panic!(
            "watch from compacted revision {from_revision} failed with {other:?}, not Compacted"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

/// 1. `network_config()` returns the config text as written, and follows a rewrite.
async fn config_reads_the_written_text<H: Harness>(h: &H) {
    let store = h.store();
    assert_eq!(
        store
            .network_config()
            .await
            .expect("network_config")
            .as_deref(),
        Some(DEFAULT_CONFIG)
    );
    let other = r#"{"Network":"10.10.0.0/16","SubnetLen":26,"Backend":{"Type":"host-gw"}}"#;
    h.set_config(other).await;
    assert_eq!(
        store
            .network_config()
            .await
            .expect("network_config")
            .as_deref(),
        Some(other)
    );
}

/// 2. `create` is compare-and-create: the second create of a key reports the holder and
///    changes nothing (and leaves no TTL lease behind).
async fn create_is_compare_and_create<H: Harness>(h: &H) {
    let store = h.store();
    let first = lease(1, 2);
    let written = created(&store, &first, expiring(60)).await;
    assert_eq!(written.ttl, Some(Duration::from_secs(60)), "granted ttl");
    assert_ne!(
        written.stored.ttl_lease, 0,
        "a TTL create attaches a TTL lease"
    );
    assert_eq!(written.stored.lease, first);
    assert!(written.stored.mod_revision > 0);

    let ttl_leases_before = h.ttl_lease_count().await;
    let second = lease(1, 3);
    match store.create(&second, expiring(60)).await.expect("create") {
        CreateOutcome::Exists(Some(holder)) => {
            assert_eq!(
                holder.lease.attrs, first.attrs,
                "the holder is the first node"
            );
            assert_eq!(holder, written.stored);
        }
        other => panic!("second create of {} returned {other:?}", second.key),
    }
    assert_eq!(
        h.ttl_lease_count().await,
        ttl_leases_before,
        "a losing create must not leave a TTL lease behind"
    );

    let listed = listing(&store).await;
    assert_eq!(listed.leases, vec![written.stored.clone()]);
    assert_eq!(listed.leases[0].lease.attrs, first.attrs);
    assert_eq!(listed.skipped, 0);
    assert!(
        listed.revision >= written.stored.mod_revision,
        "listing revision {} < written mod revision {}",
        listed.revision,
        written.stored.mod_revision
    );
}

/// 3. `update` compares on the mod revision: the right one updates, a stale one or a deleted
///    key reports what the key holds now and changes nothing.
async fn update_compares_on_mod_revision<H: Harness>(h: &H) {
    let store = h.store();
    let original = lease(1, 2);
    let first = created(&store, &original, expiring(60)).await;

    let mut renewed = original.clone();
    renewed.attrs.backend_data = lease(1, 9).attrs.backend_data;
    let second = updated(&store, &renewed, expiring(60), first.stored.mod_revision).await;
    assert!(
        second.stored.mod_revision > first.stored.mod_revision,
        "mod revision {} not after {}",
        second.stored.mod_revision,
        first.stored.mod_revision
    );
    assert_eq!(second.stored.lease, renewed);
    assert_eq!(second.ttl, Some(Duration::from_secs(60)));

    // Stale revision: nothing written, the current value is reported.
    let stale = lease(1, 7);
    match store
        .update(&stale, expiring(60), first.stored.mod_revision)
        .await
        .expect("update")
    {
        UpdateOutcome::Changed(Some(current)) => assert_eq!(current, second.stored),
        other => panic!("update with a stale revision returned {other:?}"),
    }
    let listed = listing(&store).await;
    assert_eq!(
        listed.leases,
        vec![second.stored.clone()],
        "value unchanged"
    );

    // Deleted key: nothing to update, nothing recreated.
    assert!(store.delete(&original.key, None).await.expect("delete"));
    match store
        .update(&renewed, expiring(60), second.stored.mod_revision)
        .await
        .expect("update")
    {
        UpdateOutcome::Changed(None) => {}
        other => panic!("update of a deleted key returned {other:?}"),
    }
    assert!(
        listing(&store).await.leases.is_empty(),
        "update must not recreate a deleted key"
    );
}

/// 4. `delete` with an expected revision deletes only at that revision; without one it
///    deletes whatever is there; a missing key is never "deleted".
async fn delete_compares_on_expected_revision<H: Harness>(h: &H) {
    let store = h.store();
    let one = lease(1, 2);
    let first = created(&store, &one, Ttl::Never).await;
    let second = updated(&store, &one, Ttl::Never, first.stored.mod_revision).await;

    assert!(
        !store
            .delete(&one.key, Some(first.stored.mod_revision))
            .await
            .expect("delete"),
        "delete with a stale revision must not delete"
    );
    assert_eq!(
        find(&listing(&store).await, &one.key),
        Some(&second.stored),
        "key remains after a stale delete"
    );

    assert!(
        store
            .delete(&one.key, Some(second.stored.mod_revision))
            .await
            .expect("delete"),
        "delete with the right revision must delete"
    );
    assert_eq!(find(&listing(&store).await, &one.key), None, "key gone");

    assert!(
        !store
            .delete(&one.key, Some(second.stored.mod_revision))
            .await
            .expect("delete"),
        "deleting a missing key (with a revision) reports false"
    );
    assert!(
        !store.delete(&one.key, None).await.expect("delete"),
        "deleting a missing key (without a revision) reports false"
    );

    let two = lease(2, 3);
    created(&store, &two, expiring(60)).await;
    assert!(
        store.delete(&two.key, None).await.expect("delete"),
        "delete without a revision deletes an existing key"
    );
    assert!(listing(&store).await.leases.is_empty());
}

/// 5. A TTL lease expires: the key leaves `list()` within ttl + 5 s and a watch started before
///    the expiry sees its deletion.
async fn ttl_expiry_deletes_the_key<H: Harness>(h: &H) {
    let store = h.store();
    let short = lease(5, 2);
    let started = Instant::now();
    let written = created(&store, &short, expiring(2)).await;
    let granted = written.ttl.expect("a TTL create reports the granted ttl");
    assert!(granted >= Duration::from_secs(2), "granted {granted:?}");
    assert_ne!(written.stored.ttl_lease, 0);
    let mut stream = watch_from(&store, written.stored.mod_revision + 1).await;

    let limit = granted + Duration::from_secs(5);
    loop {
        if find(&listing(&store).await, &short.key).is_none() {
            break;
        }
        assert!(
            started.elapsed() < limit,
            "key with a {granted:?} TTL still listed after {:?}",
            started.elapsed()
        );
        sleep(POLL).await;
    }

    let events = collect_events(&mut stream, 1).await;
    let (revision, event) = &events[0];
    assert_eq!(*event, WatchEvent::Delete(short.key));
    assert!(*revision > written.stored.mod_revision);
}

/// 6. `Ttl::Never` writes a reservation: no TTL lease, and it stays.
async fn reservation_has_no_ttl_and_stays<H: Harness>(h: &H) {
    let store = h.store();
    let ttl_leases_before = h.ttl_lease_count().await;
    let reserved = lease(6, 2);
    let written = created(&store, &reserved, Ttl::Never).await;
    assert_eq!(written.stored.ttl_lease, 0);
    assert!(written.stored.is_reservation());
    assert_eq!(written.ttl, None);
    assert_eq!(
        h.ttl_lease_count().await,
        ttl_leases_before,
        "a reservation must not grant a TTL lease"
    );

    sleep(Duration::from_secs(3)).await;
    let listed = listing(&store).await;
    let stored = find(&listed, &reserved.key).expect("reservation still listed after 3 s");
    assert_eq!(*stored, written.stored);
    assert!(stored.is_reservation());
}

/// 7. A renewal moves the key to a new TTL lease; revoking the old one keeps the key, revoking
///    it again is fine, revoking the new one deletes the key.
async fn renewal_moves_key_and_revoke_cleans_up<H: Harness>(h: &H) {
    let store = h.store();
    let ttl_leases_before = h.ttl_lease_count().await;
    let one = lease(7, 2);

    let first = created(&store, &one, expiring(60)).await;
    let lease_a = first.stored.ttl_lease;
    assert_ne!(lease_a, 0);
    assert_eq!(h.ttl_lease_count().await, ttl_leases_before + 1);

    let second = updated(&store, &one, expiring(60), first.stored.mod_revision).await;
    let lease_b = second.stored.ttl_lease;
    assert_ne!(lease_b, 0);
    assert_ne!(lease_b, lease_a, "the update attaches a fresh TTL lease");
    assert_eq!(
        h.ttl_lease_count().await,
        ttl_leases_before + 2,
        "the update does not touch the old TTL lease"
    );

    store.revoke(lease_a).await.expect("revoke the old lease");
    let listed = listing(&store).await;
    let stored = find(&listed, &one.key).expect("revoking the old lease keeps the key");
    assert_eq!(*stored, second.stored);
    assert_eq!(stored.ttl_lease, lease_b);
    assert_eq!(
        h.ttl_lease_count().await,
        ttl_leases_before + 1,
        "only the new TTL lease is left"
    );

    store
        .revoke(lease_a)
        .await
        .expect("revoking a lease that is already gone is not an error");

    store.revoke(lease_b).await.expect("revoke the new lease");
    assert_eq!(
        find(&listing(&store).await, &one.key),
        None,
        "revoking the lease the key is attached to deletes the key"
    );
    assert_eq!(h.ttl_lease_count().await, ttl_leases_before);
}

/// 8. A watch from a listing's revision + 1 yields the later changes exactly and in order, with
///    strictly increasing batch revisions that cover their events (the last one is the revision
///    of the last change); a watch from the revision of the second change replays from there.
///
/// Per-event batch revisions are not compared: etcd sends the history a watch catches up on in
/// one response, so `EtcdStore` yields Put X, Put Y and Delete X as one batch at the delete's
/// revision, while the in-memory store yields one batch per revision.
async fn watch_is_ordered_and_resumable<H: Harness>(h: &H) {
    let store = h.store();
    let start = listing(&store).await.revision;
    let x = lease(8, 2);
    let y = lease(9, 3);
    let put_x = created(&store, &x, Ttl::Never).await;
    let put_y = created(&store, &y, expiring(60)).await;
    assert!(store.delete(&x.key, None).await.expect("delete"));
    let deleted_at = listing(&store).await.revision;
    assert!(deleted_at > put_y.stored.mod_revision);
    assert!(put_y.stored.mod_revision > put_x.stored.mod_revision);

    let expected = vec![
        WatchEvent::Put(put_x.stored.clone()),
        WatchEvent::Put(put_y.stored.clone()),
        WatchEvent::Delete(x.key),
    ];
    let mut stream = watch_from(&store, start + 1).await;
    let events = collect_events(&mut stream, 3).await;
    assert_eq!(
        events.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
        expected
    );
    assert!(
        events[0].0 >= put_x.stored.mod_revision && events[1].0 >= put_y.stored.mod_revision,
        "a batch revision is before one of its puts: {events:?}"
    );
    assert_eq!(
        events[2].0, deleted_at,
        "revision of the batch with the delete"
    );
    assert_quiet(&mut stream).await;

    let mut resumed = watch_from(&store, put_y.stored.mod_revision).await;
    let replayed = collect_events(&mut resumed, 2).await;
    assert_eq!(
        replayed.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
        expected[1..].to_vec()
    );
    assert_eq!(replayed[1].0, deleted_at);
    assert_quiet(&mut resumed).await;
}

/// 9. After a compaction at revision C, a watch from before C fails with
///    `StoreError::Compacted` (from the call or as the first stream item); a watch from C + 1
///    works.
///
/// A watch from C itself is left out: the in-memory store refuses it (`Compacted`), while etcd
/// accepts it (revision C is still history to etcd) and, in etcd 3.4.23, silently drops a
/// delete made at exactly revision C (etcd-io/etcd#18089). Nothing watches from C in practice:
/// watches start at a listing's revision + 1.
async fn compaction_fails_old_watches<H: Harness>(h: &H) {
    let store = h.store();
    let one = lease(10, 2);
    let two = lease(11, 3);
    let first = created(&store, &one, Ttl::Never).await;
    created(&store, &two, expiring(60)).await;
    updated(&store, &one, expiring(60), first.stored.mod_revision).await;
    assert!(store.delete(&two.key, None).await.expect("delete"));

    let compacted = h.compact().await;
    assert!(compacted >= first.stored.mod_revision + 3);
    for from_revision in [compacted - 1, first.stored.mod_revision, 1] {
        assert_compacted(&store, from_revision, compacted).await;
    }

    let mut stream = watch_from(&store, compacted + 1).await;
    let three = created(&store, &lease(12, 4), Ttl::Never).await;
    let events = collect_events(&mut stream, 1).await;
    assert_eq!(
        events,
        vec![(
            three.stored.mod_revision,
            WatchEvent::Put(three.stored.clone())
        )]
    );
}

/// 10. Undecodable keys and values are skipped one by one: `list()` counts them and returns the
///     rest; a watch yields no event for them but does yield a later valid put.
async fn garbage_is_skipped_alone<H: Harness>(h: &H) {
    let store = h.store();
    let start = listing(&store).await.revision;
    let mut stream = watch_from(&store, start + 1).await;

    h.put_raw("junk", "x").await;
    h.put_raw("10.244.9.0-24", "not json").await;
    h.put_raw("10.244.10.5-24", "{}").await;
    h.put_raw("10.244.11.0-24", r#"{"PublicIP":"nope"}"#).await;
    let valid = created(&store, &lease(12, 2), expiring(60)).await;

    let listed = listing(&store).await;
    assert_eq!(listed.leases, vec![valid.stored.clone()]);
    assert_eq!(listed.skipped, 4);

    let events = collect_events(&mut stream, 1).await;
    assert_eq!(
        events,
        vec![(
            valid.stored.mod_revision,
            WatchEvent::Put(valid.stored.clone())
        )],
        "the first event is the valid put (no event for the garbage)"
    );
}

/// 11. A value written by flannel (Go) lists as a lease that re-encodes byte for byte; a key
///     without a TTL lease is a reservation, one with a TTL lease is not.
async fn flannel_values_are_read_byte_for_byte<H: Harness>(h: &H) {
    let store = h.store();
    h.put_raw("10.244.3.0-24", FLANNEL_VXLAN).await;
    let with_ttl = FLANNEL_VXLAN.replace("192.168.64.3", "192.168.64.4");
    h.put_raw_with_ttl("10.244.4.0-24", &with_ttl, Duration::from_secs(60))
        .await;

    let listed = listing(&store).await;
    assert_eq!(listed.skipped, 0);
    assert_eq!(listed.leases.len(), 2, "{listed:?}");

    let reserved = find(&listed, &key(3)).expect("flannel lease listed");
    assert_eq!(reserved.ttl_lease, 0);
    assert!(reserved.is_reservation());
    let attrs = &reserved.lease.attrs;
    assert_eq!(attrs.public_ip, Ipv4Addr::new(192, 168, 64, 3));
    assert_eq!(attrs.public_ipv6, None);
    assert_eq!(attrs.backend_type, "vxlan");
    let vxlan = attrs
        .vxlan_data()
        .expect("vxlan backend data")
        .expect("vxlan data decodes");
    assert_eq!(vxlan.vni, 1);
    assert_eq!(
        vxlan.vtep_mac,
        "c6:d2:32:6f:8f:44".parse().expect("valid MAC")
    );
    assert_eq!(attrs.encode(), FLANNEL_VXLAN);

    let expiring = find(&listed, &key(4)).expect("flannel lease with a TTL listed");
    assert_ne!(expiring.ttl_lease, 0);
    assert!(!expiring.is_reservation());
    assert_eq!(expiring.lease.attrs.encode(), with_ttl);
}

/// 12. Cutting a node's connection fails or ends its watch; after the restore a new watch on
///     the same node store (retried while the connection comes back) sees a new put.
async fn watch_fails_on_cut_and_recovers<H: Harness>(h: &H) {
    let store = h.store();
    let node = h.node_store().await;

    // The node's watch is live: it sees a put.
    let start = listing(&node).await.revision;
    let mut stream = watch_from(&node, start + 1).await;
    let before = created(&store, &lease(20, 2), Ttl::Never).await;
    assert_eq!(
        collect_events(&mut stream, 1).await,
        vec![(
            before.stored.mod_revision,
            WatchEvent::Put(before.stored.clone())
        )]
    );

    h.cut().await;
    let outcome = timeout(RETRY_LIMIT, async {
        loop {
            match stream.next().await {
                None => return None,
                Some(Err(error)) => return Some(error),
                Some(Ok(batch)) => assert!(
                    batch.events.is_empty(),
                    "unexpected event after the cut: {batch:?}"
                ),
            }
        }
    })
    .await
    .expect("watch neither failed nor ended within 10 s of the cut");
    if let Some(error) = outcome {
        assert!(
            matches!(error, StoreError::Unavailable(_)),
            "a cut connection is reported as Unavailable, got {error:?}"
        );
    }

    h.restore().await;
    let resume_at = listing(&store).await.revision + 1;
    let deadline = Instant::now() + RETRY_LIMIT;
    let mut after: Option<Written> = None;
    let mut last_error = None;
    loop {
        assert!(
            Instant::now() < deadline,
            "no working watch within 10 s of the restore; last error: {last_error:?}"
        );
        let mut stream = match node.watch(resume_at).await {
            Ok(stream) => stream,
            Err(error) => {
                last_error = Some(error);
                sleep(POLL).await;
                continue;
            }
        };
        // Written once, after the first accepted watch; a retried watch replays it.
        let written = match &after {
            Some(written) => written.clone(),
            None => {
                let written = created(&store, &lease(21, 3), Ttl::Never).await;
                after = Some(written.clone());
                written
            }
        };
        match next_item(&mut stream).await {
            Some(Ok(batch)) => {
                assert_eq!(batch.revision, written.stored.mod_revision);
                assert_eq!(batch.events, vec![WatchEvent::Put(written.stored)]);
                break;
            }
            Some(Err(error)) => last_error = Some(error),
            None => last_error = Some(StoreError::Unavailable("watch ended".into())),
        }
        sleep(POLL).await;
    }
}

both_stores!(
    config_reads_the_written_text,
    create_is_compare_and_create,
    update_compares_on_mod_revision,
    delete_compares_on_expected_revision,
    ttl_expiry_deletes_the_key,
    reservation_has_no_ttl_and_stays,
    renewal_moves_key_and_revoke_cleans_up,
    watch_is_ordered_and_resumable,
    compaction_fails_old_watches,
    garbage_is_skipped_alone,
    flannel_values_are_read_byte_for_byte,
    watch_fails_on_cut_and_recovers,
);
