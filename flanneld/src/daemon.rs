//! Wiring: etcd store, lease manager, backend (VXLAN or UDP), subnet file,
//! firewall, health and systemd, until a signal says stop.
//!
//! Nothing is torn down on exit: the device, routes, neighbours, FDB
//! entries, iptables rules and the lease all stay, so a restart is hitless.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use backends::udp::backend::{UdpBackend, UdpTuning};
use backends::udp::options::UdpOptions;
use backends::vxlan::backend::VxlanBackend;
use backends::vxlan::netlink::Netlink;
use backends::vxlan::options::VxlanOptions;
use backends::{Backend, BackendError};
use ipnetwork::Ipv4Network;
use subnet::BackendKind;
use subnet::config::NetworkConfig;
use subnet::etcd::{EtcdOptions, EtcdStore, EtcdTls};
use subnet::manager::{LeaseManager, ManagerEvent, ManagerOptions, OwnLease, load_config};
use subnet::subnet_env::{SubnetEnv, write_atomic};
use subnet::watch::LeaseEvent;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::firewall::{self, RuleSet};
use crate::flags::Flags;
use crate::health::{self, Metrics, Readiness};
use crate::iface::{self, Selector};

/// How often the device is checked even without a deletion notification.
const DEVICE_CHECK: Duration = Duration::from_secs(1);

/// Runs the daemon; `Ok` after a signal, `Err` when it cannot go on.
pub(crate) async fn run(flags: Flags) -> anyhow::Result<()> {
    info!(?flags, "starting flanneld {}", env!("CARGO_PKG_VERSION"));
    let stop = stop_on_signals()?;
    let ready = Readiness::default();
    let metrics = Metrics::default();
    if flags.healthz_port > 0 {
        let addr = SocketAddr::new(flags.healthz_ip, flags.healthz_port);
        health::serve(addr, ready.clone(), metrics.clone())
            .await
            .with_context(|| format!("cannot serve health checks on {addr}"))?;
    }

    let Some(store) = until_stopped(&stop, connect_store(&flags)).await else {
        return Ok(());
    };
    let store = store?;
    let Some(config) = until_stopped(&stop, fetch_config(&store)).await else {
        return Ok(());
    };
    if !matches!(config.backend.kind, BackendKind::Vxlan | BackendKind::Udp) {
        bail!(
            "backend type {:?} is not supported by this flanneld yet (supported: vxlan, udp)",
            config.backend.kind.as_str()
        );
    }
    let ipv4 = config
        .ipv4
        .clone()
        .ok_or_else(|| anyhow!("the network config disables IPv4; this flanneld needs it"))?;

    let netlink = Netlink::connect().context("cannot open a netlink socket")?;
    let selector = Selector {
        ifaces: flags.iface.clone(),
        regexes: flags.iface_regex.clone(),
        public_ip: flags.public_ip(),
    };
    let underlay = iface::select(&netlink, &selector).await?;
    info!(iface = %underlay.name, public_ip = %underlay.public_ip, mtu = underlay.mtu, "using interface");

    let setup = Setup {
        flags: &flags,
        store,
        config: &config,
        network: ipv4.network,
        netlink: &netlink,
        ready,
        stop,
    };
    if config.backend.kind == BackendKind::Udp {
        let options =
            UdpOptions::from_config(&config.backend).context("invalid Backend options")?;
        let tuning = UdpTuning {
            workers: flags.udp_workers,
            batch: flags.udp_batch,
            offload: !flags.udp_no_offload,
        };
        let backend =
            UdpBackend::prepare(netlink.clone(), options, tuning, ipv4.network, underlay).await?;
        metrics.set_udp(backend.counters());
        let attrs = backend.lease_attrs();
        let mtu = backend.mtu();
        setup.serve(backend, attrs, mtu).await
    } else {
        let options =
            VxlanOptions::from_config(&config.backend).context("invalid Backend options")?;
        let backend = VxlanBackend::prepare(
            netlink.clone(),
            options,
            ipv4.network,
            ipv4.subnet_len,
            underlay,
        )
        .await?;
        let attrs = backend.lease_attrs();
        let mtu = backend.mtu();
        setup.serve(backend, attrs, mtu).await
    }
}

/// What every backend's node is started with.
struct Setup<'a> {
    flags: &'a Flags,
    store: EtcdStore,
    config: &'a NetworkConfig,
    network: Ipv4Network,
    netlink: &'a Netlink,
    ready: Readiness,
    stop: watch::Receiver<bool>,
}

impl Setup<'_> {
    /// Acquires the lease, activates `backend` (which publishes `attrs` and
    /// needs `mtu` in containers), writes subnet.env and serves until stopped.
    async fn serve<B: Backend>(
        self,
        mut backend: B,
        attrs: subnet::lease::LeaseAttrs,
        mtu: u32,
    ) -> anyhow::Result<()> {
        let Setup {
            flags,
            store,
            config,
            network,
            netlink,
            ready,
            stop,
        } = self;
        let previous = previous_subnet(&flags.subnet_file);
        let manager_options = ManagerOptions {
            ttl: flags.lease_ttl(),
            renew_margin: flags.renew_margin(),
            ..ManagerOptions::default()
        };
        let mut manager = LeaseManager::new(store, config, attrs, manager_options)?;
        let Some(own) = until_stopped(&stop, acquire(&mut manager, previous)).await else {
            return Ok(());
        };
        let own = own?;
        info!(subnet = %own.subnet(), reservation = own.stored.is_reservation(), "holding lease");
        backend.activate(own.lease()).await?;

        let mut node = Node {
            flags,
            network,
            backend,
            mtu,
            ready,
            needs_resync: false,
        };
        let rules = node.rule_sets(own.subnet());
        let rules_ok = firewall::ensure_all(&rules).await;
        let env_ok = node.write_subnet_file(own.subnet());
        node.ready.set(rules_ok && env_ok);
        if let Err(error) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            warn!(%error, "cannot notify systemd");
        }
        let firewall_task = (!rules.is_empty()).then(|| {
            let ready = node.ready.clone();
            let interval = Duration::from_secs(flags.iptables_resync.max(1));
            // Ready once the rules are in place (and the subnet file was written).
            tokio::spawn(firewall::keep(rules, interval, move |ok| {
                ready.set(ok && env_ok);
            }))
        });

        let result = node.serve(manager, own, netlink, stop.clone()).await;
        if let Some(task) = firewall_task {
            task.abort();
        }
        if result.is_ok() {
            info!("Exiting cleanly...");
        }
        result
    }
}

/// The running node: the backend and what it has been told.
struct Node<'a, B> {
    flags: &'a Flags,
    network: Ipv4Network,
    backend: B,
    /// The MTU written to subnet.env.
    mtu: u32,
    ready: Readiness,
    /// A kernel update failed: redo everything at the next device check.
    needs_resync: bool,
}

impl<B: Backend> Node<'_, B> {
    fn rule_sets(&self, own: Ipv4Network) -> Vec<RuleSet> {
        let mut sets = Vec::new();
        if self.flags.iptables_forward_rules {
            sets.push(firewall::forward_rules(self.network));
        }
        if self.flags.ip_masq {
            let fully_random = !self.flags.ip_masq_fully_random_disable;
            sets.push(firewall::masquerade_rules(self.network, own, fully_random));
        }
        sets
    }

    /// Writes subnet.env; `false` (and a warning) if it cannot.
    fn write_subnet_file(&self, own: Ipv4Network) -> bool {
        let gateway = Ipv4Addr::from(u32::from(own.network()).saturating_add(1));
        let env = SubnetEnv {
            networks: vec![self.network],
            subnet: Ipv4Network::new(gateway, own.prefix()).ok(),
            mtu: Some(self.mtu),
            ipmasq: Some(self.flags.ip_masq),
            ..SubnetEnv::default()
        };
        match write_atomic(&self.flags.subnet_file, &env) {
            Ok(()) => {
                info!(path = %self.flags.subnet_file.display(), subnet = %gateway, "wrote the subnet file");
                true
            }
            Err(error) => {
                warn!(%error, "cannot write the subnet file; not ready");
                false
            }
        }
    }

    /// Follows the manager's events and keeps the device alive until a
    /// signal (`Ok`) or a fatal lease error (`Err`).
    async fn serve(
        &mut self,
        manager: LeaseManager<EtcdStore>,
        own: OwnLease,
        netlink: &Netlink,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let (events_tx, mut events) = mpsc::channel(64);
        let mut manager_stop = stop.clone();
        let mut manager_task = tokio::spawn(manager.run(own, events_tx, async move {
            let _ = manager_stop.wait_for(|stopped| *stopped).await;
        }));
        let mut removals = netlink
            .watch_link_removals()
            .context("cannot watch for link removals")?;
        let mut check = tokio::time::interval(DEVICE_CHECK);
        loop {
            tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => break,
                event = events.recv() => match event {
                    Some(event) => self.on_event(event).await,
                    None => break,
                },
                Some(index) = removals.recv() => {
                    if index == self.backend.device_index() {
                        self.check_device().await;
                    }
                }
                _ = check.tick() => self.check_device().await,
            }
        }
        match tokio::time::timeout(Duration::from_secs(3), &mut manager_task).await {
            Ok(Ok(result)) => result.context("lost the subnet lease for good"),
            Ok(Err(join_error)) => Err(anyhow!("the lease manager failed: {join_error}")),
            Err(_) => {
                manager_task.abort();
                Ok(())
            }
        }
    }

    async fn on_event(&mut self, event: ManagerEvent) {
        match event {
            ManagerEvent::PeersResynced { peers, changes } => {
                info!(
                    peers = peers.len(),
                    changes = changes.len(),
                    "peer snapshot"
                );
                drop(changes);
                let result = self.backend.resync(peers).await;
                self.after_resync(result);
            }
            ManagerEvent::PeersChanged(changes) => {
                changes.iter().for_each(log_change);
                if let Err(error) = self.backend.apply(&changes).await {
                    warn!(%error, "peer update incomplete; resyncing");
                    self.needs_resync = true;
                }
            }
            ManagerEvent::LeaseRenewed { lease, ttl } => {
                debug!(subnet = %lease.key, ?ttl, "lease renewed");
            }
            ManagerEvent::LeaseReacquired { lost, current } => {
                if let Err(error) = self.backend.activate(&current).await {
                    warn!(%error, "cannot move the device to the new subnet");
                }
                if current.key != lost.key {
                    error!(lost = %lost.key, current = %current.key, "our subnet changed; rewriting the subnet file");
                    let ok = self.write_subnet_file(current.key.ipv4);
                    self.ready.set(ok);
                }
            }
        }
    }

    fn after_resync(&mut self, result: Result<usize, BackendError>) {
        match result {
            Ok(applied) => {
                self.needs_resync = false;
                if applied > 0 {
                    info!(applied, "kernel state resynced with the peer set");
                }
            }
            Err(error) => {
                warn!(%error, "resync incomplete; retrying");
                self.needs_resync = true;
            }
        }
    }

    async fn check_device(&mut self) {
        match self.backend.recover().await {
            Ok(true) => info!("backend device recreated and every peer replayed"),
            Ok(false) if self.needs_resync => {
                let result = self.backend.replay().await;
                self.after_resync(result);
            }
            Ok(false) => {}
            Err(error) => warn!(%error, "cannot recreate the VXLAN device yet"),
        }
    }
}

fn log_change(change: &LeaseEvent) {
    match change {
        LeaseEvent::Added(l) => {
            info!(subnet = %l.key, public_ip = %l.attrs.public_ip, "peer added")
        }
        LeaseEvent::Changed { new, .. } => {
            info!(subnet = %new.key, public_ip = %new.attrs.public_ip, "peer changed");
        }
        LeaseEvent::Removed(l) => info!(subnet = %l.key, "peer removed"),
    }
}

/// A watch channel that turns true on SIGTERM or SIGINT.
fn stop_on_signals() -> anyhow::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("received SIGTERM"),
            _ = int.recv() => info!("received SIGINT"),
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// Runs `work` unless a stop signal comes first (`None`).
async fn until_stopped<T>(
    stop: &watch::Receiver<bool>,
    work: impl Future<Output = T>,
) -> Option<T> {
    let mut stop = stop.clone();
    tokio::select! {
        _ = stop.wait_for(|stopped| *stopped) => None,
        value = work => Some(value),
    }
}

async fn connect_store(flags: &Flags) -> anyhow::Result<EtcdStore> {
    let credentials = (!flags.etcd_username.is_empty())
        .then(|| (flags.etcd_username.clone(), flags.etcd_password.clone()));
    let options = EtcdOptions {
        endpoints: flags.etcd_endpoints.clone(),
        prefix: flags.etcd_prefix.clone(),
        credentials,
        request_timeout: None,
        tls: etcd_tls(flags)?,
    };
    let mut delay = Duration::from_secs(1);
    loop {
        match EtcdStore::connect(&options).await {
            Ok(store) => return Ok(store),
            Err(error) => {
                warn!(%error, retry_in = ?delay, "cannot connect to etcd; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Reads the TLS files named by the flags (as flannel: TLS only with both a
/// client certificate and key; a CA file alone is ignored, with a warning).
fn etcd_tls(flags: &Flags) -> anyhow::Result<Option<EtcdTls>> {
    let read = |flag: &str, path: &str| {
        std::fs::read(path).with_context(|| format!("cannot read --{flag} {path}"))
    };
    if !flags.uses_tls() {
        if !flags.etcd_cafile.is_empty() {
            warn!(
                "connecting to etcd with http. This is insecure (--etcd-cafile alone does not enable TLS)"
            );
        }
        return Ok(None);
    }
    Ok(Some(EtcdTls {
        cert_pem: read("etcd-certfile", &flags.etcd_certfile)?,
        key_pem: read("etcd-keyfile", &flags.etcd_keyfile)?,
        ca_pem: if flags.etcd_cafile.is_empty() {
            None
        } else {
            Some(read("etcd-cafile", &flags.etcd_cafile)?)
        },
    }))
}

/// Fetches and validates the network config, retrying until it works (the
/// operator may still be writing it, or etcd may be down).
async fn fetch_config(store: &EtcdStore) -> NetworkConfig {
    let mut delay = Duration::from_secs(1);
    loop {
        match load_config(store, store.config_key()).await {
            Ok(config) => return config,
            Err(error) => {
                warn!(%error, retry_in = ?delay, "Couldn't fetch network config");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Acquires a lease, waiting out etcd outages; other errors are fatal.
async fn acquire(
    manager: &mut LeaseManager<EtcdStore>,
    previous: Option<Ipv4Network>,
) -> anyhow::Result<OwnLease> {
    let mut delay = Duration::from_secs(1);
    loop {
        match manager.acquire(previous).await {
            Ok(own) => return Ok(own),
            Err(error) if error.is_transient() => {
                warn!(%error, retry_in = ?delay, "cannot acquire a lease yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(error) => return Err(error).context("cannot acquire a subnet lease"),
        }
    }
}

fn previous_subnet(path: &Path) -> Option<Ipv4Network> {
    match SubnetEnv::read_if_present(path) {
        Ok(env) => env.and_then(|env| env.subnet_network()),
        Err(error) => {
            warn!(%error, "ignoring the old subnet file");
            None
        }
    }
}
