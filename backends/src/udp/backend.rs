//! [`UdpBackend`]: the TUN device `flannel0` configured as flannel does, the
//! packet [`Engine`] behind it, and the peer table fed by lease events.

use std::net::SocketAddrV4;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ipnetwork::Ipv4Network;
use subnet::lease::{Lease, LeaseAttrs};
use subnet::watch::{LeaseEvent, SharedLease};
use tracing::{info, warn};

use super::engine::{Counters, DEFAULT_BATCH, Engine, EngineConfig};
use super::options::{DEVICE_NAME, UdpOptions};
use super::packet::DropReason;
use super::peers::PeerTable;
use crate::vxlan::netlink::Netlink;
use crate::{Backend, BackendError, Underlay};

/// At most this many workers by default, whatever the core count.
const MAX_WORKERS: usize = 8;

/// Knobs of the packet loop (flanneld's hidden `--udp-workers` and
/// `--udp-batch`, for benchmarks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpTuning {
    /// Worker threads; 0 means one per core, at most 8.
    pub workers: usize,
    /// Packets per system call.
    pub batch: usize,
    /// Use TUN and UDP offloads when the kernel has them.
    pub offload: bool,
}

impl Default for UdpTuning {
    fn default() -> Self {
        Self {
            workers: 0,
            batch: DEFAULT_BATCH,
            offload: true,
        }
    }
}

/// flannel's `udp` backend, with a batched multi-queue packet loop.
#[derive(Debug)]
pub struct UdpBackend {
    netlink: Netlink,
    options: UdpOptions,
    tuning: UdpTuning,
    network: Ipv4Network,
    underlay: Underlay,
    mtu: u32,
    engine: Engine,
    /// Packet counters, kept across engine restarts.
    counters: Arc<Counters>,
    index: u32,
    own: Option<Ipv4Network>,
    /// The peers last given, by subnet (for replay and recovery).
    peers: Vec<SharedLease>,
    /// Drop counts at the last report, by reason.
    reported: Vec<u64>,
}

fn kernel(what: &'static str, error: impl ToString) -> BackendError {
    BackendError::Kernel {
        what,
        error: error.to_string(),
    }
}

impl UdpBackend {
    /// Creates `flannel0` (MTU = underlay MTU - 28) and starts the packet
    /// loop on the underlay address and `Port`.
    pub async fn prepare(
        netlink: Netlink,
        options: UdpOptions,
        tuning: UdpTuning,
        network: Ipv4Network,
        underlay: Underlay,
    ) -> Result<Self, BackendError> {
        let mtu = UdpOptions::overlay_mtu(underlay.mtu);
        let counters = Arc::new(Counters::default());
        let (engine, index) =
            start_engine(&netlink, &options, tuning, &underlay, mtu, &counters).await?;
        Ok(Self {
            netlink,
            options,
            tuning,
            network,
            underlay,
            mtu,
            engine,
            counters,
            index,
            own: None,
            peers: Vec::new(),
            reported: vec![0; DropReason::ALL.len()],
        })
    }

    /// What this node publishes in its lease: only its public IP (flannel's
    /// udp backend writes no `BackendType` and no `BackendData`).
    pub fn lease_attrs(&self) -> LeaseAttrs {
        LeaseAttrs::new(self.underlay.public_ip)
    }

    /// The MTU containers must use.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// The packet counters (shared; they survive device recreation).
    pub fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }

    /// Logs the drop counters by reason when they changed since the last
    /// report (called with the daemon's periodic device check).
    fn report_drops(&mut self) {
        let counters = &self.counters;
        let now: Vec<u64> = DropReason::ALL.iter().map(|r| counters.drops(*r)).collect();
        if now == self.reported {
            return;
        }
        let summary: Vec<String> = DropReason::ALL
            .iter()
            .zip(&now)
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| format!("{}={n}", r.as_str()))
            .collect();
        info!(
            drops = %summary.join(" "),
            sent = counters.sent.load(Ordering::Relaxed),
            received = counters.received.load(Ordering::Relaxed),
            "udp packets dropped (totals by reason)"
        );
        self.reported = now;
    }

    fn publish(&self) {
        let mut table = PeerTable::new();
        for lease in &self.peers {
            if is_udp_peer(lease) && Some(lease.subnet()) != self.own {
                table.upsert(
                    lease.subnet(),
                    SocketAddrV4::new(lease.attrs.public_ip, self.options.port),
                );
            }
        }
        self.engine.set_peers(table);
    }

    async fn configure_device(&self) -> Result<(), BackendError> {
        self.netlink
            .set_mtu_up(self.index, self.engine.tun_name(), self.mtu)
            .await
            .map_err(|e| kernel("bring flannel0 up", e))?;
        // Our ICMP errors come out of the TUN with the TUN's own address as
        // source; without accept_local the kernel drops them as martians.
        let sysctl = format!(
            "/proc/sys/net/ipv4/conf/{}/accept_local",
            self.engine.tun_name()
        );
        if let Err(error) = std::fs::write(&sysctl, "1") {
            warn!(%error, path = %sysctl, "cannot enable accept_local: no ICMP net-unreachable");
        }
        if let Some(own) = self.own {
            let address = Ipv4Network::new(own.network(), 32)
                .map_err(|e| BackendError::Invalid(e.to_string()))?;
            self.netlink
                .ensure_address(self.index, address, self.network)
                .await
                .map_err(|e| kernel("set the address of flannel0", e))?;
            self.engine.set_tun_addr(own.network());
        }
        self.netlink
            .replace_device_route(self.index, self.network)
            .await
            .map_err(|e| kernel("route the network into flannel0", e))
    }
}

/// flannel's udp leases carry no backend type; ours may say `udp`.
fn is_udp_peer(lease: &Lease) -> bool {
    lease.attrs.backend_type.is_empty() || lease.attrs.backend_type == "udp"
}

async fn start_engine(
    netlink: &Netlink,
    options: &UdpOptions,
    tuning: UdpTuning,
    underlay: &Underlay,
    mtu: u32,
    counters: &Arc<Counters>,
) -> Result<(Engine, u32), BackendError> {
    let workers = if tuning.workers == 0 {
        std::thread::available_parallelism()
            .map_or(1, std::num::NonZero::get)
            .min(MAX_WORKERS)
    } else {
        tuning.workers
    };
    let config = EngineConfig {
        tun_name: DEVICE_NAME.to_owned(),
        bind: SocketAddrV4::new(underlay.public_ip, options.port),
        mtu,
        workers,
        batch: tuning.batch,
        offload: tuning.offload,
    };
    let engine = Engine::start(&config, Arc::clone(counters))
        .map_err(|e| kernel("start the udp packet loop", e))?;
    let link = netlink
        .link_by_name(engine.tun_name())
        .await
        .map_err(|e| kernel("look up flannel0", e))?
        .ok_or_else(|| kernel("look up flannel0", "it vanished right after creation"))?;
    info!(
        device = engine.tun_name(),
        mtu,
        workers,
        port = options.port,
        "udp backend ready"
    );
    Ok((engine, link.index))
}

impl Backend for UdpBackend {
    async fn activate(&mut self, own: &Lease) -> Result<(), BackendError> {
        self.own = Some(own.subnet());
        self.configure_device().await?;
        self.publish();
        Ok(())
    }

    async fn resync(&mut self, peers: Vec<SharedLease>) -> Result<usize, BackendError> {
        self.peers = peers;
        self.publish();
        Ok(self.peers.len())
    }

    async fn replay(&mut self) -> Result<usize, BackendError> {
        self.publish();
        Ok(self.peers.len())
    }

    async fn apply(&mut self, events: &[LeaseEvent]) -> Result<usize, BackendError> {
        for event in events {
            match event {
                LeaseEvent::Added(lease) | LeaseEvent::Changed { new: lease, .. } => {
                    self.peers.retain(|p| p.subnet() != lease.subnet());
                    self.peers.push(Arc::clone(lease));
                }
                LeaseEvent::Removed(lease) => {
                    self.peers.retain(|p| p.subnet() != lease.subnet());
                }
            }
        }
        self.publish();
        Ok(events.len())
    }

    async fn recover(&mut self) -> Result<bool, BackendError> {
        self.report_drops();
        let present = self
            .netlink
            .link_by_index(self.index)
            .await
            .map_err(|e| kernel("look up flannel0", e))?
            .is_some();
        if present && self.engine.is_running() {
            return Ok(false);
        }
        warn!("flannel0 is gone or its packet loop stopped; recreating it");
        let (engine, index) = start_engine(
            &self.netlink,
            &self.options,
            self.tuning,
            &self.underlay,
            self.mtu,
            &self.counters,
        )
        .await?;
        // The old engine's workers stop and its queues close here.
        self.engine = engine;
        self.index = index;
        self.configure_device().await?;
        self.publish();
        Ok(true)
    }

    fn device_index(&self) -> u32 {
        self.index
    }
}
