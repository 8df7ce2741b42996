//! The packet loop: one worker thread (module `worker`) per TUN queue,
//! each with its own UDP socket on the same port (`SO_REUSEPORT`). With
//! offloads (probed at start: TUN virtio-net headers with TSO and USO, UDP
//! GSO and GRO) a worker moves 64 KiB super-packets; without, batches of
//! packets.
//!
//! The peer table is shared read-mostly: lease events build a new table and
//! publish it with a generation counter; a worker checks the counter once
//! per wakeup and takes the new table then, so lookups never take a lock.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::{self, JoinHandle};

use tracing::{info, warn};

use super::packet::DropReason;
use super::peers::PeerTable;
use super::sys::{self, TUN_F_CSUM, TUN_F_TSO4, TUN_F_USO4, TUN_F_USO6, Tun, TunOptions};
use super::worker::Worker;

/// Packets per system call (and per wakeup, per direction) by default.
pub const DEFAULT_BATCH: usize = 64;

/// Socket buffers asked for (the kernel caps them at `net.core.*mem_max`).
const SOCKET_BUFFER: usize = 4 << 20;

/// What the engine is started with.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// TUN device name (`flannel0`).
    pub tun_name: String,
    /// Where every worker's socket is bound (underlay address, port).
    pub bind: SocketAddrV4,
    /// The TUN's MTU: the largest packet read from it.
    pub mtu: u32,
    /// Worker threads (and TUN queues).
    pub workers: usize,
    /// Packets per system call, 1..=[`sys::MAX_BATCH`].
    pub batch: usize,
    /// Try TUN offloads and UDP GSO/GRO (falls back when unavailable).
    pub offload: bool,
}

/// Packet counters, shared by all workers.
#[derive(Debug, Default)]
pub struct Counters {
    /// Packets read from the TUN and sent to a peer (one per datagram: a
    /// GSO send of 40 segments counts 40).
    pub sent: AtomicU64,
    /// Datagrams received and written to the TUN.
    pub received: AtomicU64,
    /// ICMP net-unreachable packets written back into the TUN.
    pub icmp_unreachable: AtomicU64,
    /// Drops, indexed by [`DropReason::index`].
    drops: [AtomicU64; DropReason::ALL.len()],
}

impl Counters {
    /// The counters in the Prometheus text format (for `/metrics`).
    pub fn render_prometheus(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        for (name, help, value) in [
            (
                "sent",
                "Packets read from the TUN and sent to a peer.",
                &self.sent,
            ),
            (
                "received",
                "Datagrams from peers written to the TUN.",
                &self.received,
            ),
            (
                "icmp_unreachable",
                "ICMP net-unreachable errors written back into the TUN.",
                &self.icmp_unreachable,
            ),
        ] {
            let _ = writeln!(out, "# HELP flannel_udp_{name}_total {help}");
            let _ = writeln!(out, "# TYPE flannel_udp_{name}_total counter");
            let _ = writeln!(
                out,
                "flannel_udp_{name}_total {}",
                value.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP flannel_udp_dropped_total Packets dropped, by reason.\n");
        out.push_str("# TYPE flannel_udp_dropped_total counter\n");
        for reason in DropReason::ALL {
            let _ = writeln!(
                out,
                "flannel_udp_dropped_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                self.drops(reason)
            );
        }
        out
    }

    /// Counts one packet dropped for `reason`.
    pub(super) fn count_drop(&self, reason: DropReason) {
        self.count_drops(reason, 1);
    }

    /// Counts `n` packets dropped for `reason`.
    pub(super) fn count_drops(&self, reason: DropReason, n: u64) {
        self.drops[reason.index()].fetch_add(n, Ordering::Relaxed);
    }

    /// How many packets were dropped for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()].load(Ordering::Relaxed)
    }
}

/// State shared by the workers and the backend.
#[derive(Debug)]
pub(super) struct Shared {
    /// The current peer table, replaced whole on every change.
    pub(super) peers: RwLock<Arc<PeerTable>>,
    /// Bumped after each replacement of `peers`.
    pub(super) generation: AtomicU64,
    /// Set when the engine is dropped.
    pub(super) stop: AtomicBool,
    /// The TUN's own address (`<subnet>.0`), the source of ICMP errors.
    pub(super) tun_addr: AtomicU32,
    /// Kept by the backend across engine restarts.
    pub(super) counters: Arc<Counters>,
}

/// The running packet loop. Dropping it stops and joins the workers (within
/// one poll interval) and closes the TUN queues, which deletes the device.
#[derive(Debug)]
pub struct Engine {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    tun_name: String,
}

impl Engine {
    /// Creates the TUN device with one queue per worker, binds one socket
    /// per worker and starts the workers. Call it on a thread in the node's
    /// network namespace (the TUN is created in the caller's namespace).
    pub fn start(config: &EngineConfig, counters: Arc<Counters>) -> io::Result<Self> {
        let workers = config.workers.max(1);
        let (first, offload) = open_tun(config)?;
        let tun_name = first.name().to_owned();
        let mut queues = vec![first];
        for _ in 1..workers {
            queues.push(queues[0].open_queue()?);
        }
        let shared = Arc::new(Shared {
            peers: RwLock::new(Arc::new(PeerTable::new())),
            generation: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            tun_addr: AtomicU32::new(0),
            counters,
        });
        let buffer = usize::try_from(config.mtu)
            .unwrap_or(usize::MAX)
            .clamp(1500, 65535);
        let batch = config.batch.clamp(1, sys::MAX_BATCH);
        // Built first, so a failure below stops the workers already started.
        let mut engine = Self {
            shared,
            workers: Vec::with_capacity(workers),
            tun_name,
        };
        for (i, tun) in queues.into_iter().enumerate() {
            let socket = sys::udp_socket(config.bind, true)?;
            sys::set_buffer_sizes(&socket, SOCKET_BUFFER, SOCKET_BUFFER)?;
            if offload && let Err(error) = sys::enable_udp_gro(&socket) {
                warn!(%error, "UDP GRO is not available; receiving datagram by datagram");
            }
            // The group's program applies to the sockets bound after this one too.
            if i == 0
                && workers > 1
                && let Err(error) =
                    sys::steer_by_inner_flow(&socket, u32::try_from(workers).unwrap_or(u32::MAX))
            {
                warn!(%error, "cannot spread received flows over the workers; the kernel's hash decides");
            }
            let shared = Arc::clone(&engine.shared);
            let worker = Worker::new(tun, socket, shared, offload, batch, buffer);
            let handle = thread::Builder::new()
                .name(format!("udp-worker-{i}"))
                .spawn(move || worker.run())?;
            engine.workers.push(handle);
        }
        info!(offload, workers, batch, "udp packet loop started");
        Ok(engine)
    }

    /// The TUN device's name.
    pub fn tun_name(&self) -> &str {
        &self.tun_name
    }

    /// Publishes a new peer table to the workers.
    pub fn set_peers(&self, table: PeerTable) {
        let mut current = self
            .shared
            .peers
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        *current = Arc::new(table);
        self.shared.generation.fetch_add(1, Ordering::Release);
    }

    /// Sets the source address of the ICMP errors the engine generates.
    pub fn set_tun_addr(&self, addr: Ipv4Addr) {
        self.shared
            .tun_addr
            .store(u32::from(addr), Ordering::Relaxed);
    }

    /// True while every worker runs.
    pub fn is_running(&self) -> bool {
        self.workers.iter().all(|w| !w.is_finished())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for worker in self.workers.drain(..) {
            // A worker that panicked has nothing left to clean up.
            let _ = worker.join();
        }
    }
}

/// Opens the first TUN queue: with virtio-net headers and TSO if asked and
/// possible (UDP GSO must work too, to send what TSO hands us), else plain.
fn open_tun(config: &EngineConfig) -> io::Result<(Tun, bool)> {
    let plain = TunOptions {
        multi_queue: true,
        vnet_hdr: false,
    };
    if !config.offload || !gso_works(config.bind) {
        return Ok((Tun::open(&config.tun_name, plain)?, false));
    }
    let tun = Tun::open(
        &config.tun_name,
        TunOptions {
            vnet_hdr: true,
            ..plain
        },
    )?;
    // USO (kernel >= 6.2) only comes as the IPv4 and IPv6 pair; IPv6
    // super-packets are dropped like any IPv6 packet (the network is IPv4).
    let with_uso = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_USO4 | TUN_F_USO6;
    let result = tun.set_offload(with_uso).or_else(|error| {
        info!(%error, "TUN UDP segmentation offload (USO) is not available; TSO only");
        tun.set_offload(TUN_F_CSUM | TUN_F_TSO4)
    });
    match result {
        Ok(()) => Ok((tun, true)),
        Err(error) => {
            warn!(%error, "TUN offloads are not available; moving packets one by one");
            // Closing the only queue deletes the device: open it plain.
            drop(tun);
            Ok((Tun::open(&config.tun_name, plain)?, false))
        }
    }
}

/// Whether UDP GSO works here (probed on a throwaway socket).
fn gso_works(bind: SocketAddrV4) -> bool {
    let probe = UdpSocket::bind(SocketAddrV4::new(*bind.ip(), 0));
    probe.is_ok_and(|s| sys::udp_gso_supported(&s))
}
