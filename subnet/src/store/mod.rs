//! Lease storage: the [`LeaseStore`] trait and its in-memory implementation.
//!
//! A store only stores: it never decides which subnet to take. It speaks in
//! decoded leases, and decodes once, at its boundary; a key or value it cannot
//! decode is logged and skipped on its own, never allowed to hide the others.
//! The etcd implementation lives in [`crate::etcd`]; [`mem::MemStore`] keeps
//! the same semantics in memory for unit tests of the manager. One
//! conformance suite (`subnet/tests/store_conformance.rs`) runs against both.

pub mod mem;

use std::future::Future;
use std::time::Duration;

use futures::stream::BoxStream;

use crate::lease::{Lease, SubnetKey};

/// A lease as stored, with what is needed to change it safely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLease {
    /// The decoded lease.
    pub lease: Lease,
    /// The store revision of the key's last write; renewals compare on it.
    pub mod_revision: i64,
    /// The etcd lease (TTL) the key is attached to; `0` means none, which
    /// makes the key a reservation that never expires.
    pub ttl_lease: i64,
}

impl StoredLease {
    /// Whether this key is a reservation (no TTL: it never expires).
    pub fn is_reservation(&self) -> bool {
        self.ttl_lease == 0
    }
}

/// Every decodable lease at one store revision.
#[derive(Debug, Clone, Default)]
pub struct LeaseListing {
    /// The leases, in key order.
    pub leases: Vec<StoredLease>,
    /// The store revision the listing was taken at; watch from `revision + 1`.
    pub revision: i64,
    /// How many keys under the prefix could not be decoded (and were skipped).
    pub skipped: usize,
}

/// How long a written lease lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// Attach a fresh TTL lease of this duration (whole seconds, at least 1).
    Expiring(Duration),
    /// No TTL: a reservation that stays until deleted.
    Never,
}

/// The result of a compare-and-create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The key did not exist and now holds our lease.
    Created(Written),
    /// Someone holds the key already; the lease is theirs (if it decodes).
    Exists(Option<StoredLease>),
}

/// The result of a compare-and-update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// The key still had the expected revision and now holds our value.
    Updated(Written),
    /// The key changed since we read it; here is what it holds now
    /// (`None`: deleted, or no longer decodable).
    Changed(Option<StoredLease>),
}

/// A lease this node just wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The lease as now stored.
    pub stored: StoredLease,
    /// The TTL the store granted (it may round the requested one); `None`
    /// for a reservation.
    pub ttl: Option<Duration>,
}

/// One decoded change from a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A lease was created or rewritten.
    Put(StoredLease),
    /// A lease key was deleted (or its TTL expired).
    Delete(SubnetKey),
}

/// Changes delivered together: one revision, or several when a watch
/// catches up on history (etcd sends those in one response).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    /// The highest revision of these changes; a resumed watch starts after it.
    pub revision: i64,
    /// The decodable changes (undecodable ones are logged and skipped).
    pub events: Vec<WatchEvent>,
}

/// A stream of watch batches; it ends or yields an error when the watch is lost.
pub type WatchStream = BoxStream<'static, Result<WatchBatch, StoreError>>;

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or answered with a transport error.
    #[error("lease store unavailable: {0}")]
    Unavailable(String),
    /// A watch asked for history that was compacted away; take a snapshot.
    #[error("watch from revision {requested} failed: history compacted up to revision {compacted}")]
    Compacted {
        /// The revision the watch asked to start from.
        requested: i64,
        /// The store's compaction revision.
        compacted: i64,
    },
    /// The store cancelled a watch for another reason.
    #[error("watch cancelled by the store: {0}")]
    WatchCancelled(String),
    /// The store refused the request (bad request, permission, TTL too long...).
    #[error("lease store refused the request: {0}")]
    Rejected(String),
}

/// Storage of the network config and the subnet leases under one prefix.
///
/// Clones share one connection. Every method is one round trip (or one
/// transaction) and may be retried by the caller.
pub trait LeaseStore: Clone + Send + Sync + 'static {
    /// The raw text of `<prefix>/config`, or `None` if the key is absent.
    fn network_config(&self) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Every decodable lease and the revision they were read at.
    fn list(&self) -> impl Future<Output = Result<LeaseListing, StoreError>> + Send;

    /// Writes `lease` if and only if its key does not exist (compare-and-create).
    fn create(
        &self,
        lease: &Lease,
        ttl: Ttl,
    ) -> impl Future<Output = Result<CreateOutcome, StoreError>> + Send;

    /// Rewrites `lease` if and only if its key exists and its mod revision is
    /// still `expected_revision` (which must be positive), attaching a fresh TTL (or none for [`Ttl::Never`]).
    /// The TTL lease the key had before is not touched: see [`Self::revoke`].
    fn update(
        &self,
        lease: &Lease,
        ttl: Ttl,
        expected_revision: i64,
    ) -> impl Future<Output = Result<UpdateOutcome, StoreError>> + Send;

    /// Deletes the key, only if its mod revision is still `expected_revision`
    /// when given (a non-positive one never matches). Returns whether a key
    /// was deleted.
    fn delete(
        &self,
        key: &SubnetKey,
        expected_revision: Option<i64>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Revokes a TTL lease this node no longer uses (after a renewal moved its
    /// key to a new one). An unknown or already expired lease is not an error.
    /// Revoking a TTL lease deletes every key still attached to it.
    fn revoke(&self, ttl_lease: i64) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Watches the lease keys from `from_revision` (inclusive).
    fn watch(
        &self,
        from_revision: i64,
    ) -> impl Future<Output = Result<WatchStream, StoreError>> + Send;
}
