//! Listing more leases than one page holds.
#![allow(clippy::unwrap_used)]

mod common;

use common::harness::{EtcdHarness, Harness, PREFIX};
use common::nodes::attrs;
use etcd_client::{Txn, TxnOp};
use std::collections::BTreeSet;
use subnet::store::LeaseStore;

#[tokio::test]
async fn listing_pages_through_every_lease_once() {
    let h = EtcdHarness::new().await;
    let mut client = h.store().client();
    const LEASES: u32 = 1_234;
    let keys: Vec<u32> = (0..LEASES).collect();
    for chunk in keys.chunks(100) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|n| {
                let key = format!("{PREFIX}/subnets/10.{}.{}.0-24", n / 256, n % 256);
                TxnOp::put(key, attrs(*n).encode(), None)
            })
            .collect();
        client.txn(Txn::new().and_then(ops)).await.unwrap();
    }
    // Garbage on both sides of the range and inside it.
    h.put_raw("zzz", "x").await;
    client
        .put(format!("{PREFIX}/subnetsX"), "x", None)
        .await
        .unwrap();

    let listing = h.store().list().await.unwrap();
    assert_eq!(listing.leases.len(), LEASES as usize);
    assert_eq!(
        listing.skipped, 1,
        "only the garbage inside the prefix is skipped"
    );
    let distinct: BTreeSet<_> = listing.leases.iter().map(|s| s.lease.key).collect();
    assert_eq!(distinct.len(), LEASES as usize);
    let public_ips: BTreeSet<_> = listing
        .leases
        .iter()
        .map(|s| s.lease.attrs.public_ip)
        .collect();
    assert_eq!(public_ips.len(), LEASES as usize);
}
