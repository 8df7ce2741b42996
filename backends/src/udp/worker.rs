//! One packet worker: a TUN queue, a UDP socket, its own buffers.
//!
//! Two modes, chosen when the engine starts:
//! - offload: the TUN speaks virtio-net headers with TSO, so one read is a
//!   TCP super-packet of up to 64 KiB; it is split into MTU-sized segments
//!   once and sent to the peer with UDP GSO (one `sendmmsg` for all of
//!   them). Received UDP GRO batches are cut into their datagrams, checked
//!   one by one and merged back into TCP super-packets for the TUN
//!   ([`Coalescer`]);
//! - plain: one packet per TUN read, batches of packets per `sendmmsg`, and
//!   one TUN write per datagram.
//!
//! A packet is never copied on its way in either mode except where merging
//! or splitting has to write new headers.

use std::io::{self, ErrorKind, IoSlice};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use tracing::{debug, warn};

use super::engine::{Counters, Shared};
use super::offload::{self, Coalescer, SPLIT_BUFFER, TUN_READ_BUFFER, TunPacket, VNET_HDR_NONE};
use super::packet::{self, DropReason};
use super::peers::PeerTable;
use super::sys::{self, PollFd, RecvBatch, SendBatch, Tun, UDP_MAX_SEGMENTS};

/// How long a worker sleeps in `poll` before it looks at the stop flag.
const POLL_MS: i32 = 100;

/// Offload mode: TUN reads per wakeup (each up to 64 KiB).
const TUN_READS_PER_WAKEUP: usize = 16;

/// Offload mode: receive buffers (each takes a GRO batch of up to 64 KiB).
const GRO_BUFFERS: usize = 8;

/// One worker; [`Worker::run`] until the engine stops it.
pub(super) struct Worker {
    tun: Tun,
    socket: UdpSocket,
    shared: Arc<Shared>,
    peers: Arc<PeerTable>,
    generation: u64,
    /// The TUN has virtio-net headers and TSO (see the module docs).
    offload: bool,
    /// Receive buffers; in plain mode also the TUN read buffers.
    buffers: Vec<Vec<u8>>,
    /// Offload mode: the TUN read buffer and the split output.
    tun_buf: Vec<u8>,
    split: Vec<u8>,
    /// Plain mode: (buffer, length, peer) of the packets to send.
    out: Vec<(usize, usize, SocketAddrV4)>,
    /// Offload mode: the sends of one split.
    sends: Vec<(Range<usize>, Option<u16>)>,
    /// Where an ICMP error is built.
    icmp: Vec<u8>,
    recv: RecvBatch,
    send: SendBatch,
    coalescer: Coalescer,
}

impl Worker {
    /// A worker with `batch` packets per system call; `mtu_buffer` is the
    /// plain-mode packet buffer size.
    pub(super) fn new(
        tun: Tun,
        socket: UdpSocket,
        shared: Arc<Shared>,
        offload: bool,
        batch: usize,
        mtu_buffer: usize,
    ) -> Self {
        let (count, size) = if offload {
            (batch.min(GRO_BUFFERS), TUN_READ_BUFFER)
        } else {
            (batch, mtu_buffer)
        };
        Self {
            tun,
            socket,
            peers: Arc::new(PeerTable::new()),
            generation: u64::MAX,
            shared,
            offload,
            buffers: (0..count).map(|_| vec![0; size]).collect(),
            tun_buf: if offload {
                vec![0; TUN_READ_BUFFER]
            } else {
                Vec::new()
            },
            split: if offload {
                vec![0; SPLIT_BUFFER]
            } else {
                Vec::new()
            },
            out: Vec::with_capacity(batch),
            sends: Vec::with_capacity(8),
            icmp: vec![0; packet::ICMP_ERROR_MAX_LEN],
            recv: RecvBatch::new(count),
            send: SendBatch::new(batch.max(8)),
            coalescer: Coalescer::new(),
        }
    }

    /// Moves packets until the engine's stop flag is set or the TUN queue
    /// is gone.
    pub(super) fn run(mut self) {
        while !self.shared.stop.load(Ordering::Relaxed) {
            let mut fds = [
                PollFd::readable(self.tun.as_fd()),
                PollFd::readable(self.socket.as_fd()),
            ];
            if let Err(e) = sys::poll(&mut fds, POLL_MS) {
                warn!(error = %e, "udp worker: poll failed; stopping");
                return;
            }
            let (tun_ready, socket_ready) = (fds[0].is_readable(), fds[1].is_readable());
            self.refresh_peers();
            if tun_ready {
                let result = if self.offload {
                    self.tun_to_udp_offload()
                } else {
                    self.tun_to_udp_plain()
                };
                if let Err(e) = result {
                    warn!(error = %e, "udp worker: TUN to UDP failed");
                    if is_fatal(&e) {
                        return;
                    }
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

    /// Plain mode: up to a batch of TUN reads, each packet routed, then all
    /// sent in one `sendmmsg` from the buffers they were read into.
    fn tun_to_udp_plain(&mut self) -> io::Result<()> {
        self.out.clear();
        for i in 0..self.buffers.len() {
            let len = match self.tun.read(&mut self.buffers[i]) {
                Ok(len) => len,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            match self.peers.outbound(&mut self.buffers[i][..len]) {
                Ok((peer, total_len)) => self.out.push((i, total_len, peer)),
                Err(DropReason::NoRoute) => answer_unreachable(
                    &self.tun,
                    &self.shared,
                    &mut self.icmp,
                    self.offload,
                    &self.buffers[i][..len],
                ),
                Err(reason) => self.shared.counters.count_drop(reason),
            }
        }
        let buffers = &self.buffers;
        let messages = self
            .out
            .iter()
            .map(|&(i, len, peer)| (&buffers[i][..len], peer, None));
        send_all(
            &mut self.send,
            &self.socket,
            messages,
            self.out.len(),
            &self.shared.counters,
        )
    }

    /// Offload mode: each TUN read is one packet or a super-packet; it is
    /// split if needed and sent to its peer in one `sendmmsg` of GSO sends.
    fn tun_to_udp_offload(&mut self) -> io::Result<()> {
        let counters = Arc::clone(&self.shared.counters);
        for _ in 0..TUN_READS_PER_WAKEUP {
            let len = match self.tun.read(&mut self.tun_buf) {
                Ok(len) => len,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            let read = match offload::from_tun(&mut self.tun_buf[..len], &mut self.split) {
                Ok(read) => read,
                Err(reason) => {
                    counters.count_drop(reason);
                    continue;
                }
            };
            let (split, range, segment) = match read {
                TunPacket::InPlace(range) => {
                    let n = range.len();
                    (None, range, n)
                }
                TunPacket::Split(split) => (Some(split), 0..split.len, split.segment),
            };
            let in_split = split.is_some();
            let data = if in_split {
                &mut self.split[range.clone()]
            } else {
                &mut self.tun_buf[range.clone()]
            };
            let first = segment.min(data.len());
            let info = match packet::parse(&data[..first]) {
                Ok(info) => info,
                Err(reason) => {
                    counters.count_drop(reason);
                    continue;
                }
            };
            let Some(peer) = self.peers.lookup(info.dst) else {
                answer_unreachable(
                    &self.tun,
                    &self.shared,
                    &mut self.icmp,
                    self.offload,
                    &data[..first],
                );
                continue;
            };
            // Every segment has its own header: the TTL goes down in each.
            if let Some(reason) = data
                .chunks_mut(segment.max(1))
                .find_map(|seg| packet::decrement_ttl(seg).err())
            {
                counters.count_drop(reason);
                continue;
            }
            self.sends.clear();
            if let Some(split) = split {
                self.sends.extend(split.batches(UDP_MAX_SEGMENTS));
            } else {
                self.sends.push((0..range.len(), None));
            }
            let data = if in_split {
                &self.split[range]
            } else {
                &self.tun_buf[range]
            };
            let messages = self
                .sends
                .iter()
                .map(|(r, gso)| (&data[r.clone()], peer, *gso));
            send_all(
                &mut self.send,
                &self.socket,
                messages,
                self.sends.len(),
                &counters,
            )?;
        }
        Ok(())
    }

    /// Receives up to a batch of datagrams (GRO batches when enabled) in one
    /// `recvmmsg`; every inner packet is checked (sender, inner source, TTL)
    /// and written to the TUN, merged into super-packets in offload mode.
    fn udp_to_tun(&mut self) -> io::Result<()> {
        let n = match self.recv.recv(&self.socket, &mut self.buffers) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        };
        let counters = Arc::clone(&self.shared.counters);
        let tun = &self.tun;
        let mut fatal = None;
        let mut emit = |hdr: &[u8; sys::VNET_HDR_LEN], inner: &[u8]| match tun
            .write_vectored(&[IoSlice::new(hdr), IoSlice::new(inner)])
        {
            Ok(_) => {}
            Err(e) if is_fatal(&e) => fatal = Some(e),
            Err(e) => {
                debug!(error = %e, "TUN write failed");
                counters.count_drop(DropReason::SendFailed);
            }
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
            let stride = self.recv.gro_segment(i).map_or(len, usize::from).max(1);
            for datagram in self.buffers[i][..len].chunks_mut(stride) {
                let total = match self.peers.inbound(from, datagram, offload::MAX_PACKET) {
                    Ok(total) => total,
                    Err(reason) => {
                        counters.count_drop(reason);
                        continue;
                    }
                };
                counters.received.fetch_add(1, Ordering::Relaxed);
                let inner = &datagram[..total];
                if self.offload {
                    self.coalescer.push(inner, &mut emit);
                } else {
                    match tun.write(inner) {
                        Ok(_) => {}
                        Err(e) if is_fatal(&e) => return Err(e),
                        Err(e) => {
                            debug!(error = %e, "TUN write failed");
                            counters.count_drop(DropReason::SendFailed);
                        }
                    }
                }
            }
        }
        self.coalescer.flush(&mut emit);
        fatal.map_or(Ok(()), Err)
    }
}

/// Answers a packet to a subnet no peer owns with ICMP net-unreachable,
/// written back into the TUN (with an empty virtio header in offload mode).
/// A free function so `offending` can stay in the worker's own buffers.
fn answer_unreachable(
    tun: &Tun,
    shared: &Shared,
    icmp: &mut [u8],
    offload: bool,
    offending: &[u8],
) {
    let counters = &shared.counters;
    counters.count_drop(DropReason::NoRoute);
    let src = Ipv4Addr::from(shared.tun_addr.load(Ordering::Relaxed));
    let Some(n) = packet::icmp_net_unreachable(offending, src, icmp) else {
        return;
    };
    let icmp = &icmp[..n];
    // Best effort, like any ICMP error.
    let written = if offload {
        tun.write_vectored(&[IoSlice::new(&VNET_HDR_NONE), IoSlice::new(icmp)])
    } else {
        tun.write(icmp)
    };
    if written.is_ok() {
        counters.icmp_unreachable.fetch_add(1, Ordering::Relaxed);
    }
}

/// Sends `count` messages with `sendmmsg`, resuming after partial sends,
/// waiting once for room when the socket buffer is full, and skipping a
/// message the kernel refuses; counts what was sent and what was dropped.
fn send_all<'a>(
    batch: &mut SendBatch,
    socket: &UdpSocket,
    messages: impl Iterator<Item = sys::SendMsg<'a>> + Clone,
    count: usize,
    counters: &Counters,
) -> io::Result<()> {
    let (mut done, mut sent) = (0, 0);
    while done < count {
        match batch.send_from(socket, messages.clone().skip(done)) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                sent += n;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if !sys::poll_writable(socket.as_fd(), POLL_MS)? {
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

/// Errors after which a worker cannot go on: its TUN queue was detached
/// because the device was deleted (the backend recreates it).
fn is_fatal(e: &io::Error) -> bool {
    e.raw_os_error() == Some(EBADFD)
}

/// EBADFD: the TUN device was deleted under its queue.
const EBADFD: i32 = 77;
