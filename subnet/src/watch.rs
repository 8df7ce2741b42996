//! The set of peer leases a node knows, and the events that change it (pure).
//!
//! The store reports either individual changes (a lease put or deleted) or a
//! full snapshot (at start, after a reconnect or a compaction). [`PeerSet`]
//! turns both into [`LeaseEvent`]s for the backend: a snapshot is diffed
//! against what was known, so a peer that vanished while the watch was down is
//! still removed, and nothing is removed just because a watch failed. The
//! node's own subnet is never a peer.

use std::collections::HashMap;
use std::sync::Arc;

use crate::lease::{Lease, SubnetKey};

/// A lease shared between the peer set, the events about it and the backend
/// (one allocation per peer however many hold it; thousands of peers add up).
pub type SharedLease = Arc<Lease>;

/// One change to a single lease, as read from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerUpdate {
    /// The lease was created or its value rewritten (a renewal, a new VTEP MAC).
    Put(Lease),
    /// The lease's key was deleted or its etcd lease expired.
    Delete(SubnetKey),
}

/// What a backend must do about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// A new peer: program a route to it.
    Added(SharedLease),
    /// A known peer published different attributes (public IP, VTEP MAC, ...):
    /// remove what `old` needed and program `new`.
    Changed {
        /// The attributes that were programmed.
        old: SharedLease,
        /// The attributes to program now.
        new: SharedLease,
    },
    /// A peer is gone: remove what it needed (the last known lease says what).
    Removed(SharedLease),
}

/// The peers a node currently knows.
#[derive(Debug, Clone, Default)]
pub struct PeerSet {
    own: Option<SubnetKey>,
    known: HashMap<SubnetKey, SharedLease>,
}

impl PeerSet {
    /// An empty set that ignores `own` (the node's own lease).
    pub fn new(own: Option<SubnetKey>) -> Self {
        Self {
            own,
            known: HashMap::new(),
        }
    }

    /// Changes which subnet is our own (after a re-acquisition). If the new
    /// own subnet was known as a peer, it is reported removed.
    pub fn set_own(&mut self, own: Option<SubnetKey>) -> Vec<LeaseEvent> {
        self.own = own;
        own.and_then(|key| self.known.remove(&key))
            .map(LeaseEvent::Removed)
            .into_iter()
            .collect()
    }

    /// Applies individual changes. A put that repeats what is known (every
    /// renewal does) yields no event; a delete of an unknown key yields none.
    pub fn apply(&mut self, updates: impl IntoIterator<Item = PeerUpdate>) -> Vec<LeaseEvent> {
        let mut events = Vec::new();
        for update in updates {
            match update {
                PeerUpdate::Put(lease) => {
                    if Some(lease.key) == self.own {
                        continue;
                    }
                    events.extend(self.put(lease));
                }
                PeerUpdate::Delete(key) => {
                    events.extend(self.known.remove(&key).map(LeaseEvent::Removed));
                }
            }
        }
        events
    }

    /// Replaces the known set with a full snapshot and returns the difference:
    /// `Added` for new peers, `Changed` for peers whose attributes differ and
    /// `Removed` for peers missing from the snapshot.
    pub fn resync(&mut self, snapshot: impl IntoIterator<Item = Lease>) -> Vec<LeaseEvent> {
        let mut previous = std::mem::take(&mut self.known);
        let mut events = Vec::new();
        for lease in snapshot {
            if Some(lease.key) == self.own {
                continue;
            }
            if let Some(old) = previous.remove(&lease.key) {
                self.known.insert(old.key, old);
            }
            events.extend(self.put(lease));
        }
        let mut removed: Vec<SharedLease> = previous.into_values().collect();
        removed.sort_by_key(|lease| lease.key);
        events.extend(removed.into_iter().map(LeaseEvent::Removed));
        events
    }

    /// The known peers, in no particular order.
    pub fn peers(&self) -> impl Iterator<Item = &SharedLease> {
        self.known.values()
    }

    /// How many peers are known.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// Whether no peer is known.
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    fn put(&mut self, lease: Lease) -> Option<LeaseEvent> {
        match self.known.get(&lease.key) {
            // A renewal: nothing changed, keep what we have.
            Some(old) if old.attrs == lease.attrs => None,
            Some(old) => {
                let old = Arc::clone(old);
                let new = Arc::new(lease);
                self.known.insert(new.key, Arc::clone(&new));
                Some(LeaseEvent::Changed { old, new })
            }
            None => {
                let new = Arc::new(lease);
                self.known.insert(new.key, Arc::clone(&new));
                Some(LeaseEvent::Added(new))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseAttrs;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn lease(third: u8, public: u8) -> Lease {
        Lease {
            key: SubnetKey::v4(format!("10.244.{third}.0/24").parse().unwrap()),
            attrs: LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, public)),
        }
    }

    #[test]
    fn put_add_change_repeat_delete() {
        let mut set = PeerSet::new(None);
        assert_eq!(
            set.apply([PeerUpdate::Put(lease(1, 1))]),
            vec![LeaseEvent::Added(lease(1, 1).into())]
        );
        assert_eq!(set.apply([PeerUpdate::Put(lease(1, 1))]), vec![]);
        assert_eq!(
            set.apply([PeerUpdate::Put(lease(1, 2))]),
            vec![LeaseEvent::Changed {
                old: lease(1, 1).into(),
                new: lease(1, 2).into()
            }]
        );
        assert_eq!(
            set.apply([PeerUpdate::Delete(lease(1, 2).key)]),
            vec![LeaseEvent::Removed(lease(1, 2).into())]
        );
        assert_eq!(set.apply([PeerUpdate::Delete(lease(1, 2).key)]), vec![]);
    }

    #[test]
    fn own_lease_is_never_a_peer() {
        let mut set = PeerSet::new(Some(lease(5, 5).key));
        assert!(set.apply([PeerUpdate::Put(lease(5, 5))]).is_empty());
        assert!(set.resync([lease(5, 5)]).is_empty());
        set.apply([PeerUpdate::Put(lease(6, 6))]);
        assert_eq!(
            set.set_own(Some(lease(6, 6).key)),
            vec![LeaseEvent::Removed(lease(6, 6).into())]
        );
        assert!(set.is_empty());
    }

    #[test]
    fn resync_diffs_against_known() {
        let mut set = PeerSet::new(None);
        set.resync([lease(1, 1), lease(2, 2), lease(3, 3)]);
        let events = set.resync([lease(1, 1), lease(2, 9), lease(4, 4)]);
        assert_eq!(
            events,
            vec![
                LeaseEvent::Changed {
                    old: lease(2, 2).into(),
                    new: lease(2, 9).into()
                },
                LeaseEvent::Added(lease(4, 4).into()),
                LeaseEvent::Removed(lease(3, 3).into()),
            ]
        );
        assert_eq!(set.len(), 3);
    }

    fn arb_update() -> impl Strategy<Value = PeerUpdate> {
        prop_oneof![
            (0u8..8, 0u8..3).prop_map(|(t, p)| PeerUpdate::Put(lease(t, p))),
            (0u8..8).prop_map(|t| PeerUpdate::Delete(lease(t, 0).key)),
        ]
    }

    proptest! {
        /// Events followed by a snapshot leave the same set as the snapshot
        /// alone, and replaying the emitted events onto the old set rebuilds it.
        #[test]
        fn events_then_resync_equals_resync(
            updates in proptest::collection::vec(arb_update(), 0..30),
            snapshot in proptest::collection::btree_map(0u8..8, 0u8..3, 0..8),
        ) {
            let snapshot: Vec<Lease> = snapshot.into_iter().map(|(t, p)| lease(t, p)).collect();
            let mut a = PeerSet::new(Some(lease(7, 0).key));
            a.apply(updates);
            let before: HashMap<SubnetKey, SharedLease> = a.known.clone();
            let events = a.resync(snapshot.clone());
            let mut b = PeerSet::new(Some(lease(7, 0).key));
            b.resync(snapshot);
            prop_assert_eq!(&a.known, &b.known);

            let mut replayed = before;
            for event in events {
                match event {
                    LeaseEvent::Added(l) => prop_assert!(replayed.insert(l.key, l).is_none()),
                    LeaseEvent::Changed { old, new } => {
                        prop_assert_eq!(replayed.insert(new.key, new), Some(old));
                    }
                    LeaseEvent::Removed(l) => prop_assert_eq!(replayed.remove(&l.key), Some(l)),
                }
            }
            prop_assert_eq!(&replayed, &a.known);
        }
    }
}
