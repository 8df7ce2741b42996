//! Lease benchmark on a real etcd (not a timed test: it prints, never asserts).
//!
//! `cargo bench -p subnet --bench leases` prints, each next to an anchor
//! measured in the same run on the same etcd:
//! - acquisition latency of one node vs one raw compare-and-create
//!   transaction (grant + txn, the minimum an acquisition needs);
//! - wall time of 300 nodes acquiring at once vs 300 concurrent raw creates
//!   of distinct keys (no contention);
//! - time to list and diff 5,000 leases vs one raw range read of them.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::harness::{DEFAULT_CONFIG, EtcdHarness, Harness, PREFIX};
use common::nodes::attrs;
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use subnet::NetworkConfig;
use subnet::lease::{Lease, SubnetKey};
use subnet::manager::{LeaseManager, ManagerOptions};
use subnet::store::LeaseStore;
use subnet::watch::PeerSet;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(what: &str, ours: Duration, anchor_name: &str, anchor: Duration) {
    println!(
        "{what:<34} {:>9.2} ms   {anchor_name:<34} {:>9.2} ms   ratio {:>6.2}x",
        ms(ours),
        ms(anchor),
        ours.as_secs_f64() / anchor.as_secs_f64()
    );
}

async fn raw_create(client: &mut etcd_client::Client, key: String, value: String) {
    let lease = client.lease_grant(86_400, None).await.expect("grant");
    let txn = Txn::new()
        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key.as_str(),
            value,
            Some(PutOptions::new().with_lease(lease.id())),
        )]);
    client.txn(txn).await.expect("txn");
}

async fn clear(h: &EtcdHarness) {
    let mut client = h.store().client();
    client
        .delete(
            format!("{PREFIX}/subnets/"),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .expect("clear");
}

async fn single_acquisition(h: &EtcdHarness, config: &NetworkConfig) {
    const ROUNDS: u32 = 50;
    let mut ours = Vec::new();
    for n in 0..ROUNDS {
        let mut manager = LeaseManager::new(h.store(), config, attrs(n), ManagerOptions::default())
            .expect("manager");
        let started = Instant::now();
        manager.acquire(None).await.expect("acquire");
        ours.push(started.elapsed());
    }
    clear(h).await;
    let mut client = h.store().client();
    let mut anchor = Vec::new();
    for n in 0..ROUNDS {
        let key = format!("{PREFIX}/subnets/10.244.{}.0-24", n + 1);
        let started = Instant::now();
        raw_create(&mut client, key, attrs(n).encode()).await;
        anchor.push(started.elapsed());
    }
    clear(h).await;
    report(
        "acquire one lease (median of 50)",
        median(ours),
        "raw grant + create txn (median)",
        median(anchor),
    );
}

async fn race(h: &EtcdHarness, config: &NetworkConfig) {
    let mut stores = Vec::new();
    for _ in 0..300 {
        stores.push(h.node_store().await);
    }
    let started = Instant::now();
    let tasks: Vec<_> = stores
        .into_iter()
        .enumerate()
        .map(|(n, store)| {
            let config = config.clone();
            tokio::spawn(async move {
                let n = u32::try_from(n).expect("small");
                let mut manager =
                    LeaseManager::new(store, &config, attrs(n), ManagerOptions::default())
                        .expect("manager");
                manager.acquire(None).await.is_ok()
            })
        })
        .collect();
    let mut won = 0;
    for task in tasks {
        won += usize::from(task.await.expect("task"));
    }
    let ours = started.elapsed();
    assert_eq!(won, 255, "the race must fill the network exactly");
    clear(h).await;

    let mut clients = Vec::new();
    for _ in 0..300 {
        clients.push(common::harness::connect(&h.endpoint()).await.client());
    }
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(n, mut client)| {
            tokio::spawn(async move {
                let key = format!("{PREFIX}/subnets/bench-{n}");
                let n = u32::try_from(n).expect("small");
                raw_create(&mut client, key, attrs(n).encode()).await;
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    let anchor = started.elapsed();
    clear(h).await;
    report(
        "300-node race, wall time",
        ours,
        "300 uncontended raw creates",
        anchor,
    );
}

async fn list_and_diff(h: &EtcdHarness) {
    const LEASES: u32 = 5_000;
    let mut client = h.store().client();
    let lease_id = client.lease_grant(86_400, None).await.expect("grant").id();
    let key_of = |n: u32| {
        let net = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + (n << 8));
        SubnetKey::v4(ipnetwork::Ipv4Network::new(net, 24).expect("net"))
    };
    // Batches of 100 puts per transaction (etcd allows 128 operations).
    for chunk in (0..LEASES).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|n| {
                TxnOp::put(
                    format!("{PREFIX}/subnets/{}", key_of(*n)),
                    attrs(*n).encode(),
                    Some(PutOptions::new().with_lease(lease_id)),
                )
            })
            .collect();
        client.txn(Txn::new().and_then(ops)).await.expect("load");
    }
    // The node knew a slightly different set: 10 % gone, 10 % new.
    let mut peers = PeerSet::new(None);
    peers.resync((LEASES / 10..LEASES + LEASES / 10).map(|n| Lease {
        key: key_of(n),
        attrs: attrs(n),
    }));

    let mut ours = Vec::new();
    let mut anchor = Vec::new();
    for _ in 0..5 {
        let mut fresh = peers.clone();
        let started = Instant::now();
        let listing = h.store().list().await.expect("list");
        let changes = fresh.resync(listing.leases.into_iter().map(|s| s.lease));
        ours.push(started.elapsed());
        assert_eq!(changes.len(), 2 * (LEASES / 10) as usize);

        let started = Instant::now();
        let raw = client
            .get(
                format!("{PREFIX}/subnets/"),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .expect("get");
        anchor.push(started.elapsed());
        assert_eq!(raw.kvs().len(), LEASES as usize);
    }
    clear(h).await;
    report(
        "list + diff 5,000 leases (median)",
        median(ours),
        "raw range read of 5,000 (median)",
        median(anchor),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let h = EtcdHarness::new().await;
    let config = NetworkConfig::parse(DEFAULT_CONFIG).expect("config");
    println!(
        "lease benchmark on etcd at {} (real server, fsync on)",
        h.endpoint()
    );
    single_acquisition(&h, &config).await;
    race(&h, &config).await;
    list_and_diff(&h).await;
}
