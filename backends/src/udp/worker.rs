//! One packet worker: a TUN queue, a UDP socket, its own buffers.
//!
//! Two modes, chosen when the engine starts:
//! - offload: the TUN speaks virtio-net headers with TSO, so one read is a
//!   TCP super-packet of up to 64 KiB; it is cut into MTU-sized segments
//!   (new headers, payload left in place) and sent to the peer with UDP GSO
//!   (one `sendmmsg` for all of them, gathered from the headers and the
//!   read buffer). Received UDP GRO batches are cut into their datagrams,
//!   checked one by one and merged back into TCP super-packets for the TUN
//!   ([`Coalescer`], one `writev` from where they were received);
//! - plain: one packet per TUN read, batches of packets per `sendmmsg`, and
//!   one TUN write per datagram.
//!
//! Packet payload is never copied in userspace in either mode: only the
//! headers that splitting and merging write are.

use std::io::{self, ErrorKind, IoSlice};
use std::iter;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use tracing::{debug, warn};

use super::engine::{Counters, Shared};
use super::offload::{
    self, Coalescer, HEADER_BUFFER, PacketAt, TUN_READ_BUFFER, TunPacket, VNET_HDR_NONE,
};
use super::packet::{self, DropReason};
use super::peers::PeerTable;
use super::sys::{self, PollFd, RecvBatch, SendBatch, Tun, UDP_MAX_SEGMENTS, VNET_HDR_LEN};

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
    /// Where the inner packets of the last receive batch that passed the
    /// checks are.
    accepted: Vec<PacketAt>,
    /// Offload mode: the TUN read buffer and the segment headers of a split.
    tun_buf: Vec<u8>,
    headers: Vec<u8>,
    /// Plain mode: (buffer, length, peer) of the packets to send.
    out: Vec<(usize, usize, SocketAddrV4)>,
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
        let only_if = |yes: bool, len: usize| if yes { vec![0; len] } else { Vec::new() };
        Self {
            tun,
            socket,
            peers: Arc::new(PeerTable::new()),
            generation: u64::MAX,
            shared,
            offload,
            buffers: (0..count).map(|_| vec![0; size]).collect(),
            // A GRO message holds up to UDP_MAX_SEGMENTS datagrams.
            accepted: Vec::with_capacity(count * if offload { UDP_MAX_SEGMENTS } else { 1 }),
            tun_buf: only_if(offload, TUN_READ_BUFFER),
            headers: only_if(offload, HEADER_BUFFER),
            out: Vec::with_capacity(batch),
            icmp: vec![0; packet::ICMP_ERROR_MAX_LEN],
            recv: RecvBatch::new(count),
            // Offload: a GSO send is a header and a payload slice per segment.
            send: if offload {
                SendBatch::with_parts(batch.max(8), 2 * UDP_MAX_SEGMENTS)
            } else {
                SendBatch::new(batch)
            },
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
            .map(|&(i, len, peer)| (iter::once(&buffers[i][..len]), peer, None));
        send_all(
            &mut self.send,
            &self.socket,
            messages,
            &self.shared.counters,
        )
    }

    /// Offload mode: each TUN read is one packet or a super-packet; it is
    /// routed (TTL decremented once, before the headers are copied), its
    /// segments' headers written, and it is sent to its peer in one
    /// `sendmmsg` of GSO sends gathered from those headers and the read
    /// buffer.
    fn tun_to_udp_offload(&mut self) -> io::Result<()> {
        let counters = Arc::clone(&self.shared.counters);
        for _ in 0..TUN_READS_PER_WAKEUP {
            let len = match self.tun.read(&mut self.tun_buf) {
                Ok(len) => len,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            let read = &mut self.tun_buf[..len];
            let Some(packet) = read.get_mut(VNET_HDR_LEN..) else {
                counters.count_drop(DropReason::TooShort);
                continue;
            };
            let peer = match self.peers.outbound(packet) {
                Ok((peer, _)) => peer,
                Err(DropReason::NoRoute) => {
                    answer_unreachable(&self.tun, &self.shared, &mut self.icmp, true, packet);
                    continue;
                }
                Err(reason) => {
                    counters.count_drop(reason);
                    continue;
                }
            };
            match offload::from_tun(read, &mut self.headers) {
                Ok(TunPacket::InPlace(range)) => {
                    let message = (iter::once(&read[range]), peer, None);
                    send_all(&mut self.send, &self.socket, iter::once(message), &counters)?;
                }
                Ok(TunPacket::Segments(segments)) => {
                    let (headers, read) = (&self.headers[..], &*read);
                    let messages = segments
                        .batches(UDP_MAX_SEGMENTS)
                        .map(|(run, gso)| (segments.parts(run, headers, read), peer, gso));
                    send_all(&mut self.send, &self.socket, messages, &counters)?;
                }
                Err(reason) => counters.count_drop(reason),
            }
        }
        Ok(())
    }

    /// Receives up to a batch of datagrams (GRO batches when enabled) in one
    /// `recvmmsg`; every inner packet is checked in place (sender, inner
    /// source, TTL), then the ones that pass are written to the TUN, merged
    /// into super-packets in offload mode.
    fn udp_to_tun(&mut self) -> io::Result<()> {
        let n = match self.recv.recv(&self.socket, &mut self.buffers) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        };
        let counters = Arc::clone(&self.shared.counters);
        self.accepted.clear();
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
            for (k, datagram) in self.buffers[i][..len].chunks_mut(stride).enumerate() {
                match self.peers.inbound(from, datagram, offload::MAX_PACKET) {
                    Ok(total) => {
                        let start = k * stride;
                        self.accepted.push(PacketAt {
                            buffer: i,
                            range: start..start + total,
                        });
                    }
                    Err(reason) => counters.count_drop(reason),
                }
            }
        }
        let accepted = u64::try_from(self.accepted.len()).unwrap_or(u64::MAX);
        counters.received.fetch_add(accepted, Ordering::Relaxed);

        let tun = &self.tun;
        let mut fatal = None;
        let mut emit = |slices: &[IoSlice<'_>]| match tun.write_vectored(slices) {
            Ok(_) => {}
            Err(e) if is_fatal(&e) => fatal = Some(e),
            Err(e) => {
                debug!(error = %e, "TUN write failed");
                counters.count_drop(DropReason::SendFailed);
            }
        };
        if self.offload {
            for at in self.accepted.drain(..) {
                self.coalescer.push(&self.buffers, at, &mut emit);
            }
            self.coalescer.flush(&self.buffers, &mut emit);
        } else {
            for at in &self.accepted {
                if let Some(packet) = self.buffers[at.buffer].get(at.range.clone()) {
                    emit(&[IoSlice::new(packet)]);
                }
            }
        }
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

/// Sends `messages` with `sendmmsg`, resuming after partial sends, waiting
/// once for room when the socket buffer is full, and skipping a message the
/// kernel refuses; counts the packets sent and dropped ([`datagrams`] per
/// message: a GSO send carries several).
fn send_all<'a, P>(
    batch: &mut SendBatch,
    socket: &UdpSocket,
    messages: impl Iterator<Item = (P, SocketAddrV4, Option<u16>)> + Clone,
    counters: &Counters,
) -> io::Result<()>
where
    P: IntoIterator<Item = &'a [u8]>,
{
    let count = messages.clone().count();
    let packets = |from: usize, n: usize| -> u64 {
        let run = messages.clone().skip(from).take(n);
        run.map(|(parts, _, gso)| datagrams(parts, gso)).sum()
    };
    let (mut done, mut sent) = (0, 0);
    while done < count {
        match batch.send_parts(socket, messages.clone().skip(done)) {
            Ok(0) => break,
            Ok(n) => {
                sent += packets(done, n);
                done += n;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if !sys::poll_writable(socket.as_fd(), POLL_MS)? {
                    break;
                }
            }
            Err(e) => {
                // This message alone failed (EMSGSIZE, ...): skip it.
                debug!(error = %e, "sendmmsg refused a packet");
                counters.count_drops(DropReason::SendFailed, packets(done, 1));
                done += 1;
            }
        }
    }
    counters.sent.fetch_add(sent, Ordering::Relaxed);
    let unsent = packets(done, count - done);
    if unsent > 0 {
        counters.count_drops(DropReason::SendFailed, unsent);
    }
    Ok(())
}

/// How many datagrams a message puts on the wire: one, or with a GSO
/// segment size its bytes cut at that size.
fn datagrams<'a>(parts: impl IntoIterator<Item = &'a [u8]>, gso: Option<u16>) -> u64 {
    match gso.map(usize::from) {
        None | Some(0) => 1,
        Some(size) => {
            let len: usize = parts.into_iter().map(<[u8]>::len).sum();
            u64::try_from(len.div_ceil(size)).unwrap_or(u64::MAX)
        }
    }
}

/// Errors after which a worker cannot go on: its TUN queue was detached
/// because the device was deleted (the backend recreates it).
fn is_fatal(e: &io::Error) -> bool {
    e.raw_os_error() == Some(EBADFD)
}

/// EBADFD: the TUN device was deleted under its queue.
const EBADFD: i32 = 77;

#[cfg(test)]
mod tests {
    use super::datagrams;

    #[test]
    fn a_message_counts_the_datagrams_it_puts_on_the_wire() {
        let (header, payload) = ([0u8; 40], [0u8; 1160]);
        // Three segments of 1200 bytes and a last one of 40.
        let parts = [
            &header[..],
            &payload,
            &header,
            &payload,
            &header,
            &payload,
            &header,
        ];
        assert_eq!(datagrams(parts, Some(1200)), 4);
        assert_eq!(datagrams(parts, None), 1);
        assert_eq!(datagrams([&payload[..]], Some(1160)), 1);
        assert_eq!(datagrams([&payload[..]], Some(0)), 1);
    }
}
