//! An in-memory [`LeaseStore`] with etcd's semantics, for unit tests.
//!
//! It keeps etcd's revision counter, compare-and-swap transactions, TTL leases
//! (that expire on tokio's clock, so tests can pause time), watch history with
//! compaction, and raw writes of undecodable keys. Test hooks can cut every
//! watch ([`MemStore::disconnect_watchers`]) or compact history
//! ([`MemStore::compact`]) to drive the manager's recovery paths.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{
    CreateOutcome, LeaseListing, LeaseStore, StoreError, StoredLease, Ttl, UpdateOutcome,
    WatchBatch, WatchEvent, WatchStream, Written,
};
use crate::lease::{Lease, SubnetKey};

/// How often the background task expires TTL leases.
const REAP_INTERVAL: Duration = Duration::from_millis(50);

/// An in-memory lease store. Clones share the same data.
#[derive(Debug, Clone)]
pub struct MemStore {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    revision: i64,
    compacted: i64,
    config: Option<String>,
    /// Key segment (`10.244.1.0-24` or any raw text) to entry.
    entries: BTreeMap<String, Entry>,
    ttl_leases: HashMap<i64, TtlLease>,
    next_lease_id: i64,
    history: Vec<(i64, RawEvent)>,
    watchers: Vec<mpsc::UnboundedSender<Result<WatchBatch, StoreError>>>,
}

#[derive(Debug, Clone)]
struct Entry {
    value: String,
    mod_revision: i64,
    ttl_lease: i64,
}

#[derive(Debug)]
struct TtlLease {
    deadline: Instant,
    keys: BTreeSet<String>,
}

#[derive(Debug, Clone)]
enum RawEvent {
    Put(String, Entry),
    Delete(String),
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemStore {
    /// An empty store. Inside a tokio runtime it also starts a task that
    /// expires TTL leases (and stops when the last clone is dropped);
    /// elsewhere leases expire when the store is next used.
    pub fn new() -> Self {
        let state = Arc::new(Mutex::new(State {
            next_lease_id: 1,
            ..State::default()
        }));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(reap(Arc::downgrade(&state)));
        }
        Self { state }
    }

    /// Sets `<prefix>/config`.
    pub fn set_config(&self, text: &str) {
        self.lock().config = Some(text.to_owned());
    }

    /// Writes any text under any key segment, without a TTL (for tests of
    /// garbage under the prefix and of reservations).
    pub fn put_raw(&self, segment: &str, value: &str) {
        let mut state = self.lock();
        state.write(segment.to_owned(), value.to_owned(), 0);
    }

    /// Writes any text under any key segment with a fresh TTL lease.
    pub fn put_raw_with_ttl(&self, segment: &str, value: &str, ttl: Duration) {
        let mut state = self.lock();
        let (id, _) = state.grant(Ttl::Expiring(ttl));
        state.write(segment.to_owned(), value.to_owned(), id);
    }

    /// Deletes a key segment regardless of its revision.
    pub fn delete_raw(&self, segment: &str) -> bool {
        self.lock().remove(segment)
    }

    /// Drops history up to `revision`; watches from at or before it fail
    /// with [`StoreError::Compacted`].
    pub fn compact(&self, revision: i64) {
        let mut state = self.lock();
        state.compacted = state.compacted.max(revision);
        state.history.retain(|(rev, _)| *rev > revision);
    }

    /// Ends every open watch with an error, as a lost connection would.
    pub fn disconnect_watchers(&self) {
        for watcher in self.lock().watchers.drain(..) {
            let _ = watcher.send(Err(StoreError::Unavailable("disconnected by test".into())));
        }
    }

    /// The current revision.
    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// How many TTL leases exist (granted and neither revoked nor expired).
    pub fn ttl_lease_count(&self) -> usize {
        self.lock().ttl_leases.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        state.expire(Instant::now());
        state
    }
}

async fn reap(state: Weak<Mutex<State>>) {
    loop {
        tokio::time::sleep(REAP_INTERVAL).await;
        let Some(state) = state.upgrade() else { return };
        let mut guard = state.lock().unwrap_or_else(|poison| poison.into_inner());
        guard.expire(Instant::now());
    }
}

impl State {
    fn grant(&mut self, ttl: Ttl) -> (i64, Option<Duration>) {
        match ttl {
            Ttl::Never => (0, None),
            Ttl::Expiring(duration) => {
                let granted = Duration::from_secs(duration.as_secs().max(1));
                let id = self.next_lease_id;
                self.next_lease_id += 1;
                self.ttl_leases.insert(
                    id,
                    TtlLease {
                        deadline: Instant::now() + granted,
                        keys: BTreeSet::new(),
                    },
                );
                (id, Some(granted))
            }
        }
    }

    fn write(&mut self, segment: String, value: String, ttl_lease: i64) -> Entry {
        self.revision += 1;
        if let Some(old) = self.entries.get(&segment)
            && let Some(lease) = self.ttl_leases.get_mut(&old.ttl_lease)
        {
            lease.keys.remove(&segment);
        }
        if let Some(lease) = self.ttl_leases.get_mut(&ttl_lease) {
            lease.keys.insert(segment.clone());
        }
        let entry = Entry {
            value,
            mod_revision: self.revision,
            ttl_lease,
        };
        self.entries.insert(segment.clone(), entry.clone());
        self.publish(RawEvent::Put(segment, entry.clone()));
        entry
    }

    fn remove(&mut self, segment: &str) -> bool {
        let Some(old) = self.entries.remove(segment) else {
            return false;
        };
        if let Some(lease) = self.ttl_leases.get_mut(&old.ttl_lease) {
            lease.keys.remove(segment);
        }
        self.revision += 1;
        self.publish(RawEvent::Delete(segment.to_owned()));
        true
    }

    fn revoke(&mut self, id: i64) {
        if let Some(lease) = self.ttl_leases.remove(&id) {
            for segment in lease.keys {
                self.remove(&segment);
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        let expired: Vec<i64> = self
            .ttl_leases
            .iter()
            .filter(|(_, lease)| lease.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.revoke(id);
        }
    }

    fn publish(&mut self, event: RawEvent) {
        let revision = self.revision;
        self.history.push((revision, event.clone()));
        let batch = WatchBatch {
            revision,
            events: decode_event(&event).into_iter().collect(),
        };
        self.watchers
            .retain(|watcher| watcher.send(Ok(batch.clone())).is_ok());
    }

    fn stored(&self, segment: &str) -> Option<StoredLease> {
        let entry = self.entries.get(segment)?;
        decode_entry(segment, entry)
    }
}

fn decode_entry(segment: &str, entry: &Entry) -> Option<StoredLease> {
    let lease = Lease::decode(segment, &entry.value).ok()?;
    Some(StoredLease {
        lease,
        mod_revision: entry.mod_revision,
        ttl_lease: entry.ttl_lease,
    })
}

fn decode_event(event: &RawEvent) -> Option<WatchEvent> {
    match event {
        RawEvent::Put(segment, entry) => decode_entry(segment, entry).map(WatchEvent::Put),
        RawEvent::Delete(segment) => SubnetKey::parse(segment).ok().map(WatchEvent::Delete),
    }
}

impl LeaseStore for MemStore {
    async fn network_config(&self) -> Result<Option<String>, StoreError> {
        Ok(self.lock().config.clone())
    }

    async fn list(&self) -> Result<LeaseListing, StoreError> {
        let state = self.lock();
        let mut listing = LeaseListing {
            revision: state.revision,
            ..LeaseListing::default()
        };
        for (segment, entry) in &state.entries {
            match decode_entry(segment, entry) {
                Some(stored) => listing.leases.push(stored),
                None => listing.skipped += 1,
            }
        }
        Ok(listing)
    }

    async fn create(&self, lease: &Lease, ttl: Ttl) -> Result<CreateOutcome, StoreError> {
        let mut state = self.lock();
        let segment = lease.key.to_string();
        if state.entries.contains_key(&segment) {
            return Ok(CreateOutcome::Exists(state.stored(&segment)));
        }
        let (id, granted) = state.grant(ttl);
        let entry = state.write(segment, lease.attrs.encode(), id);
        Ok(CreateOutcome::Created(written(lease, &entry, granted)))
    }

    async fn update(
        &self,
        lease: &Lease,
        ttl: Ttl,
        expected_revision: i64,
    ) -> Result<UpdateOutcome, StoreError> {
        let mut state = self.lock();
        let segment = lease.key.to_string();
        match state.entries.get(&segment) {
            Some(entry) if entry.mod_revision == expected_revision => {}
            _ => return Ok(UpdateOutcome::Changed(state.stored(&segment))),
        }
        let (id, granted) = state.grant(ttl);
        let entry = state.write(segment, lease.attrs.encode(), id);
        Ok(UpdateOutcome::Updated(written(lease, &entry, granted)))
    }

    async fn delete(
        &self,
        key: &SubnetKey,
        expected_revision: Option<i64>,
    ) -> Result<bool, StoreError> {
        let mut state = self.lock();
        let segment = key.to_string();
        let matches = match (state.entries.get(&segment), expected_revision) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(entry), Some(rev)) => entry.mod_revision == rev,
        };
        Ok(matches && state.remove(&segment))
    }

    async fn revoke(&self, ttl_lease: i64) -> Result<(), StoreError> {
        self.lock().revoke(ttl_lease);
        Ok(())
    }

    async fn watch(&self, from_revision: i64) -> Result<WatchStream, StoreError> {
        let mut state = self.lock();
        if from_revision <= state.compacted {
            return Err(StoreError::Compacted {
                requested: from_revision,
                compacted: state.compacted,
            });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        for (revision, event) in &state.history {
            if *revision >= from_revision {
                let batch = WatchBatch {
                    revision: *revision,
                    events: decode_event(event).into_iter().collect(),
                };
                let _ = tx.send(Ok(batch));
            }
        }
        state.watchers.push(tx);
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(stream.boxed())
    }
}

fn written(lease: &Lease, entry: &Entry, ttl: Option<Duration>) -> Written {
    Written {
        stored: StoredLease {
            lease: lease.clone(),
            mod_revision: entry.mod_revision,
            ttl_lease: entry.ttl_lease,
        },
        ttl,
    }
}
