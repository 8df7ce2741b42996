//! The [`LeaseStore`] on a real etcd, through the v3 API (as flannel ≥ 0.18).
//!
//! Keys: `<prefix>/config` and `<prefix>/subnets/<a.b.c.d>-<len>`. Compared
//! with flannel this store
//! - lists and watches `<prefix>/subnets/` with the trailing slash, so a key
//!   like `<prefix>/subnetsX` is not read as a lease;
//! - reads a key without a TTL lease as a reservation instead of skipping it;
//! - compares on the mod revision when renewing, so it never overwrites a
//!   lease another node took in between.
//!
//! Unary calls get a timeout each; the watch stream has none (a gRPC deadline
//! would end it) and relies on HTTP/2 keep-alive to notice a dead server.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use futures::StreamExt;
use tracing::warn;

use crate::lease::{Lease, SubnetKey};
use crate::store::{
    CreateOutcome, LeaseListing, LeaseStore, StoreError, StoredLease, Ttl, UpdateOutcome,
    WatchBatch, WatchEvent, WatchStream, Written,
};

/// flannel's default key prefix.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";

/// Leases read per request when listing.
const LIST_PAGE: i64 = 500;

/// Client TLS for etcd, as PEM bytes (flannel's `--etcd-certfile`,
/// `--etcd-keyfile` and optional `--etcd-cafile`).
#[derive(Clone)]
pub struct EtcdTls {
    /// The client certificate chain.
    pub cert_pem: Vec<u8>,
    /// The client private key.
    pub key_pem: Vec<u8>,
    /// CA certificates to trust; `None`: the system's roots.
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for EtcdTls {
    // Hand-written so that a private key never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("custom_ca", &self.ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// How to reach etcd.
#[derive(Clone, Default)]
pub struct EtcdOptions {
    /// Client URLs (`http://198.18.0.1:2379`); requests fail over between them.
    pub endpoints: Vec<String>,
    /// Key prefix; a trailing `/` is ignored, as with flannel's `path.Join`.
    pub prefix: String,
    /// User name and password for etcd authentication.
    pub credentials: Option<(String, String)>,
    /// Time limit of each unary request (default 5 s).
    pub request_timeout: Option<Duration>,
    /// Client TLS; the endpoints must then be `https://` URLs.
    pub tls: Option<EtcdTls>,
}

impl std::fmt::Debug for EtcdOptions {
    // Hand-written so that a password never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("user", &self.credentials.as_ref().map(|(user, _)| user))
            .field("request_timeout", &self.request_timeout)
            .field("tls", &self.tls)
            .finish()
    }
}

/// A lease store on etcd. Clones share the connections.
///
/// There is one client per endpoint and requests go to the current one; a
/// request that finds it unreachable moves every later request to the next
/// endpoint (the caller's retry then lands there). etcd-client's own
/// balancing kept choosing a dead member after its leader was killed.
#[derive(Clone)]
pub struct EtcdStore {
    clients: Arc<[Client]>,
    current: Arc<AtomicUsize>,
    config_key: String,
    /// `<prefix>/subnets/`, with the trailing slash.
    subnets_dir: String,
    timeout: Duration,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("subnets_dir", &self.subnets_dir)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Sets up a client. Without credentials no request is made yet, so this
    /// succeeds while etcd is down; the first request reports it.
    pub async fn connect(options: &EtcdOptions) -> Result<Self, StoreError> {
        if options.endpoints.is_empty() {
            return Err(StoreError::Rejected("no etcd endpoints given".into()));
        }
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            // Like flannel's watch: refuse to serve from a member without a leader.
            .with_require_leader(true);
        if let Some((user, password)) = &options.credentials {
            connect = connect.with_user(user, password);
        }
        if let Some(tls) = &options.tls {
            let mut config =
                TlsOptions::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
            config = match &tls.ca_pem {
                Some(ca) => config.ca_certificate(Certificate::from_pem(ca)),
                None => config.with_native_roots(),
            };
            connect = connect.with_tls(config);
        }
        let mut clients = Vec::with_capacity(options.endpoints.len());
        let mut last_error = None;
        for endpoint in &options.endpoints {
            // Without credentials this makes no request; with them it logs
            // in, so an endpoint that is down now is left out.
            match Client::connect([endpoint], Some(connect.clone())).await {
                Ok(client) => clients.push(client),
                Err(error) => {
                    warn!(%endpoint, %error, "cannot connect to this etcd endpoint");
                    last_error = Some(store_error(error));
                }
            }
        }
        if clients.is_empty() {
            return Err(last_error
                .unwrap_or_else(|| StoreError::Rejected("no etcd endpoints given".into())));
        }
        let prefix = options.prefix.trim_end_matches('/');
        Ok(Self {
            clients: clients.into(),
            current: Arc::new(AtomicUsize::new(0)),
            config_key: format!("{prefix}/config"),
            subnets_dir: format!("{prefix}/subnets/"),
            timeout: options.request_timeout.unwrap_or(Duration::from_secs(5)),
        })
    }

    /// The full etcd key of a lease.
    pub fn lease_key(&self, key: &SubnetKey) -> String {
        format!("{}{key}", self.subnets_dir)
    }

    /// The full etcd key of the network config.
    pub fn config_key(&self) -> &str {
        &self.config_key
    }

    /// The client requests go to now (tests use it to write raw keys and compact).
    pub fn client(&self) -> Client {
        self.pick().1
    }

    /// The current endpoint's index and client.
    fn pick(&self) -> (usize, Client) {
        let index = self.current.load(Ordering::Relaxed) % self.clients.len();
        (index, self.clients[index].clone())
    }

    /// Awaits `request` (made with the client of endpoint `used`) with a
    /// timeout. If the endpoint was unreachable, later requests go to the
    /// next one.
    async fn call<T, F>(&self, used: usize, what: &str, request: F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        let result = match tokio::time::timeout(self.timeout, request).await {
            Ok(result) => result.map_err(store_error),
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd {what} timed out after {:?}",
                self.timeout
            ))),
        };
        if matches!(result, Err(StoreError::Unavailable(_))) && self.clients.len() > 1 {
            let next = (used + 1) % self.clients.len();
            // Only the first request to notice moves on; later ones that
            // used the same dead endpoint must not skip a good one.
            if self
                .current
                .compare_exchange(used, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                warn!(
                    what,
                    next_endpoint = next,
                    "etcd endpoint unreachable; trying the next one"
                );
            }
        }
        result
    }

    /// Grants a TTL lease for `ttl`; `(0, None)` for a reservation.
    async fn grant(&self, ttl: Ttl) -> Result<(i64, Option<Duration>), StoreError> {
        match ttl {
            Ttl::Never => Ok((0, None)),
            Ttl::Expiring(duration) => {
                let seconds = i64::try_from(duration.as_secs().max(1)).unwrap_or(i64::MAX);
                let (used, mut client) = self.pick();
                let granted = self
                    .call(used, "lease grant", client.lease_grant(seconds, None))
                    .await?;
                let ttl = Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(0));
                Ok((granted.id(), Some(ttl)))
            }
        }
    }

    /// Best-effort revoke of a lease we granted but did not use.
    async fn discard(&self, id: i64) {
        if id != 0
            && let Err(error) = self.revoke(id).await
        {
            warn!(ttl_lease = id, %error, "could not revoke an unused etcd lease; it expires by itself");
        }
    }

    /// Runs a write transaction: `compare` then put `lease` with a fresh TTL,
    /// else read the key back.
    async fn put_if(
        &self,
        lease: &Lease,
        ttl: Ttl,
        compare: Compare,
    ) -> Result<Result<Written, Option<StoredLease>>, StoreError> {
        let key = self.lease_key(&lease.key);
        let (id, granted) = self.grant(ttl).await?;
        let put_options = (id != 0).then(|| PutOptions::new().with_lease(id));
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(key.as_str(), lease.attrs.encode(), put_options)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let (used, mut client) = self.pick();
        let response = match self.call(used, "transaction", client.txn(txn)).await {
            Ok(response) => response,
            Err(error) => {
                // If the put did land, revoking also deletes the key, so an
                // unknown outcome never leaves a lease nobody renews.
                self.discard(id).await;
                return Err(error);
            }
        };
        if response.succeeded() {
            let mod_revision = response.header().map_or(0, |h| h.revision());
            return Ok(Ok(Written {
                stored: StoredLease {
                    lease: lease.clone(),
                    mod_revision,
                    ttl_lease: id,
                },
                ttl: granted,
            }));
        }
        self.discard(id).await;
        let current = response.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().and_then(|kv| self.decode(kv)),
            _ => None,
        });
        Ok(Err(current))
    }

    /// Lists the leases in pages of [`LIST_PAGE`] keys, every page read at
    /// the first page's revision: one consistent snapshot, without holding
    /// one response for thousands of leases in memory.
    async fn list_pages(&self) -> Result<LeaseListing, StoreError> {
        let end = prefix_end(&self.subnets_dir);
        let mut start = self.subnets_dir.clone().into_bytes();
        let mut listing = LeaseListing::default();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if listing.revision > 0 {
                options = options.with_revision(listing.revision);
            }
            let (used, mut client) = self.pick();
            let response = self
                .call(
                    used,
                    "list leases",
                    client.get(start.clone(), Some(options)),
                )
                .await?;
            if listing.revision == 0 {
                listing.revision = response.header().map_or(0, |h| h.revision());
            }
            for kv in response.kvs() {
                match self.decode(kv) {
                    Some(stored) => listing.leases.push(stored),
                    None => listing.skipped += 1,
                }
            }
            match response.kvs().last() {
                Some(last) if response.more() => {
                    // The next key after the last one read.
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok(listing),
            }
        }
    }

    /// Decodes one key-value; logs and returns `None` for anything else
    /// stored under the prefix.
    fn decode(&self, kv: &KeyValue) -> Option<StoredLease> {
        let key = String::from_utf8_lossy(kv.key());
        let segment = key.strip_prefix(&self.subnets_dir).unwrap_or(&key);
        let value = String::from_utf8_lossy(kv.value());
        match Lease::decode(segment, &value) {
            Ok(lease) => Some(StoredLease {
                lease,
                mod_revision: kv.mod_revision(),
                ttl_lease: kv.lease(),
            }),
            Err(error) => {
                warn!(%key, %error, "skipping an entry under the subnets prefix that is not a lease");
                None
            }
        }
    }

    fn decode_delete(&self, kv: &KeyValue) -> Option<SubnetKey> {
        let key = String::from_utf8_lossy(kv.key());
        let segment = key.strip_prefix(&self.subnets_dir).unwrap_or(&key);
        SubnetKey::parse(segment).ok()
    }

    fn decode_batch(&self, response: &etcd_client::WatchResponse) -> WatchBatch {
        let mut events = Vec::with_capacity(response.events().len());
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            match event.event_type() {
                EventType::Put => events.extend(self.decode(kv).map(WatchEvent::Put)),
                EventType::Delete => events.extend(self.decode_delete(kv).map(WatchEvent::Delete)),
            }
        }
        let revision = response
            .events()
            .iter()
            .filter_map(|e| e.kv().map(KeyValue::mod_revision))
            .max()
            .or_else(|| response.header().map(|h| h.revision()))
            .unwrap_or(0);
        WatchBatch { revision, events }
    }
}

impl LeaseStore for EtcdStore {
    async fn network_config(&self) -> Result<Option<String>, StoreError> {
        let (used, mut client) = self.pick();
        let response = self
            .call(
                used,
                "get config",
                client.get(self.config_key.as_str(), None),
            )
            .await?;
        Ok(response
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    async fn list(&self) -> Result<LeaseListing, StoreError> {
        // A compaction between two pages makes the later page fail: start over.
        let mut attempts = 0;
        loop {
            match self.list_pages().await {
                Err(StoreError::Rejected(message))
                    if message.contains("compacted") && attempts < 3 =>
                {
                    attempts += 1;
                }
                result => return result,
            }
        }
    }

    async fn create(&self, lease: &Lease, ttl: Ttl) -> Result<CreateOutcome, StoreError> {
        let key = self.lease_key(&lease.key);
        let absent = Compare::create_revision(key, CompareOp::Equal, 0);
        Ok(match self.put_if(lease, ttl, absent).await? {
            Ok(written) => CreateOutcome::Created(written),
            Err(current) => CreateOutcome::Exists(current),
        })
    }

    async fn update(
        &self,
        lease: &Lease,
        ttl: Ttl,
        expected_revision: i64,
    ) -> Result<UpdateOutcome, StoreError> {
        // etcd reports mod revision 0 for a missing key, so comparing with 0
        // would "update" (create) a key that is gone.
        if expected_revision <= 0 {
            return Ok(UpdateOutcome::Changed(None));
        }
        let key = self.lease_key(&lease.key);
        let unchanged = Compare::mod_revision(key, CompareOp::Equal, expected_revision);
        Ok(match self.put_if(lease, ttl, unchanged).await? {
            Ok(written) => UpdateOutcome::Updated(written),
            Err(current) => UpdateOutcome::Changed(current),
        })
    }

    async fn delete(
        &self,
        key: &SubnetKey,
        expected_revision: Option<i64>,
    ) -> Result<bool, StoreError> {
        let full_key = self.lease_key(key);
        let (used, mut client) = self.pick();
        if expected_revision.is_some_and(|revision| revision <= 0) {
            return Ok(false);
        }
        let Some(revision) = expected_revision else {
            let response = self
                .call(used, "delete", client.delete(full_key.as_str(), None))
                .await?;
            return Ok(response.deleted() > 0);
        };
        let txn = Txn::new()
            .when([Compare::mod_revision(
                full_key.as_str(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::delete(full_key.as_str(), None)]);
        let response = self.call(used, "delete", client.txn(txn)).await?;
        Ok(response.succeeded())
    }

    async fn revoke(&self, ttl_lease: i64) -> Result<(), StoreError> {
        let (used, mut client) = self.pick();
        match self
            .call(used, "lease revoke", client.lease_revoke(ttl_lease))
            .await
        {
            Ok(_) => Ok(()),
            // Already expired or revoked: the goal is reached.
            Err(StoreError::Rejected(message)) if message.contains("lease not found") => Ok(()),
            Err(error) => Err(error),
        }
    }

    async fn watch(&self, from_revision: i64) -> Result<WatchStream, StoreError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from_revision);
        let (used, mut client) = self.pick();
        let stream = self
            .call(
                used,
                "watch",
                client.watch(self.subnets_dir.as_str(), Some(options)),
            )
            .await?;
        let store = self.clone();
        // Turn responses into batches; end the stream after the first error.
        let batches = stream
            .map(move |item| match item {
                Err(error) => Some(Err(store_error(error))),
                Ok(response) if response.canceled() => {
                    Some(Err(if response.compact_revision() > 0 {
                        StoreError::Compacted {
                            requested: from_revision,
                            compacted: response.compact_revision(),
                        }
                    } else {
                        StoreError::WatchCancelled(response.cancel_reason().to_owned())
                    }))
                }
                Ok(response) if response.events().is_empty() => None,
                Ok(response) => Some(Ok(store.decode_batch(&response))),
            })
            .filter_map(futures::future::ready)
            .scan(false, |failed, item| {
                let done = *failed;
                *failed = item.is_err();
                futures::future::ready((!done).then_some(item))
            });
        Ok(batches.boxed())
    }
}

/// The end of the key range holding every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    // Only for a prefix of 0xff bytes: etcd's "to the end of the keyspace".
    vec![0]
}

/// Maps a client error to a store error: transport trouble and gRPC codes
/// that mean "try again" are `Unavailable`, the rest `Rejected`.
fn store_error(error: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match &error {
        E::GRpcStatus(status) => {
            use tonic::Code;
            match status.code() {
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Aborted
                | Code::Unknown
                | Code::Internal => StoreError::Unavailable(status.message().to_owned()),
                _ => StoreError::Rejected(status.message().to_owned()),
            }
        }
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) => {
            StoreError::Unavailable(error.to_string())
        }
        _ => StoreError::Rejected(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(
            prefix_end("/coreos.com/network/subnets/"),
            b"/coreos.com/network/subnets0"
        );
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80");
        assert_eq!(prefix_end(""), vec![0]);
    }
}
