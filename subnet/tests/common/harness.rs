//! One interface over the two lease stores, so every scenario runs against
//! the in-memory store and against a real etcd server.

use std::time::Duration;

use etcd_client::{CompactionOptions, PutOptions};
use subnet::etcd::{EtcdOptions, EtcdStore};
use subnet::store::LeaseStore;
use subnet::store::mem::MemStore;

use super::etcd_server::EtcdServer;
use super::proxy::Proxy;

/// The prefix the harnesses use (flannel's default).
pub(crate) const PREFIX: &str = "/coreos.com/network";

/// flannel's usual test network.
pub(crate) const DEFAULT_CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

/// A lease store plus the raw access a test needs around it.
#[allow(async_fn_in_trait)]
pub(crate) trait Harness {
    /// The store type under test.
    type Store: LeaseStore;

    /// A store sharing the harness's connection.
    fn store(&self) -> Self::Store;

    /// A store on a connection of its own (one per simulated node). For etcd
    /// it goes through the harness's proxy, so [`Self::cut`] affects it.
    async fn node_store(&self) -> Self::Store;

    /// Writes `<prefix>/config`.
    async fn set_config(&self, text: &str);

    /// Writes raw text under `<prefix>/subnets/<segment>` with no TTL lease.
    async fn put_raw(&self, segment: &str, value: &str);

    /// Writes raw text under `<prefix>/subnets/<segment>` with a TTL lease.
    async fn put_raw_with_ttl(&self, segment: &str, value: &str, ttl: Duration);

    /// Deletes `<prefix>/subnets/<segment>`.
    async fn delete_raw(&self, segment: &str);

    /// Compacts the history up to the current revision; returns it.
    async fn compact(&self) -> i64;

    /// The number of TTL leases that exist.
    async fn ttl_lease_count(&self) -> usize;

    /// Breaks node stores' watches (and, for etcd, their connections until
    /// [`Self::restore`]); writes through [`Self::store`] still work.
    async fn cut(&self);

    /// Undoes [`Self::cut`].
    async fn restore(&self);
}

/// The in-memory store.
pub(crate) struct MemHarness {
    store: MemStore,
}

impl MemHarness {
    pub(crate) fn new() -> Self {
        let store = MemStore::new();
        store.set_config(DEFAULT_CONFIG);
        Self { store }
    }
}

impl Harness for MemHarness {
    type Store = MemStore;

    fn store(&self) -> MemStore {
        self.store.clone()
    }

    async fn node_store(&self) -> MemStore {
        self.store.clone()
    }

    async fn set_config(&self, text: &str) {
        self.store.set_config(text);
    }

    async fn put_raw(&self, segment: &str, value: &str) {
        self.store.put_raw(segment, value);
    }

    async fn put_raw_with_ttl(&self, segment: &str, value: &str, ttl: Duration) {
        self.store.put_raw_with_ttl(segment, value, ttl);
    }

    async fn delete_raw(&self, segment: &str) {
        self.store.delete_raw(segment);
    }

    async fn compact(&self) -> i64 {
        let revision = self.store.revision();
        self.store.compact(revision);
        revision
    }

    async fn ttl_lease_count(&self) -> usize {
        self.store.ttl_lease_count()
    }

    async fn cut(&self) {
        self.store.disconnect_watchers();
    }

    async fn restore(&self) {}
}

/// A real etcd server started for the test, and a proxy for node stores.
pub(crate) struct EtcdHarness {
    pub(crate) server: EtcdServer,
    proxy: Proxy,
    store: EtcdStore,
}

impl EtcdHarness {
    pub(crate) async fn new() -> Self {
        let server = EtcdServer::start();
        let proxy = Proxy::start(server.client_addr()).await;
        let store = connect(&server.endpoint()).await;
        let harness = Self {
            server,
            proxy,
            store,
        };
        harness.set_config(DEFAULT_CONFIG).await;
        harness
    }

    /// The direct (not proxied) endpoint.
    pub(crate) fn endpoint(&self) -> String {
        self.server.endpoint()
    }

    fn subnet_key(&self, segment: &str) -> String {
        format!("{PREFIX}/subnets/{segment}")
    }
}

/// An etcd store on `endpoint` with the default prefix.
pub(crate) async fn connect(endpoint: &str) -> EtcdStore {
    EtcdStore::connect(&EtcdOptions {
        endpoints: vec![endpoint.to_owned()],
        prefix: PREFIX.to_owned(),
        credentials: None,
        request_timeout: Some(Duration::from_secs(5)),
        tls: None,
    })
    .await
    .expect("connect to etcd")
}

impl Harness for EtcdHarness {
    type Store = EtcdStore;

    fn store(&self) -> EtcdStore {
        self.store.clone()
    }

    async fn node_store(&self) -> EtcdStore {
        connect(&self.proxy.endpoint()).await
    }

    async fn set_config(&self, text: &str) {
        let mut client = self.store.client();
        client
            .put(format!("{PREFIX}/config"), text, None)
            .await
            .expect("put config");
    }

    async fn put_raw(&self, segment: &str, value: &str) {
        let mut client = self.store.client();
        client
            .put(self.subnet_key(segment), value, None)
            .await
            .expect("put raw");
    }

    async fn put_raw_with_ttl(&self, segment: &str, value: &str, ttl: Duration) {
        let mut client = self.store.client();
        let seconds = i64::try_from(ttl.as_secs()).expect("ttl fits");
        let lease = client.lease_grant(seconds, None).await.expect("grant");
        let options = PutOptions::new().with_lease(lease.id());
        client
            .put(self.subnet_key(segment), value, Some(options))
            .await
            .expect("put raw with ttl");
    }

    async fn delete_raw(&self, segment: &str) {
        let mut client = self.store.client();
        client
            .delete(self.subnet_key(segment), None)
            .await
            .expect("delete raw");
    }

    async fn compact(&self) -> i64 {
        let mut client = self.store.client();
        let revision = client
            .get("compaction-probe", None)
            .await
            .expect("get")
            .header()
            .expect("header")
            .revision();
        client
            .compact(revision, Some(CompactionOptions::new().with_physical()))
            .await
            .expect("compact");
        revision
    }

    async fn ttl_lease_count(&self) -> usize {
        let mut client = self.store.client();
        client.leases().await.expect("list leases").leases().len()
    }

    async fn cut(&self) {
        self.proxy.cut();
    }

    async fn restore(&self) {
        self.proxy.restore();
    }
}
