//! Kernel tests of the udp backend's TUN offloads (`backends::udp::offload`).
//!
//! Root only: they fail, never skip, without it. Each test makes two network
//! namespaces `fuo<pid>x<n>` with a TUN each (`IFF_VNET_HDR`,
//! `TUNSETOFFLOAD(CSUM | TSO4)`) and forwards between the two TUNs in
//! userspace, the way the engine does: every read is split with
//! [`offload::from_tun`] (TSO super-packets into wire-sized segments: new
//! headers, payload in place, gathered as the engine's GSO send gathers
//! them) and the segments are merged again with an [`offload::Coalescer`]
//! and written to the other TUN as TCPv4 GSO super-packets with one `writev`
//! of the slices the coalescer gives. A real TCP connection from one
//! namespace to the other must carry its data intact, and the counters show
//! that super-packets were read and written. Addresses are 10.244.1.2 and
//! 10.244.2.2, inside the namespaces only; every wait has a deadline, and the
//! namespaces are deleted by drop guards.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use backends::udp::offload::{
    self, Coalescer, HEADER_BUFFER, PacketAt, TUN_READ_BUFFER, TunPacket, VnetHdr,
};
use backends::udp::sys::{
    self, PollFd, SendBatch, TUN_F_CSUM, TUN_F_TSO4, TUN_F_USO4, TUN_F_USO6, Tun, TunOptions,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VNET_HDR_LEN,
};
use common::{Ns, NsGuard, fold, sum16};

const PREFIX: &str = "fuo";
const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
const PORT: u16 = 5201;
const TRANSFER: usize = 8 << 20;
const DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Namespace harness (see `common`).

/// Makes a fresh namespace `fuo<pid>x<n>` with loopback up; deleted when the
/// guard drops.
fn new_ns() -> (Ns, NsGuard) {
    Ns::create(
        PREFIX,
        "the udp offload kernel tests need root (network namespaces, TUN); run them as root",
    )
}

/// Opens an offloading TUN in each namespace (on a thread that visits both,
/// so the test's own threads stay in the root namespace).
fn open_tuns(a: &Ns, b: &Ns, offloads: u32) -> (Tun, Tun) {
    let (a, b) = (a.clone(), b.clone());
    thread::spawn(move || {
        let opts = TunOptions {
            multi_queue: false,
            vnet_hdr: true,
        };
        a.enter();
        let ta = Tun::open("fo%d", opts).unwrap();
        ta.set_offload(offloads).unwrap();
        b.enter();
        let tb = Tun::open("fo%d", opts).unwrap();
        tb.set_offload(offloads).unwrap();
        (ta, tb)
    })
    .join()
    .unwrap()
}

// ---------------------------------------------------------------------------
// The forwarder.

/// How coalesced super-packets are handed to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteMode {
    /// As the [`Coalescer`] makes them: `NEEDS_CSUM`, pseudo-header sum in
    /// the TCP checksum field.
    NeedsCsum,
    /// No flag, the full TCP checksum of the super-packet in the field.
    FullChecksum,
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    reads: u64,
    gso_reads: u64,
    segments: u64,
    writes: u64,
    gso_writes: u64,
    write_errors: u64,
    drops: u64,
}

/// One direction's state: the coalescer and the buffers.
struct Side {
    tun: Tun,
    read_buf: Vec<u8>,
    headers: Vec<u8>,
    /// The segments of one read, back to back, as they would be on the wire.
    wire: Vec<u8>,
    coalescer: Coalescer,
    scratch: Vec<u8>,
}

impl Side {
    fn new(tun: Tun) -> Side {
        Side {
            tun,
            read_buf: vec![0u8; TUN_READ_BUFFER],
            headers: vec![0u8; HEADER_BUFFER],
            wire: Vec::with_capacity(2 * TUN_READ_BUFFER),
            coalescer: Coalescer::new(),
            scratch: vec![0u8; TUN_READ_BUFFER],
        }
    }
}

/// Writes one TUN write produced by the coalescer (its slices, the first
/// beginning with the virtio-net header) into `to`.
fn write_out(
    to: &Tun,
    scratch: &mut Vec<u8>,
    mode: WriteMode,
    slices: &[IoSlice<'_>],
    stats: &mut Stats,
) {
    let parsed = VnetHdr::parse(&slices[0]).unwrap();
    let result = if parsed.gso_type == VIRTIO_NET_HDR_GSO_TCPV4 {
        stats.gso_writes += 1;
        assert_eq!(parsed.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM);
        match mode {
            WriteMode::NeedsCsum => to.write_vectored(slices),
            WriteMode::FullChecksum => {
                scratch.clear();
                for s in slices {
                    scratch.extend_from_slice(s);
                }
                let p = &mut scratch[VNET_HDR_LEN..];
                p[36..38].fill(0);
                let sum = tcp_checksum(p);
                p[36..38].copy_from_slice(&sum.to_be_bytes());
                let plain = VnetHdr { flags: 0, ..parsed };
                scratch[..VNET_HDR_LEN].copy_from_slice(&plain.to_bytes());
                to.write(scratch)
            }
        }
    } else {
        to.write_vectored(slices)
    };
    match result {
        Ok(_) => stats.writes += 1,
        Err(e) => {
            let len: usize = slices.iter().map(|s| s.len()).sum();
            eprintln!("tun write failed: {e} ({parsed:?}, {len} bytes)");
            stats.write_errors += 1;
        }
    }
}

/// Moves what is readable from `from` (up to 64 reads) into `to`: each
/// read is split, its segments gathered into one wire buffer (header and
/// payload slices, as the engine's GSO send gathers them), pushed through
/// the coalescer and flushed.
fn pump(from: &mut Side, to: &Tun, mode: WriteMode, stats: &mut Stats) {
    let Side {
        tun,
        read_buf,
        headers,
        wire,
        coalescer,
        scratch,
    } = from;
    // Writes are counted in `stats` by the closure, reads in `local`.
    let mut local = Stats::default();
    let mut emit = |slices: &[IoSlice<'_>]| write_out(to, scratch, mode, slices, stats);
    for _ in 0..64 {
        let n = match tun.read(read_buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("tun read: {e}"),
        };
        let buf = &mut read_buf[..n];
        local.reads += 1;
        if VnetHdr::parse(buf).is_some_and(|h| h.gso_type != VIRTIO_NET_HDR_GSO_NONE) {
            local.gso_reads += 1;
        }
        wire.clear();
        let mut segments = Vec::new();
        match offload::from_tun(buf, headers) {
            Ok(TunPacket::InPlace(range)) => {
                segments.push(0..range.len());
                wire.extend_from_slice(&buf[range]);
            }
            Ok(TunPacket::Segments(split)) => {
                for part in split.parts(0..split.count(), headers, buf) {
                    wire.extend_from_slice(part);
                }
                assert_eq!(wire.len(), split.wire_len());
                let step = split.segment_len();
                segments.extend(
                    (0..wire.len())
                        .step_by(step)
                        .map(|at| at..(at + step).min(wire.len())),
                );
            }
            // IPv6 (router solicitations and the like).
            Err(_) => local.drops += 1,
        }
        local.segments += u64::try_from(segments.len()).unwrap();
        let batch = std::slice::from_ref(wire);
        for range in segments {
            coalescer.push(batch, PacketAt { buffer: 0, range }, &mut emit);
        }
        coalescer.flush(batch, &mut emit);
    }
    stats.reads += local.reads;
    stats.gso_reads += local.gso_reads;
    stats.segments += local.segments;
    stats.drops += local.drops;
}

/// Forwards between the two TUNs until `stop`; returns the statistics.
fn forward(a: Tun, b: Tun, mode: WriteMode, stop: &AtomicBool) -> Stats {
    let mut stats = Stats::default();
    let mut a = Side::new(a);
    let mut b = Side::new(b);
    while !stop.load(Ordering::Relaxed) {
        let (ra, rb) = {
            let mut fds = [
                PollFd::readable(a.tun.as_fd()),
                PollFd::readable(b.tun.as_fd()),
            ];
            sys::poll(&mut fds, 50).unwrap();
            (fds[0].is_readable(), fds[1].is_readable())
        };
        if ra {
            pump(&mut a, &b.tun, mode, &mut stats);
        }
        if rb {
            pump(&mut b, &a.tun, mode, &mut stats);
        }
    }
    stats
}

// ---------------------------------------------------------------------------
// Helpers.

/// The TCP checksum of an IPv4 (no options) TCP packet whose field is zero.
fn tcp_checksum(p: &[u8]) -> u16 {
    let tcp_len = u32::try_from(p.len() - 20).unwrap();
    let sum = sum16(&p[12..20], 0) + 6 + tcp_len;
    !fold(sum16(&p[20..], sum))
}

/// Byte `i` of the stream: not periodic at any segment size.
fn pattern(i: usize) -> u8 {
    u8::try_from((i * 7 + i / 4099) % 251).unwrap()
}

/// Accepts one connection on ADDR_B:PORT in namespace `ns` and reads it to
/// the end, checking every byte against the pattern; returns the count.
fn serve(ns: &Ns, ready: &mpsc::Sender<()>) -> usize {
    ns.enter();
    let listener = TcpListener::bind(SocketAddrV4::new(ADDR_B, PORT)).unwrap();
    listener.set_nonblocking(true).unwrap();
    ready.send(()).unwrap();
    let deadline = Instant::now() + DEADLINE;
    let mut conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no connection");
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = conn.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        for (k, &byte) in buf[..n].iter().enumerate() {
            assert_eq!(byte, pattern(got + k), "byte {} corrupted", got + k);
        }
        got += n;
        assert!(Instant::now() < deadline, "transfer too slow");
    }
    got
}

/// Connects from namespace `ns` to ADDR_B:PORT and sends TRANSFER bytes.
fn send(ns: &Ns) {
    ns.enter();
    let to = SocketAddr::V4(SocketAddrV4::new(ADDR_B, PORT));
    let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(10)).unwrap();
    conn.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let data: Vec<u8> = (0..TRANSFER).map(pattern).collect();
    for chunk in data.chunks(256 << 10) {
        conn.write_all(chunk).unwrap();
    }
    conn.shutdown(Shutdown::Write).unwrap();
    // Wait for the peer to close, so everything was delivered.
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = [0u8; 16];
    let _ = conn.read(&mut rest);
}

/// Two namespaces with an offloading TUN each, addressed and routed to
/// each other, and a forwarder between the TUNs (stopped with `stop`).
struct Pair {
    _a_guard: NsGuard,
    _b_guard: NsGuard,
    a: Ns,
    b: Ns,
    stop: Arc<AtomicBool>,
    forwarder: thread::JoinHandle<Stats>,
}

impl Pair {
    fn new(offloads: u32, mode: WriteMode) -> Pair {
        let (a, a_guard) = new_ns();
        let (b, b_guard) = new_ns();
        let (ta, tb) = open_tuns(&a, &b, offloads);
        let (na, nb) = (ta.name().to_owned(), tb.name().to_owned());
        a.ip(&["addr", "add", &format!("{ADDR_A}/32"), "dev", &na]);
        a.ip(&["link", "set", &na, "up"]);
        a.ip(&["route", "add", "10.244.2.0/24", "dev", &na]);
        b.ip(&["addr", "add", &format!("{ADDR_B}/32"), "dev", &nb]);
        b.ip(&["link", "set", &nb, "up"]);
        b.ip(&["route", "add", "10.244.1.0/24", "dev", &nb]);
        let stop = Arc::new(AtomicBool::new(false));
        let forwarder = {
            let stop = stop.clone();
            thread::spawn(move || forward(ta, tb, mode, &stop))
        };
        Pair {
            _a_guard: a_guard,
            _b_guard: b_guard,
            a,
            b,
            stop,
            forwarder,
        }
    }

    fn stop(self) -> Stats {
        self.stop.store(true, Ordering::Relaxed);
        self.forwarder.join().unwrap()
    }
}

/// Two namespaces, a forwarder between their TUNs, one TCP transfer.
fn transfer_through_forwarder(mode: WriteMode) -> Stats {
    let pair = Pair::new(TUN_F_CSUM | TUN_F_TSO4, mode);
    let (ready_tx, ready_rx) = mpsc::channel();
    let server = {
        let ns = pair.b.clone();
        thread::spawn(move || serve(&ns, &ready_tx))
    };
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let client = {
        let ns = pair.a.clone();
        thread::spawn(move || send(&ns))
    };
    let (done_tx, done_rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let got = server.join();
        let sent = client.join();
        let _ = done_tx.send(());
        (got, sent)
    });
    let finished = done_rx.recv_timeout(DEADLINE).is_ok();
    let stats = pair.stop();
    assert!(
        finished,
        "the transfer did not finish in {DEADLINE:?}: {stats:?}"
    );
    let (got, sent) = waiter.join().unwrap();
    if let Err(panic) = sent {
        std::panic::resume_unwind(panic);
    }
    let got = got.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    eprintln!("{mode:?}: {got} bytes, {stats:?}");
    assert_eq!(got, TRANSFER);
    assert_eq!(stats.write_errors, 0, "{stats:?}");
    assert!(
        stats.gso_reads > 0,
        "no TSO super-packet was read: {stats:?}"
    );
    assert!(stats.gso_writes > 0, "nothing was coalesced: {stats:?}");
    assert!(stats.segments > stats.reads, "{stats:?}");
    stats
}

/// TSO super-packets read from one TUN are split, merged again and written
/// as TCPv4 GSO (`NEEDS_CSUM`) into the other; the stream arrives intact.
#[test]
fn tso_split_and_gro_coalesce_carry_a_tcp_stream() {
    transfer_through_forwarder(WriteMode::NeedsCsum);
}

/// The TUN also takes a TCPv4 GSO write without `NEEDS_CSUM` when the TCP
/// checksum covers the whole super-packet.
#[test]
fn coalesced_writes_with_a_full_checksum_are_accepted_too() {
    transfer_through_forwarder(WriteMode::FullChecksum);
}

/// With USO (the kernel takes USO4 only together with USO6: EINVAL
/// otherwise), a UDP GSO train leaves the TUN as one UDP_L4 super-packet; split,
/// its datagrams reach a socket in the other namespace one by one, intact.
#[test]
fn uso_split_delivers_udp_datagrams() {
    let pair = Pair::new(
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_USO4 | TUN_F_USO6,
        WriteMode::NeedsCsum,
    );
    let (a, b) = (pair.a.clone(), pair.b.clone());
    let received = thread::spawn(move || {
        b.enter();
        let rx = sys::udp_socket(SocketAddrV4::new(ADDR_B, PORT), false).unwrap();
        let sender = thread::spawn(move || {
            a.enter();
            let tx = sys::udp_socket(SocketAddrV4::new(ADDR_A, 0), false).unwrap();
            let train: Vec<u8> = (0..12_000).map(pattern).collect();
            let mut batch = SendBatch::new(1);
            let to = SocketAddrV4::new(ADDR_B, PORT);
            assert_eq!(batch.send(&tx, &[(&train, to, Some(1200))]).unwrap(), 1);
        });
        sender.join().unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < 10 && Instant::now() < deadline {
            match rx.recv_from(&mut buf) {
                Ok((n, _)) => got.push(buf[..n].to_vec()),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    sys::poll_readable(&[rx.as_fd()], 200).unwrap();
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
        got
    })
    .join();
    let stats = pair.stop();
    let got = received.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    eprintln!("USO: {} datagrams, {stats:?}", got.len());
    assert_eq!(got.len(), 10, "{stats:?}");
    for (i, d) in got.iter().enumerate() {
        assert_eq!(d.len(), 1200);
        assert!(
            d.iter()
                .enumerate()
                .all(|(k, &b)| b == pattern(i * 1200 + k)),
            "datagram {i}"
        );
    }
    assert_eq!(stats.gso_reads, 1, "{stats:?}");
    assert_eq!(stats.write_errors, 0, "{stats:?}");
}
