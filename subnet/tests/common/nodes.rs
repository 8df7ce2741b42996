//! Simulated nodes: lease managers with distinct public IPs, run in the
//! background with every event they report recorded and replayed.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use subnet::NetworkConfig;
use subnet::lease::{LeaseAttrs, MacAddr, SubnetKey, VxlanData};
use subnet::manager::{LeaseManager, ManagerError, ManagerEvent, ManagerOptions, OwnLease};
use subnet::store::LeaseStore;
use subnet::watch::{LeaseEvent, SharedLease};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

use super::harness::{DEFAULT_CONFIG, Harness};

pub(crate) fn config() -> NetworkConfig {
    NetworkConfig::parse(DEFAULT_CONFIG).unwrap()
}

/// Node `n`'s attributes: public IP 198.18.0.1 + n and a VTEP MAC.
pub(crate) fn attrs(n: u32) -> LeaseAttrs {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 1)) + n);
    let [_, _, hi, lo] = n.to_be_bytes();
    let mac = MacAddr([0x02, 0, 0, 0, hi, lo]);
    LeaseAttrs {
        backend_type: "vxlan".into(),
        backend_data: Some(
            VxlanData {
                vni: 1,
                vtep_mac: mac,
            }
            .encode(),
        ),
        ..LeaseAttrs::new(ip)
    }
}

pub(crate) fn manager<S: LeaseStore>(store: S, n: u32, options: ManagerOptions) -> LeaseManager<S> {
    LeaseManager::new(store, &config(), attrs(n), options)
        .unwrap()
        .with_seed(u64::from(n))
}

pub(crate) fn short_ttl() -> ManagerOptions {
    ManagerOptions {
        ttl: Duration::from_secs(10),
        renew_margin: Duration::from_secs(5),
        renew_retry: Duration::from_millis(500),
        max_backoff: Duration::from_secs(1),
    }
}

pub(crate) async fn acquire<H: Harness>(h: &H, n: u32) -> OwnLease {
    manager(h.store(), n, ManagerOptions::default())
        .acquire(None)
        .await
        .unwrap()
}

/// A manager running in the background, and everything it reported.
pub(crate) struct Running {
    events: mpsc::Receiver<ManagerEvent>,
    /// Every event, in order.
    pub(crate) log: Vec<ManagerEvent>,
    /// The peer set rebuilt from the events alone.
    pub(crate) view: BTreeMap<SubnetKey, SharedLease>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ManagerError>>,
}

impl Running {
    pub(crate) fn start<S: LeaseStore>(manager: LeaseManager<S>, own: OwnLease) -> Self {
        let (tx, events) = mpsc::channel(1024);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(manager.run(own, tx, async {
            let _ = stopped.await;
        }));
        Self {
            events,
            log: Vec::new(),
            view: BTreeMap::new(),
            stop: Some(stop),
            task,
        }
    }

    fn apply(&mut self, event: &ManagerEvent) {
        let changes = match event {
            ManagerEvent::PeersResynced { peers, changes } => {
                let mut replayed = self.view.clone();
                apply_changes(&mut replayed, changes);
                let expected: BTreeMap<_, _> = peers.iter().map(|l| (l.key, l.clone())).collect();
                assert_eq!(
                    replayed, expected,
                    "resync changes must turn the old view into the new set"
                );
                changes
            }
            ManagerEvent::PeersChanged(changes) => changes,
            _ => return,
        };
        apply_changes(&mut self.view, changes);
    }

    /// Consumes events until `done(view)` holds; panics after `limit`.
    pub(crate) async fn wait_until(
        &mut self,
        limit: Duration,
        what: &str,
        done: impl Fn(&Self) -> bool,
    ) {
        let deadline = Instant::now() + limit;
        while !done(self) {
            let Ok(Some(event)) = timeout(deadline - Instant::now(), self.events.recv()).await
            else {
                panic!(
                    "timed out waiting for {what}; events so far: {:#?}",
                    self.log
                );
            };
            self.apply(&event);
            self.log.push(event);
        }
    }

    pub(crate) fn peer_keys(&self) -> Vec<SubnetKey> {
        self.view.keys().copied().collect()
    }

    pub(crate) fn count(&self, matches: impl Fn(&ManagerEvent) -> bool) -> usize {
        self.log.iter().filter(|e| matches(e)).count()
    }

    pub(crate) fn count_changes(&self, matches: impl Fn(&LeaseEvent) -> bool) -> usize {
        self.log
            .iter()
            .flat_map(|e| match e {
                ManagerEvent::PeersResynced { changes, .. }
                | ManagerEvent::PeersChanged(changes) => changes.as_slice(),
                _ => &[],
            })
            .filter(|c| matches(c))
            .count()
    }

    pub(crate) async fn stop(mut self) -> Vec<ManagerEvent> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = timeout(Duration::from_secs(5), self.task)
            .await
            .expect("manager stops within 5 s")
            .expect("manager task did not panic");
        assert_eq!(result, Ok(()));
        while let Ok(event) = self.events.try_recv() {
            self.log.push(event);
        }
        self.log
    }
}

fn apply_changes(view: &mut BTreeMap<SubnetKey, SharedLease>, changes: &[LeaseEvent]) {
    for change in changes {
        match change {
            LeaseEvent::Added(lease) => {
                assert!(
                    view.insert(lease.key, lease.clone()).is_none(),
                    "Added for a known peer: {change:?}"
                );
            }
            LeaseEvent::Changed { old, new } => {
                assert_eq!(
                    view.insert(new.key, new.clone()).as_ref(),
                    Some(old),
                    "Changed from an unknown state"
                );
            }
            LeaseEvent::Removed(lease) => {
                assert_eq!(
                    view.remove(&lease.key).as_ref(),
                    Some(lease),
                    "Removed an unknown peer"
                );
            }
        }
    }
}
