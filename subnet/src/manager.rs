//! The lease manager: acquire this node's subnet, keep it, and watch peers.
//!
//! Acquisition follows flannel (reuse the lease that carries our public IP,
//! else the subnet named in the old subnet.env if it is free, else a random
//! free subnet) with these fixes:
//! - a lost compare-and-create race is retried with another subnet instead of
//!   ending the daemon;
//! - renewals compare on the key's mod revision, so they never overwrite a
//!   lease another node took, and the superseded TTL lease is revoked;
//! - a key without a TTL lease is a reservation: reused, never given a TTL;
//! - when our lease is deleted or expires we take it (or another) again, log
//!   it loudly and tell the caller, instead of exiting 0;
//! - the peer watch resumes after errors and compactions with a fresh
//!   snapshot diffed against what we knew, so no change is lost or invented.

use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;

use futures::StreamExt;
use ipnetwork::Ipv4Network;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, error, info, warn};

use crate::alloc::{is_allocatable, pick_subnet};
use crate::config::{ConfigError, Ipv4Settings, NetworkConfig};
use crate::lease::{Lease, LeaseAttrs, SubnetKey};
use crate::store::{
    CreateOutcome, LeaseStore, StoreError, StoredLease, Ttl, UpdateOutcome, WatchEvent, Written,
};
use crate::watch::{LeaseEvent, PeerSet, PeerUpdate, SharedLease};

/// flannel's fixed lease lifetime.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// flannel's default `--subnet-lease-renew-margin` (60 minutes).
pub const DEFAULT_RENEW_MARGIN: Duration = Duration::from_secs(60 * 60);
/// flannel retries a failed renewal after one minute.
pub const DEFAULT_RENEW_RETRY: Duration = Duration::from_secs(60);
/// How often acquisition starts over when the lease with our public IP keeps
/// changing under us (flannel's `raceRetries`).
const REUSE_RETRIES: usize = 10;

/// Timing of the lease lifecycle.
#[derive(Debug, Clone)]
pub struct ManagerOptions {
    /// Lifetime of a lease (24 h in flannel; shorter in tests).
    pub ttl: Duration,
    /// Renew this long before the lease expires.
    pub renew_margin: Duration,
    /// Wait this long after a failed renewal before trying again.
    pub renew_retry: Duration,
    /// Upper bound of the backoff between watch reconnections.
    pub max_backoff: Duration,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            renew_margin: DEFAULT_RENEW_MARGIN,
            renew_retry: DEFAULT_RENEW_RETRY,
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Why the manager could not do its job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManagerError {
    /// `<prefix>/config` does not exist.
    #[error(
        "flannel config not found in etcd store at {key}. Did you create your config using etcdv3 API?"
    )]
    ConfigMissing {
        /// The key that was read.
        key: String,
    },
    /// `<prefix>/config` exists but is invalid.
    #[error("invalid network config: {0}")]
    Config(#[from] ConfigError),
    /// The config does not enable IPv4.
    #[error(
        "the network config disables IPv4 (EnableIPv4=false); this flanneld leases IPv4 subnets only"
    )]
    NoIpv4,
    /// The config enables IPv6, which this manager does not lease yet.
    #[error("the network config sets EnableIPv6=true; dual-stack leases are not supported yet")]
    Ipv6Unsupported,
    /// The renew margin is not shorter than the TTL.
    #[error("subnet lease renew margin {margin:?} must be shorter than the lease TTL {ttl:?}")]
    BadRenewMargin {
        /// The configured margin.
        margin: Duration,
        /// The configured TTL.
        ttl: Duration,
    },
    /// Every subnet in the allocatable range is leased.
    #[error(
        "no free subnet in network {network}: all /{subnet_len} subnets from {min} to {max} are leased"
    )]
    Exhausted {
        /// The network.
        network: Ipv4Network,
        /// The subnet length.
        subnet_len: u8,
        /// `SubnetMin`.
        min: Ipv4Addr,
        /// `SubnetMax`.
        max: Ipv4Addr,
    },
    /// The lease with our public IP kept changing while we tried to reuse it.
    #[error(
        "the lease for public IP {public_ip} changed {REUSE_RETRIES} times while we tried to reuse it"
    )]
    ReuseContended {
        /// Our public IP.
        public_ip: Ipv4Addr,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ManagerError {
    /// Whether trying again later may succeed (the store was unreachable).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Store(StoreError::Unavailable(_)))
    }
}

/// Reads and validates `<prefix>/config`.
pub async fn load_config<S: LeaseStore>(
    store: &S,
    key_for_errors: &str,
) -> Result<NetworkConfig, ManagerError> {
    let text = store
        .network_config()
        .await?
        .ok_or_else(|| ManagerError::ConfigMissing {
            key: key_for_errors.to_owned(),
        })?;
    let config = NetworkConfig::parse(&text)?;
    if config.backend.defaulted {
        // flannel's code would silently pick the slow udp backend here.
        warn!("the network config has no Backend; using vxlan (flannel would use udp)");
    }
    Ok(config)
}

/// The lease this node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnLease {
    /// The lease as stored.
    pub stored: StoredLease,
    /// When its TTL runs out, as far as we know; `None` for a reservation.
    pub expires_at: Option<Instant>,
}

impl OwnLease {
    /// The lease.
    pub fn lease(&self) -> &Lease {
        &self.stored.lease
    }

    /// The leased IPv4 subnet.
    pub fn subnet(&self) -> Ipv4Network {
        self.stored.lease.key.ipv4
    }

    fn from_written(written: Written, started: Instant) -> Self {
        Self {
            expires_at: written.ttl.map(|ttl| started + ttl),
            stored: written.stored,
        }
    }
}

/// What the manager reports while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagerEvent {
    /// A fresh snapshot was taken (at start, after a watch loss or a
    /// compaction): every current peer, and what changed since the last
    /// known set. A backend reconciles its whole state against `peers`.
    PeersResynced {
        /// Every peer lease (ours excluded).
        peers: Vec<SharedLease>,
        /// The difference from the previously known set.
        changes: Vec<LeaseEvent>,
    },
    /// Peers changed (ours excluded). Renewals that change nothing are not reported.
    PeersChanged(Vec<LeaseEvent>),
    /// Our lease was renewed.
    LeaseRenewed {
        /// The lease.
        lease: Lease,
        /// Its new lifetime.
        ttl: Duration,
    },
    /// Our lease was deleted, expired or taken, and we hold a lease again.
    /// If the subnet differs, everything built on the old one must be redone.
    LeaseReacquired {
        /// The lease we lost.
        lost: Lease,
        /// The lease we hold now.
        current: Lease,
    },
}

/// The outcome of one renewal attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewOutcome {
    /// The lease now has a fresh TTL.
    Renewed(OwnLease),
    /// The key is gone or belongs to someone else now.
    Lost {
        /// What the key holds now (`None`: deleted or undecodable).
        current: Option<StoredLease>,
    },
}

/// Acquires, renews and watches leases for one node.
#[derive(Debug)]
pub struct LeaseManager<S> {
    store: S,
    network: Ipv4Settings,
    attrs: LeaseAttrs,
    options: ManagerOptions,
    rng: fastrand::Rng,
}

impl<S: LeaseStore> LeaseManager<S> {
    /// A manager for the node that publishes `attrs` (its public IP is its
    /// identity) in the network `config`.
    pub fn new(
        store: S,
        config: &NetworkConfig,
        attrs: LeaseAttrs,
        options: ManagerOptions,
    ) -> Result<Self, ManagerError> {
        let network = config.ipv4.clone().ok_or(ManagerError::NoIpv4)?;
        if config.ipv6.is_some() {
            return Err(ManagerError::Ipv6Unsupported);
        }
        if options.renew_margin >= options.ttl {
            return Err(ManagerError::BadRenewMargin {
                margin: options.renew_margin,
                ttl: options.ttl,
            });
        }
        Ok(Self {
            store,
            network,
            attrs,
            options,
            rng: fastrand::Rng::new(),
        })
    }

    /// Uses a seeded random generator (for reproducible tests).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = fastrand::Rng::with_seed(seed);
        self
    }

    /// Takes a lease: the one carrying our public IP if there is a usable
    /// one, else `previous` (from the old subnet.env) if nobody holds it, else
    /// a random free subnet. Lost races are retried with other subnets.
    pub async fn acquire(
        &mut self,
        previous: Option<Ipv4Network>,
    ) -> Result<OwnLease, ManagerError> {
        for _ in 0..REUSE_RETRIES {
            let listing = self.store.list().await?;
            let mut taken = subnets(&listing.leases);

            match self.reuse_own(&listing.leases, &mut taken).await? {
                Reuse::Reused(own) => return Ok(own),
                Reuse::Raced => continue,
                Reuse::Nothing => {}
            }
            if let Some(own) = self.try_previous(previous, &taken).await? {
                return Ok(own);
            }
            return self.allocate(taken).await;
        }
        Err(ManagerError::ReuseContended {
            public_ip: self.attrs.public_ip,
        })
    }

    /// Step 1: rewrite the lease that carries our public IP. Reservations
    /// are preferred, and keep having no TTL. Incompatible ones are deleted.
    async fn reuse_own(
        &mut self,
        leases: &[StoredLease],
        taken: &mut Vec<Ipv4Network>,
    ) -> Result<Reuse, ManagerError> {
        let mut ours: Vec<&StoredLease> = leases.iter().filter(|s| self.is_ours(s)).collect();
        ours.sort_by_key(|s| !s.is_reservation());
        for stored in ours {
            let subnet = stored.lease.key.ipv4;
            if stored.lease.key.ipv6.is_some() || !is_allocatable(&self.network, subnet) {
                info!(%subnet, "deleting our old lease: it no longer fits the network config");
                self.store
                    .delete(&stored.lease.key, Some(stored.mod_revision))
                    .await?;
                taken.retain(|t| *t != subnet);
                continue;
            }
            let ttl = if stored.is_reservation() {
                Ttl::Never
            } else {
                Ttl::Expiring(self.options.ttl)
            };
            let lease = self.lease_for(stored.lease.key);
            let started = Instant::now();
            match self.store.update(&lease, ttl, stored.mod_revision).await? {
                UpdateOutcome::Updated(written) => {
                    self.revoke_superseded(stored.ttl_lease, &written).await;
                    if stored.is_reservation() {
                        info!(%subnet, "using the subnet reserved for our public IP");
                    } else {
                        info!(%subnet, "reusing our existing lease");
                    }
                    return Ok(Reuse::Reused(OwnLease::from_written(written, started)));
                }
                UpdateOutcome::Changed(_) => {
                    debug!(%subnet, "our old lease changed while reusing it; starting over");
                    return Ok(Reuse::Raced);
                }
            }
        }
        Ok(Reuse::Nothing)
    }

    /// Step 2: the subnet from the old subnet.env, only if nobody holds it.
    async fn try_previous(
        &mut self,
        previous: Option<Ipv4Network>,
        taken: &[Ipv4Network],
    ) -> Result<Option<OwnLease>, ManagerError> {
        let Some(previous) = previous else {
            return Ok(None);
        };
        let subnet = Ipv4Network::new(previous.network(), previous.prefix()).unwrap_or(previous);
        if !is_allocatable(&self.network, subnet) {
            info!(%subnet, "ignoring the subnet from subnet.env: it does not fit the network config");
            return Ok(None);
        }
        if taken.iter().any(|t| t.overlaps(subnet)) {
            info!(%subnet, "the subnet from subnet.env is leased to another node; choosing another");
            return Ok(None);
        }
        let own = self.create(subnet).await?;
        match &own {
            Some(_) => info!(%subnet, "took the subnet named in subnet.env again"),
            None => info!(%subnet, "the subnet from subnet.env was just taken by another node"),
        }
        Ok(own)
    }

    /// Creates a lease on `subnet` if nobody holds it; `None` if someone does.
    async fn create(&self, subnet: Ipv4Network) -> Result<Option<OwnLease>, ManagerError> {
        let started = Instant::now();
        let lease = self.lease_for(SubnetKey::v4(subnet));
        let ttl = Ttl::Expiring(self.options.ttl);
        Ok(match self.store.create(&lease, ttl).await? {
            CreateOutcome::Created(written) => Some(OwnLease::from_written(written, started)),
            CreateOutcome::Exists(_) => None,
        })
    }

    /// Step 3: a random free subnet, retried on every lost race.
    async fn allocate(&mut self, mut taken: Vec<Ipv4Network>) -> Result<OwnLease, ManagerError> {
        // Every lost race means another node took a lease, and leases are
        // finite, so this ends (with a lease or with `Exhausted`).
        loop {
            let rng = &mut self.rng;
            let Some(subnet) = pick_subnet(&self.network, &taken, |n| rng.usize(..n)) else {
                return Err(self.exhausted());
            };
            if let Some(own) = self.create(subnet).await? {
                info!(%subnet, "acquired a new subnet lease");
                return Ok(own);
            }
            // Whoever beat us probably was not alone: refresh the whole view
            // rather than probing taken subnets one by one.
            debug!(%subnet, "lost the race for a subnet; trying another");
            taken = self.taken_subnets().await?;
            if !taken.contains(&subnet) {
                // Deleted again already; never pick it twice in a row.
                taken.push(subnet);
            }
        }
    }

    async fn taken_subnets(&self) -> Result<Vec<Ipv4Network>, ManagerError> {
        Ok(subnets(&self.store.list().await?.leases))
    }

    /// Whether a stored lease is this node's (its public IP is our identity).
    fn is_ours(&self, stored: &StoredLease) -> bool {
        stored.lease.attrs.public_ip == self.attrs.public_ip
    }

    fn exhausted(&self) -> ManagerError {
        ManagerError::Exhausted {
            network: self.network.network,
            subnet_len: self.network.subnet_len,
            min: self.network.subnet_min,
            max: self.network.subnet_max,
        }
    }

    fn lease_for(&self, key: SubnetKey) -> Lease {
        Lease {
            key,
            attrs: self.attrs.clone(),
        }
    }

    /// Revokes the TTL lease a key used before it was rewritten with a new
    /// one. Failure only costs an empty etcd lease until its TTL, so it is
    /// logged, not fatal.
    async fn revoke_superseded(&self, old_ttl_lease: i64, written: &Written) {
        if old_ttl_lease == 0 || old_ttl_lease == written.stored.ttl_lease {
            return;
        }
        if let Err(error) = self.store.revoke(old_ttl_lease).await {
            warn!(ttl_lease = old_ttl_lease, %error, "could not revoke the superseded etcd lease; it expires by itself");
        }
    }

    /// Renews `own` with a fresh TTL (and our current attributes), comparing
    /// on its mod revision. A reservation has nothing to renew.
    pub async fn renew(&mut self, own: &OwnLease) -> Result<RenewOutcome, ManagerError> {
        if own.stored.is_reservation() {
            return Ok(RenewOutcome::Renewed(own.clone()));
        }
        let lease = self.lease_for(own.stored.lease.key);
        let mut expected = own.stored.mod_revision;
        let mut superseded = vec![own.stored.ttl_lease];
        // A rewrite of our own key with our own attributes (a write whose
        // reply we missed) is still ours: follow it, a bounded number of times.
        for _ in 0..3 {
            let started = Instant::now();
            let ttl = Ttl::Expiring(self.options.ttl);
            match self.store.update(&lease, ttl, expected).await? {
                UpdateOutcome::Updated(written) => {
                    for old in superseded {
                        self.revoke_superseded(old, &written).await;
                    }
                    return Ok(RenewOutcome::Renewed(OwnLease::from_written(
                        written, started,
                    )));
                }
                UpdateOutcome::Changed(Some(current))
                    if self.is_ours(&current) && !current.is_reservation() =>
                {
                    expected = current.mod_revision;
                    superseded.push(current.ttl_lease);
                }
                UpdateOutcome::Changed(current) => return Ok(RenewOutcome::Lost { current }),
            }
        }
        Ok(RenewOutcome::Lost { current: None })
    }

    /// Keeps `own` alive and watches peers until `shutdown` completes or the
    /// receiver of `events` is dropped. Store outages are waited out (with
    /// backoff); the lease is re-acquired if it is lost. Returns an error only
    /// when no lease can be held at all (the network is full, or the config
    /// no longer allows ours). Nothing is deleted on shutdown, so a restarted
    /// node finds its lease again.
    pub async fn run(
        self,
        own: OwnLease,
        events: mpsc::Sender<ManagerEvent>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ManagerError> {
        let keeper = Keeper {
            backoff: Backoff::new(self.options.max_backoff),
            next_renewal: self.renewal_time(&own),
            peers: PeerSet::new(Some(own.stored.lease.key)),
            manager: self,
            own,
            events,
        };
        // Stopping in the middle of any step is safe: the store is only ever
        // changed by single transactions, and nothing is torn down.
        tokio::select! {
            () = shutdown => Ok(()),
            result = keeper.keep() => result,
        }
    }

    fn renewal_time(&self, own: &OwnLease) -> Option<Instant> {
        own.expires_at.map(|expires| {
            expires
                .checked_sub(self.options.renew_margin)
                .unwrap_or(expires)
        })
    }
}

/// The state of a running manager.
#[derive(Debug)]
struct Keeper<S> {
    manager: LeaseManager<S>,
    own: OwnLease,
    events: mpsc::Sender<ManagerEvent>,
    /// The peers as last reported to the caller.
    peers: PeerSet,
    /// Delay before the next reconnection attempt.
    backoff: Backoff,
    /// When to renew next (`None` for a reservation).
    next_renewal: Option<Instant>,
}

/// What the keeper does after handling one thing.
enum Flow {
    /// Carry on with the current watch.
    Continue,
    /// Take a fresh snapshot and watch again (after the backoff delay).
    Resync,
    /// Take a fresh snapshot at once (our lease was just re-acquired).
    ResyncNow,
    /// The caller is gone.
    Stop,
}

impl<S: LeaseStore> Keeper<S> {
    /// Snapshot, watch, renew; again after every watch loss.
    async fn keep(mut self) -> Result<(), ManagerError> {
        let mut flow = Flow::ResyncNow;
        loop {
            match flow {
                Flow::Stop => return Ok(()),
                Flow::Resync => sleep(self.backoff.next()).await,
                Flow::ResyncNow | Flow::Continue => {}
            }
            flow = self.watch_from_snapshot().await?;
        }
    }

    /// Takes a snapshot, reports it, then follows the watch (and renews on
    /// time) until something calls for a new snapshot.
    async fn watch_from_snapshot(&mut self) -> Result<Flow, ManagerError> {
        let store = self.manager.store.clone();
        let listing = match store.list().await {
            Ok(listing) => listing,
            Err(error) => {
                warn!(%error, "cannot list leases; retrying");
                return Ok(Flow::Resync);
            }
        };
        let own_key = self.own.stored.lease.key;
        match listing.leases.iter().find(|s| s.lease.key == own_key) {
            Some(stored) if self.manager.is_ours(stored) => {
                adopt(&mut self.own, stored);
            }
            _ => return self.reacquire().await,
        }
        let changes = self
            .peers
            .resync(listing.leases.into_iter().map(|s| s.lease));
        let peers = self.peers.peers().cloned().collect();
        if !self
            .send(ManagerEvent::PeersResynced { peers, changes })
            .await
        {
            return Ok(Flow::Stop);
        }
        let mut stream = match store.watch(listing.revision + 1).await {
            Ok(stream) => stream,
            Err(error) => {
                warn!(%error, "cannot watch leases; resyncing");
                return Ok(Flow::Resync);
            }
        };
        loop {
            let flow = tokio::select! {
                () = wait_until(self.next_renewal) => self.renew().await?,
                item = stream.next() => match item {
                    Some(Ok(batch)) => self.on_batch(batch.events).await?,
                    Some(Err(error)) => {
                        warn!(%error, "lease watch failed; resyncing from a fresh snapshot");
                        Flow::Resync
                    }
                    None => {
                        warn!("lease watch ended; resyncing from a fresh snapshot");
                        Flow::Resync
                    }
                },
            };
            if !matches!(flow, Flow::Continue) {
                return Ok(flow);
            }
        }
    }

    async fn renew(&mut self) -> Result<Flow, ManagerError> {
        match self.manager.renew(&self.own).await {
            Ok(RenewOutcome::Renewed(renewed)) => {
                self.own = renewed;
                self.next_renewal = self.manager.renewal_time(&self.own);
                debug!(subnet = %self.own.subnet(), "renewed our lease");
                let lease = self.own.stored.lease.clone();
                let ttl = self.manager.options.ttl;
                Ok(self
                    .continue_if_sent(ManagerEvent::LeaseRenewed { lease, ttl })
                    .await)
            }
            Ok(RenewOutcome::Lost { .. }) => self.reacquire().await,
            Err(error) => {
                let retry = self.retry_delay();
                warn!(%error, "Error renewing lease (trying again in {retry:?})");
                self.next_renewal = Some(Instant::now() + retry);
                Ok(Flow::Continue)
            }
        }
    }

    /// How long to wait after a failed renewal: flannel's minute, but never
    /// so long that the lease runs out before the next few tries.
    fn retry_delay(&self) -> Duration {
        let retry = self.manager.options.renew_retry;
        let Some(expires) = self.own.expires_at else {
            return retry;
        };
        let left = expires.saturating_duration_since(Instant::now());
        retry.min(left / 4).max(Duration::from_millis(500))
    }

    async fn on_batch(&mut self, events: Vec<WatchEvent>) -> Result<Flow, ManagerError> {
        self.backoff.reset();
        let (updates, own_lost) = self.split_own(events);
        let changes = self.peers.apply(updates);
        if !changes.is_empty() && !self.send(ManagerEvent::PeersChanged(changes)).await {
            return Ok(Flow::Stop);
        }
        if own_lost {
            return self.reacquire().await;
        }
        Ok(Flow::Continue)
    }

    /// Separates events about our own key from peer updates. Returns whether
    /// our lease was deleted or taken over.
    fn split_own(&mut self, events: Vec<WatchEvent>) -> (Vec<PeerUpdate>, bool) {
        let own_key = self.own.stored.lease.key;
        let mut updates = Vec::with_capacity(events.len());
        let mut lost = false;
        for event in events {
            match event {
                WatchEvent::Put(stored) if stored.lease.key == own_key => {
                    if self.manager.is_ours(&stored) {
                        adopt(&mut self.own, &stored);
                    } else {
                        lost = true;
                    }
                }
                WatchEvent::Delete(key) if key == own_key => lost = true,
                WatchEvent::Put(stored) => updates.push(PeerUpdate::Put(stored.lease)),
                WatchEvent::Delete(key) => updates.push(PeerUpdate::Delete(key)),
            }
        }
        (updates, lost)
    }

    /// Takes a lease again after ours was lost, preferring the same subnet.
    /// Waits out store outages; fails only if no lease can be had at all.
    async fn reacquire(&mut self) -> Result<Flow, ManagerError> {
        let lost = self.own.stored.lease.clone();
        error!(
            subnet = %lost.key,
            "our subnet lease was deleted, expired or taken by another node; re-acquiring (flannel would exit here)"
        );
        let mut backoff = Backoff::new(self.manager.options.max_backoff);
        self.own = loop {
            match self.manager.acquire(Some(lost.key.ipv4)).await {
                Ok(own) => break own,
                Err(error) if error.is_transient() => {
                    let delay = backoff.next();
                    warn!(%error, retry_in = ?delay, "cannot re-acquire a lease yet");
                    sleep(delay).await;
                }
                Err(error) => {
                    error!(%error, "cannot re-acquire any subnet lease");
                    return Err(error);
                }
            }
        };
        self.next_renewal = self.manager.renewal_time(&self.own);
        let current = self.own.stored.lease.clone();
        if current.key == lost.key {
            warn!(subnet = %lost.key, "re-acquired the same subnet");
        } else {
            error!(
                lost = %lost.key,
                current = %current.key,
                "re-acquired a DIFFERENT subnet: local containers must be re-addressed"
            );
        }
        let changes = self.peers.set_own(Some(current.key));
        if !changes.is_empty() && !self.send(ManagerEvent::PeersChanged(changes)).await {
            return Ok(Flow::Stop);
        }
        let flow = self
            .continue_if_sent(ManagerEvent::LeaseReacquired { lost, current })
            .await;
        Ok(match flow {
            Flow::Continue => Flow::ResyncNow,
            other => other,
        })
    }

    /// Sends an event; `false` when the receiver is gone.
    async fn send(&self, event: ManagerEvent) -> bool {
        self.events.send(event).await.is_ok()
    }

    async fn continue_if_sent(&self, event: ManagerEvent) -> Flow {
        if self.send(event).await {
            Flow::Continue
        } else {
            Flow::Stop
        }
    }
}

enum Reuse {
    Reused(OwnLease),
    Raced,
    Nothing,
}

/// The IPv4 subnets of `leases`.
fn subnets(leases: &[StoredLease]) -> Vec<Ipv4Network> {
    leases.iter().map(|s| s.lease.key.ipv4).collect()
}

/// Follows a newer write of our own key (same public IP), e.g. one whose
/// reply we missed, so the next renewal compares on the right revision.
fn adopt(own: &mut OwnLease, stored: &StoredLease) {
    if stored.mod_revision > own.stored.mod_revision {
        own.stored = stored.clone();
    }
}

async fn wait_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Exponential backoff from 100 ms to a maximum, as flannel's watch loop.
#[derive(Debug)]
struct Backoff {
    current: Duration,
    max: Duration,
}

impl Backoff {
    const START: Duration = Duration::from_millis(100);

    fn new(max: Duration) -> Self {
        Self {
            current: Self::START,
            max,
        }
    }

    fn next(&mut self) -> Duration {
        let delay = self.current;
        self.current = (self.current * 2).min(self.max);
        delay
    }

    fn reset(&mut self) {
        self.current = Self::START;
    }
}
