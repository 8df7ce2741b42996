//! The packet loop: one worker thread per TUN queue, each with its own UDP
//! socket on the same port (`SO_REUSEPORT`), moving packets in batches
//! between the two without copying them: a packet read from the TUN is sent
//! from the buffer it was read into, and a datagram is written to the TUN
//! from the buffer it was received into.
//!
//! The peer table is shared read-mostly: lease events build a new table and
//! publish it with a generation counter; a worker checks the counter once
//! per wakeup and takes the new table then, so lookups never take a lock.

use std::io::{self, ErrorKind};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::{self, JoinHandle};

use tracing::{debug, warn};

use super::packet::{self, DropReason};
use super::peers::PeerTable;
use super::sys::{self, PollFd, RecvBatch, SendBatch, Tun, TunOptions};

/// Packets per system call (and per wakeup, per direction) by default.
pub const DEFAULT_BATCH: usize = 64;

/// How long a worker sleeps in `poll` before it looks at the stop flag.
const POLL_MS: i32 = 100;

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
}

/// Packet counters, shared by all workers.
#[derive(Debug, Default)]
pub struct Counters {
    /// Packets read from the TUN and sent to a peer.
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

    fn count_drop(&self, reason: DropReason) {
        self.drops[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// How many packets were dropped for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()].load(Ordering::Relaxed)
    }
}

/// State shared by the workers and the backend.
#[derive(Debug)]
struct Shared {
    peers: RwLock<Arc<PeerTable>>,
    generation: AtomicU64,
    stop: AtomicBool,
    /// The TUN's own address (`<subnet>.0`), the source of ICMP errors.
    tun_addr: AtomicU32,
    /// Kept by the backend across engine restarts.
    counters: Arc<Counters>,
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
        let options = TunOptions {
            multi_queue: true,
            vnet_hdr: false,
        };
        let first = Tun::open(&config.tun_name, options)?;
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
        let mut handles = Vec::with_capacity(workers);
        for (i, tun) in queues.into_iter().enumerate() {
            let socket = sys::udp_socket(config.bind, true)?;
            sys::set_buffer_sizes(&socket, SOCKET_BUFFER, SOCKET_BUFFER)?;
            let worker = Worker::new(tun, socket, Arc::clone(&shared), buffer, batch);
            let handle = thread::Builder::new()
                .name(format!("udp-worker-{i}"))
                .spawn(move || worker.run())?;
            handles.push(handle);
        }
        Ok(Self {
            shared,
            workers: handles,
            tun_name,
        })
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

    /// The packet counters.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
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

/// One worker: a TUN queue, a socket, and its own buffers.
struct Worker {
    tun: Tun,
    socket: UdpSocket,
    shared: Arc<Shared>,
    peers: Arc<PeerTable>,
    generation: u64,
    /// One packet buffer per batch slot, reused for both directions.
    buffers: Vec<Vec<u8>>,
    /// (buffer index, length, destination) of the packets to send; its
    /// capacity is kept across batches.
    out: Vec<(usize, usize, SocketAddrV4)>,
    /// Where an ICMP error is built.
    icmp: Vec<u8>,
    recv: RecvBatch,
    send: SendBatch,
}

impl Worker {
    fn new(tun: Tun, socket: UdpSocket, shared: Arc<Shared>, buffer: usize, batch: usize) -> Self {
        Self {
            tun,
            socket,
            peers: Arc::new(PeerTable::new()),
            generation: u64::MAX,
            shared,
            buffers: (0..batch).map(|_| vec![0; buffer]).collect(),
            out: Vec::with_capacity(batch),
            icmp: vec![0; packet::ICMP_ERROR_MAX_LEN],
            recv: RecvBatch::new(batch),
            send: SendBatch::new(batch),
        }
    }

    fn run(mut self) {
        while !self.shared.stop.load(Ordering::Relaxed) {
            let mut fds = [
                PollFd::readable(self.tun.as_fd()),
                PollFd::readable(self.socket.as_fd()),
            ];
            match sys::poll(&mut fds, POLL_MS) {
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "udp worker: poll failed; stopping");
                    return;
                }
            }
            let (tun_ready, socket_ready) = (fds[0].is_readable(), fds[1].is_readable());
            self.refresh_peers();
            if tun_ready && let Err(e) = self.tun_to_udp() {
                warn!(error = %e, "udp worker: TUN to UDP failed");
                if is_fatal(&e) {
                    return;
                }
            }
            if socket_ready && let Err(e) = self.udp_to_tun() {
                warn!(error = %e, "udp worker: UDP to TUN failed");
                if is_fatal(&e) {
                    return;
                }
            }
        }
    }

    fn refresh_peers(&mut self) {
        let generation = self.shared.generation.load(Ordering::Acquire);
        if generation != self.generation {
            let table = self
                .shared
                .peers
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            self.peers = Arc::clone(&table);
            self.generation = generation;
        }
    }

    /// Reads up to a batch of packets from the TUN and sends each to the
    /// peer owning its destination, in one `sendmmsg`.
    fn tun_to_udp(&mut self) -> io::Result<()> {
        let counters = &self.shared.counters;
        self.out.clear();
        for i in 0..self.buffers.len() {
            let len = match self.tun.read(&mut self.buffers[i]) {
                Ok(len) => len,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            let packet = &mut self.buffers[i][..len];
            let info = match packet::parse(packet) {
                Ok(info) => info,
                Err(reason) => {
                    counters.count_drop(reason);
                    continue;
                }
            };
            let Some(peer) = self.peers.lookup(info.dst) else {
                counters.count_drop(DropReason::NoRoute);
                let src = Ipv4Addr::from(self.shared.tun_addr.load(Ordering::Relaxed));
                if let Some(n) = packet::icmp_net_unreachable(packet, src, &mut self.icmp) {
                    // Best effort, like any ICMP error.
                    if self.tun.write(&self.icmp[..n]).is_ok() {
                        counters.icmp_unreachable.fetch_add(1, Ordering::Relaxed);
                    }
                }
                continue;
            };
            let packet = &mut packet[..info.total_len];
            if let Err(reason) = packet::decrement_ttl(packet) {
                counters.count_drop(reason);
                continue;
            }
            self.out.push((i, info.total_len, peer));
        }
        let count = self.out.len();
        if count == 0 {
            return Ok(());
        }
        let buffers = &self.buffers;
        let message = |&(i, len, dst): &(usize, usize, SocketAddrV4)| -> sys::SendMsg<'_> {
            (&buffers[i][..len], dst, None)
        };
        // `done`: messages handled (sent or refused); `sent`: sent.
        let (mut done, mut sent) = (0, 0);
        while done < count {
            match self
                .send
                .send_from(&self.socket, self.out[done..count].iter().map(message))
            {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    sent += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    // The socket buffer is full: wait for room once, then drop.
                    if !sys::poll_writable(self.socket.as_fd(), POLL_MS)? {
                        break;
                    }
                }
                Err(e) => {
                    // This message alone failed (EMSGSIZE, ...): skip it.
                    debug!(error = %e, "sendmmsg refused a packet");
                    counters.count_drop(DropReason::SendFailed);
                    done += 1;
                }
            }
        }
        counters.sent.fetch_add(sent as u64, Ordering::Relaxed);
        for _ in done..count {
            counters.count_drop(DropReason::SendFailed);
        }
        Ok(())
    }

    /// Receives up to a batch of datagrams in one `recvmmsg` and writes
    /// each valid inner packet to the TUN.
    fn udp_to_tun(&mut self) -> io::Result<()> {
        let counters = &self.shared.counters;
        let n = match self.recv.recv(&self.socket, &mut self.buffers) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        };
        for i in 0..n {
            if self.recv.truncated(i) {
                counters.count_drop(DropReason::Oversize);
                continue;
            }
            let Some(from) = self.recv.source(i) else {
                counters.count_drop(DropReason::UnknownSender);
                continue;
            };
            let len = self.recv.len(i);
            let packet = &mut self.buffers[i][..len];
            let info = match packet::parse(packet) {
                Ok(info) => info,
                Err(reason) => {
                    counters.count_drop(reason);
                    continue;
                }
            };
            if let Err(reason) = self.peers.check_sender(from, info.src) {
                counters.count_drop(reason);
                continue;
            }
            let packet = &mut packet[..info.total_len];
            if let Err(reason) = packet::decrement_ttl(packet) {
                counters.count_drop(reason);
                continue;
            }
            match self.tun.write(packet) {
                Ok(_) => {
                    counters.received.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    counters.count_drop(DropReason::SendFailed);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Errors after which a worker cannot go on: its TUN queue was detached
/// because the device was deleted (the backend recreates it).
fn is_fatal(e: &io::Error) -> bool {
    e.raw_os_error() == Some(EBADFD)
}

/// EBADFD: the TUN device was deleted under its queue.
const EBADFD: i32 = 77;
