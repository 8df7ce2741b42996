//! Kernel tests of the udp backend's system-call layer (`backends::udp::sys`).
//!
//! Root only: they fail, never skip, without it. Each test makes its own
//! network namespace `fus<pid>x<n>` (loopback up), runs its body on a thread
//! that entered that namespace (so TUN devices and sockets are made there),
//! checks the result with iproute2/ethtool run in the namespace, and deletes
//! the namespace with a drop guard. Traffic uses 127.0.0.1 and 10.244.8.0/24,
//! 10.244.9.0/32 inside the namespace only; nothing touches the root
//! namespace. Every wait has a deadline.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{ErrorKind, IoSlice};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backends::udp::sys::{
    self, IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TUN, IFF_VNET_HDR, PollFd, RecvBatch, SendBatch,
    TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_USO4, TUN_F_USO6, Tun, TunOptions,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_UDP_L4, VNET_HDR_LEN,
};
use common::{Ns, NsGuard, fold, sum16};
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};

const PREFIX: &str = "fus";
const BODY_TIMEOUT: Duration = Duration::from_secs(60);
const TUN_ADDR: Ipv4Addr = Ipv4Addr::new(10, 244, 9, 0);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 8, 5);
const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

// ---------------------------------------------------------------------------
// Namespace harness (see `common`).

/// Makes a fresh namespace `fus<pid>x<n>` with loopback up; deleted when the
/// guard drops.
fn new_ns() -> (Ns, NsGuard) {
    Ns::create(
        PREFIX,
        "the udp sys kernel tests need root (network namespaces, TUN); run them as root",
    )
}

impl Ns {
    /// Whether a link of that name exists in the namespace.
    fn has_link(&self, name: &str) -> bool {
        Command::new("timeout")
            .args(["10", "ip", "-n", &self.name, "link", "show", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    /// Gives the TUN `TUN_ADDR`/32, brings it up and routes 10.244.8.0/24 to it.
    fn route_via(&self, tun: &str) {
        self.ip(&["addr", "add", &format!("{TUN_ADDR}/32"), "dev", tun]);
        self.ip(&["link", "set", tun, "up"]);
        self.ip(&["route", "add", "10.244.8.0/24", "dev", tun]);
    }
}

/// Makes a fresh namespace, runs `body` on a thread inside it (with a
/// deadline), deletes the namespace, and then re-raises the body's panic.
fn with_netns<F>(body: F)
where
    F: FnOnce(Ns) + Send + 'static,
{
    let (_, guard) = new_ns();
    guard.run_inside(Some(BODY_TIMEOUT), body);
}

// ---------------------------------------------------------------------------
// Helpers.

fn assert_nonblocking_cloexec(fd: BorrowedFd<'_>) {
    let fd_flags = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD).unwrap());
    assert!(fd_flags.contains(FdFlag::FD_CLOEXEC), "not close-on-exec");
    let fl_flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap());
    assert!(fl_flags.contains(OFlag::O_NONBLOCK), "not non-blocking");
}

/// Waits (up to 5 s) until `fd` is readable.
fn wait_readable(fd: BorrowedFd<'_>) {
    let ready = sys::poll_readable(&[fd], 5000).unwrap();
    assert!(ready[0], "nothing to read within 5 s");
}

/// Kernel release (major, minor), e.g. (6, 18).
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap(), parts.next().unwrap())
}

/// The Internet checksum of `data` (one's complement of the one's-complement sum).
fn checksum(data: &[u8]) -> u16 {
    !fold(sum16(data, 0))
}

/// An IPv4/UDP packet `src:sport -> dst:dport` with `payload`; the UDP
/// checksum is left 0 (none) and the IPv4 header checksum is set.
fn udp_packet(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&u16::try_from(total).unwrap().to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let csum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&csum.to_be_bytes());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..26].copy_from_slice(&u16::try_from(udp_len).unwrap().to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

/// The pseudo-header sum (not complemented) that a NEEDS_CSUM UDP packet
/// carries in its checksum field.
fn udp_pseudo_sum(packet: &[u8]) -> u16 {
    let mut sum = sum16(&packet[12..20], 0);
    sum += 17;
    sum += u32::from(u16::from_be_bytes([packet[24], packet[25]]));
    fold(sum)
}

/// A `virtio_net_hdr` (10 bytes, little-endian fields as for a modern device).
fn vnet_hdr(
    flags: u8,
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    start: u16,
    off: u16,
) -> [u8; 10] {
    let mut h = [0u8; 10];
    h[0] = flags;
    h[1] = gso_type;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&start.to_le_bytes());
    h[8..10].copy_from_slice(&off.to_le_bytes());
    h
}

/// A decoded `virtio_net_hdr`.
#[derive(Debug, PartialEq, Eq)]
struct VnetHdr {
    flags: u8,
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
}

fn parse_vnet_hdr(h: &[u8]) -> VnetHdr {
    let le = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
    VnetHdr {
        flags: h[0],
        gso_type: h[1],
        hdr_len: le(2),
        gso_size: le(4),
        csum_start: le(6),
        csum_offset: le(8),
    }
}

/// Reads packets from `tun` until `want` returns true for one (5 s deadline).
fn read_until(tun: &Tun, buf: &mut [u8], want: impl Fn(&[u8]) -> bool) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(Instant::now() < deadline, "the expected packet never came");
        match tun.read(buf) {
            Ok(n) if want(&buf[..n]) => return n,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                sys::poll_readable(&[tun.as_fd()], 200).unwrap();
            }
            Err(e) => panic!("tun read: {e}"),
        }
    }
}

fn is_udp_to(packet: &[u8], dst: Ipv4Addr, dport: u16) -> bool {
    packet.len() >= 28
        && packet[0] >> 4 == 4
        && packet[9] == 17
        && packet[16..20] == dst.octets()
        && packet[22..24] == dport.to_be_bytes()
}

/// Payload of message `i` of length `len`: its index, then a pattern.
fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| {
            if j < 2 {
                u8::try_from(i).unwrap()
            } else {
                u8::try_from((i * 7 + j) % 251).unwrap()
            }
        })
        .collect()
}

fn local_v4(sock: &UdpSocket) -> SocketAddrV4 {
    match sock.local_addr().unwrap() {
        std::net::SocketAddr::V4(a) => a,
        other => panic!("not IPv4: {other}"),
    }
}

/// Receives until `want` datagrams (or GRO messages) arrived or 5 s passed;
/// returns (buffer contents, source, gro segment, truncated) per message and
/// the number of `recv` calls that returned data.
#[allow(clippy::type_complexity)]
fn recv_all(
    sock: &UdpSocket,
    batch: &mut RecvBatch,
    buf_len: usize,
    want: usize,
) -> (
    Vec<(Vec<u8>, Option<SocketAddrV4>, Option<u16>, bool)>,
    usize,
) {
    let mut bufs: Vec<Vec<u8>> = (0..batch.capacity()).map(|_| vec![0u8; buf_len]).collect();
    let mut out = Vec::new();
    let mut calls = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while out.len() < want && Instant::now() < deadline {
        match batch.recv(sock, &mut bufs) {
            Ok(n) => {
                calls += 1;
                for (i, buf) in bufs.iter().enumerate().take(n) {
                    out.push((
                        buf[..batch.len(i)].to_vec(),
                        batch.source(i),
                        batch.gro_segment(i),
                        batch.truncated(i),
                    ));
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                sys::poll_readable(&[sock.as_fd()], 200).unwrap();
            }
            Err(e) => panic!("recv: {e}"),
        }
    }
    (out, calls)
}

// ---------------------------------------------------------------------------
// TUN.

#[test]
fn tun_open_names_flags_and_lifetime() {
    with_netns(|ns| {
        let tun = Tun::open("flannel%d", TunOptions::default()).unwrap();
        assert_eq!(tun.name(), "flannel0");
        assert_eq!(tun.flags().unwrap() & 0xffff, IFF_TUN | IFF_NO_PI);
        assert_nonblocking_cloexec(tun.as_fd());
        let flags = ns.exec(&["cat", "/sys/class/net/flannel0/tun_flags"]);
        assert_eq!(flags.trim(), "0x1001");
        let details = ns.ip(&["-d", "link", "show", "flannel0"]);
        assert!(
            details.contains("tun type tun pi off vnet_hdr off"),
            "{details}"
        );
        assert!(!details.contains("multi_queue"), "{details}");

        // Nothing to read yet: non-blocking.
        let mut buf = [0u8; 2048];
        assert_eq!(
            tun.read(&mut buf).unwrap_err().kind(),
            ErrorKind::WouldBlock
        );

        // The template takes the next free number; a fixed name is kept.
        let second = Tun::open("flannel%d", TunOptions::default()).unwrap();
        assert_eq!(second.name(), "flannel1");
        let named = Tun::open("fus-tun", TunOptions::default()).unwrap();
        assert_eq!(named.name(), "fus-tun");

        // A single-queue device takes no second queue.
        assert_eq!(
            tun.open_queue().unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        let busy = Tun::open("flannel0", TunOptions::default()).unwrap_err();
        assert_eq!(busy.raw_os_error(), Some(libc_ebusy()), "{busy}");

        // Bad names never reach the kernel.
        for bad in ["a-name-of-16-chr", "nul\0", "a/b"] {
            let err = Tun::open(bad, TunOptions::default()).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad:?}");
        }

        // The device lives as long as its last queue.
        drop(second);
        assert!(!ns.has_link("flannel1"));
        assert!(ns.has_link("flannel0"));
        drop(tun);
        assert!(!ns.has_link("flannel0"));

        let features = sys::tun_features().unwrap();
        assert_eq!(
            features & (IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | IFF_VNET_HDR),
            IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | IFF_VNET_HDR,
            "features {features:#x}"
        );
    });
}

/// EBUSY, without a libc dependency in the tests.
fn libc_ebusy() -> i32 {
    nix::errno::Errno::EBUSY as i32
}

#[test]
fn tun_multi_queue_spreads_flows_over_queues() {
    let (other, _other_guard) = new_ns();
    with_netns(move |ns| {
        let opts = TunOptions {
            multi_queue: true,
            vnet_hdr: false,
        };
        let first = Tun::open("flannel%d", opts).unwrap();
        let queues = [first.open_queue().unwrap(), first.open_queue().unwrap()];
        for q in &queues {
            assert_eq!(q.name(), "flannel0");
            assert_nonblocking_cloexec(q.as_fd());
        }
        assert_eq!(
            first.flags().unwrap() & 0xffff,
            IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE
        );
        let details = ns.ip(&["-d", "link", "show", "flannel0"]);
        assert!(details.contains("multi_queue numqueues 3"), "{details}");
        let flags = ns.exec(&["cat", "/sys/class/net/flannel0/tun_flags"]);
        assert_eq!(flags.trim(), "0x1101");

        // From a thread in another namespace, open_queue refuses (the kernel
        // would make a new flannel0 there) and that namespace stays empty.
        std::thread::scope(|s| {
            s.spawn(|| {
                other.enter();
                let err = first.open_queue().unwrap_err();
                assert!(err.to_string().contains("namespace"), "{err}");
            })
            .join()
            .unwrap();
        });
        assert!(!other.has_link("flannel0"));

        // 64 flows (source ports) towards the TUN: the kernel spreads them by
        // hash, so more than one queue carries traffic.
        ns.route_via("flannel0");
        let all: Vec<&Tun> = std::iter::once(&first).chain(queues.iter()).collect();
        let mut per_queue = [0usize; 3];
        let sockets: Vec<UdpSocket> = (0..64)
            .map(|_| sys::udp_socket(SocketAddrV4::new(TUN_ADDR, 0), false).unwrap())
            .collect();
        for sock in &sockets {
            sock.send_to(b"flow", SocketAddrV4::new(REMOTE, 9)).unwrap();
        }
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(5);
        while per_queue.iter().sum::<usize>() < 64 && Instant::now() < deadline {
            let fds: Vec<BorrowedFd<'_>> = all.iter().map(|t| t.as_fd()).collect();
            let ready = sys::poll_readable(&fds, 200).unwrap();
            for (q, tun) in all.iter().enumerate() {
                if !ready[q] {
                    continue;
                }
                while let Ok(n) = tun.read(&mut buf) {
                    if is_udp_to(&buf[..n], REMOTE, 9) {
                        per_queue[q] += 1;
                    }
                }
            }
        }
        assert_eq!(per_queue.iter().sum::<usize>(), 64, "{per_queue:?}");
        assert!(
            per_queue.iter().filter(|&&n| n > 0).count() >= 2,
            "all flows on one queue: {per_queue:?}"
        );
        eprintln!("flows per queue: {per_queue:?}");

        // Dropping every queue removes the device.
        drop(all);
        drop(queues);
        drop(first);
        assert!(!ns.has_link("flannel0"));
    });
}

#[test]
fn tun_vnet_hdr_and_offloads_are_accepted() {
    with_netns(|ns| {
        let opts = TunOptions {
            multi_queue: true,
            vnet_hdr: true,
        };
        let tun = Tun::open("flannel%d", opts).unwrap();
        let flags = tun.flags().unwrap();
        assert_eq!(
            flags & 0xffff,
            IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | IFF_VNET_HDR
        );
        let details = ns.ip(&["-d", "link", "show", "flannel0"]);
        assert!(details.contains("vnet_hdr on multi_queue"), "{details}");

        tun.set_vnet_hdr_size(12).unwrap();
        tun.set_vnet_hdr_size(10).unwrap();
        assert!(
            tun.set_vnet_hdr_size(4).is_err(),
            "a header shorter than 10 bytes"
        );

        tun.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            .unwrap();
        let features = ns.exec(&["ethtool", "-k", "flannel0"]);
        assert!(
            features.contains("tx-checksum-ip-generic: on"),
            "{features}"
        );
        assert!(features.contains("tx-tcp-segmentation: on"), "{features}");
        assert!(features.contains("tx-tcp6-segmentation: on"), "{features}");
        assert!(features.contains("tx-udp-segmentation: off"), "{features}");

        let uso = tun.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6);
        eprintln!("USO: {uso:?} (kernel {:?})", kernel_version());
        if kernel_version() >= (6, 2) {
            uso.unwrap();
            let features = ns.exec(&["ethtool", "-k", "flannel0"]);
            assert!(features.contains("tx-udp-segmentation: on"), "{features}");
        }

        // A queue opened later shares the device's offloads.
        let second = tun.open_queue().unwrap();
        let features = ns.exec(&["ethtool", "-k", "flannel0"]);
        assert!(features.contains("tx-tcp-segmentation: on"), "{features}");
        drop(second);

        // Unknown offload bits are refused; 0 turns them all off.
        assert!(tun.set_offload(1 << 20).is_err());
        tun.set_offload(0).unwrap();
        let features = ns.exec(&["ethtool", "-k", "flannel0"]);
        assert!(features.contains("tx-tcp-segmentation: off"), "{features}");
    });
}

#[test]
fn tun_ping_round_trip() {
    with_netns(|ns| {
        let tun = Tun::open("flannel%d", TunOptions::default()).unwrap();
        ns.route_via(tun.name());
        let ping = Command::new("timeout")
            .args(["10", "ip", "netns", "exec", &ns.name])
            .args(["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2"])
            .arg(REMOTE.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 2048];
        for _ in 0..3 {
            // Read the echo request, answer it through the TUN.
            let n = read_until(&tun, &mut buf, |p| {
                p.len() >= 28 && p[9] == 1 && p[20] == 8 && p[16..20] == REMOTE.octets()
            });
            let packet = &mut buf[..n];
            assert_eq!(
                packet[12..20],
                [TUN_ADDR.octets(), REMOTE.octets()].concat()
            );
            assert_eq!(checksum(&packet[..20]), 0, "IPv4 header checksum");
            let (src, dst) = (packet[12..16].to_vec(), packet[16..20].to_vec());
            packet[12..16].copy_from_slice(&dst);
            packet[16..20].copy_from_slice(&src);
            packet[20] = 0; // echo reply
            packet[22..24].copy_from_slice(&[0, 0]);
            let icmp = checksum(&packet[20..]);
            packet[22..24].copy_from_slice(&icmp.to_be_bytes());
            assert_eq!(tun.write(packet).unwrap(), n);
        }
        let output = ping.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "ping failed: {stdout}");
        assert!(stdout.contains("3 received"), "{stdout}");
    });
}

#[test]
fn tun_write_delivers_to_a_socket() {
    with_netns(|ns| {
        let tun = Tun::open("flannel%d", TunOptions::default()).unwrap();
        ns.route_via(tun.name());
        let sock = sys::udp_socket(SocketAddrV4::new(TUN_ADDR, 0), false).unwrap();
        let port = local_v4(&sock).port();
        let data = payload(3, 1000);
        let packet = udp_packet(REMOTE, 4000, TUN_ADDR, port, &data);
        assert_eq!(tun.write(&packet).unwrap(), packet.len());
        // Gathered from two slices, as a caller with a separate header would.
        let (head, rest) = packet.split_at(20);
        let n = tun
            .write_vectored(&[IoSlice::new(head), IoSlice::new(rest)])
            .unwrap();
        assert_eq!(n, packet.len());
        let mut batch = RecvBatch::new(8);
        let (got, _) = recv_all(&sock, &mut batch, 2048, 2);
        assert_eq!(got.len(), 2);
        for (bytes, source, gro, truncated) in got {
            assert_eq!(bytes, data);
            assert_eq!(source, Some(SocketAddrV4::new(REMOTE, 4000)));
            assert_eq!(gro, None);
            assert!(!truncated);
        }
    });
}

#[test]
fn tun_vnet_hdr_carries_checksum_and_uso_offloads() {
    with_netns(|ns| {
        let opts = TunOptions {
            multi_queue: false,
            vnet_hdr: true,
        };
        let tun = Tun::open("flannel%d", opts).unwrap();
        let uso = kernel_version() >= (6, 2);
        let mut offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
        if uso {
            offloads |= TUN_F_USO4 | TUN_F_USO6;
        }
        tun.set_offload(offloads).unwrap();
        ns.route_via(tun.name());
        let sock = sys::udp_socket(SocketAddrV4::new(TUN_ADDR, 0), false).unwrap();
        assert!(sys::udp_gso_supported(&sock));
        let to = SocketAddrV4::new(REMOTE, 7777);
        let mut buf = vec![0u8; 65536 + VNET_HDR_LEN];

        // A small datagram: the checksum is left to the reader.
        let small = payload(1, 100);
        assert_eq!(sock.send_to(&small, to).unwrap(), 100);
        let n = read_until(&tun, &mut buf, |p| {
            is_udp_to(&p[VNET_HDR_LEN..], REMOTE, 7777)
        });
        let hdr = parse_vnet_hdr(&buf[..VNET_HDR_LEN]);
        assert_eq!(hdr.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM, "{hdr:?}");
        assert_eq!(hdr.gso_type, VIRTIO_NET_HDR_GSO_NONE, "{hdr:?}");
        assert_eq!((hdr.csum_start, hdr.csum_offset), (20, 6), "{hdr:?}");
        let packet = &buf[VNET_HDR_LEN..n];
        assert_eq!(packet.len(), 128);
        assert_eq!(&packet[28..], &small[..]);
        assert_eq!(
            u16::from_be_bytes([packet[26], packet[27]]),
            udp_pseudo_sum(packet),
            "a NEEDS_CSUM packet carries the pseudo-header sum"
        );

        // A GSO train of 10 x 1200 bytes: with USO it reaches the TUN as one
        // super-packet, else as 10 packets.
        let big = payload(2, 12000);
        let mut send = SendBatch::new(4);
        assert_eq!(send.send(&sock, &[(&big, to, Some(1200))]).unwrap(), 1);
        let n = read_until(&tun, &mut buf, |p| {
            is_udp_to(&p[VNET_HDR_LEN..], REMOTE, 7777)
        });
        let hdr = parse_vnet_hdr(&buf[..VNET_HDR_LEN]);
        if uso {
            assert_eq!(hdr.gso_type, VIRTIO_NET_HDR_GSO_UDP_L4, "{hdr:?}");
            assert_eq!(hdr.gso_size, 1200, "{hdr:?}");
            assert_eq!(hdr.hdr_len, 28, "{hdr:?}");
            assert_eq!(hdr.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM, "{hdr:?}");
            let packet = &buf[VNET_HDR_LEN..n];
            assert_eq!(packet.len(), 28 + 12000);
            assert_eq!(&packet[28..], &big[..]);
        } else {
            assert_eq!(hdr.gso_type, VIRTIO_NET_HDR_GSO_NONE, "{hdr:?}");
            assert_eq!(n - VNET_HDR_LEN, 28 + 1200);
        }
        eprintln!("GSO train on the TUN: {hdr:?}, {} bytes", n - VNET_HDR_LEN);

        // Writing: a plain packet behind an empty header, then a UDP
        // super-packet (NEEDS_CSUM, UDP_L4, 1000-byte segments) that the
        // kernel splits for a socket without GRO.
        let rx = sys::udp_socket(SocketAddrV4::new(TUN_ADDR, 0), false).unwrap();
        let port = local_v4(&rx).port();
        let plain = udp_packet(REMOTE, 5000, TUN_ADDR, port, &payload(5, 300));
        let none = vnet_hdr(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0);
        let n = tun
            .write_vectored(&[IoSlice::new(&none), IoSlice::new(&plain)])
            .unwrap();
        assert_eq!(n, VNET_HDR_LEN + plain.len());
        let mut batch = RecvBatch::new(16);
        let (got, _) = recv_all(&rx, &mut batch, 2048, 1);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, payload(5, 300));

        if uso {
            let train = payload(6, 2500);
            let mut packet = udp_packet(REMOTE, 5001, TUN_ADDR, port, &train);
            let pseudo = udp_pseudo_sum(&packet);
            packet[26..28].copy_from_slice(&pseudo.to_be_bytes());
            let hdr = vnet_hdr(
                VIRTIO_NET_HDR_F_NEEDS_CSUM,
                VIRTIO_NET_HDR_GSO_UDP_L4,
                28,
                1000,
                20,
                6,
            );
            let n = tun
                .write_vectored(&[IoSlice::new(&hdr), IoSlice::new(&packet)])
                .unwrap();
            assert_eq!(n, VNET_HDR_LEN + packet.len());
            let (got, _) = recv_all(&rx, &mut batch, 2048, 3);
            let lens: Vec<usize> = got.iter().map(|m| m.0.len()).collect();
            assert_eq!(lens, [1000, 1000, 500]);
            let joined: Vec<u8> = got.iter().flat_map(|m| m.0.clone()).collect();
            assert_eq!(joined, train);
            assert!(
                got.iter()
                    .all(|m| m.1 == Some(SocketAddrV4::new(REMOTE, 5001)))
            );
        }
    });
}

// ---------------------------------------------------------------------------
// UDP.

#[test]
fn udp_socket_is_nonblocking_cloexec_and_reuses_ports() {
    with_netns(|_ns| {
        let sock = sys::udp_socket(SocketAddrV4::new(LOCALHOST, 0), false).unwrap();
        assert_nonblocking_cloexec(sock.as_fd());
        let mut batch = RecvBatch::new(4);
        let mut bufs = vec![vec![0u8; 64]; 4];
        let err = batch.recv(&sock, &mut bufs).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::WouldBlock);
        assert_eq!(batch.received(), 0);

        // Without SO_REUSEPORT the port is taken; with it, workers share it.
        let port = local_v4(&sock).port();
        let taken = sys::udp_socket(SocketAddrV4::new(LOCALHOST, port), false).unwrap_err();
        assert_eq!(taken.kind(), ErrorKind::AddrInUse);
        let a = sys::udp_socket(SocketAddrV4::new(LOCALHOST, 0), true).unwrap();
        let shared = local_v4(&a).port();
        let b = sys::udp_socket(SocketAddrV4::new(LOCALHOST, shared), true).unwrap();
        assert_eq!(local_v4(&b).port(), shared);

        // Buffer sizes: forced past rmem_max as root (the kernel reports double).
        sys::set_buffer_sizes(&sock, 8 << 20, 4 << 20).unwrap();
        let (rcv, snd) = sys::buffer_sizes(&sock).unwrap();
        assert!(rcv >= 8 << 20 && snd >= 4 << 20, "rcv {rcv}, snd {snd}");
        sys::set_buffer_sizes(&sock, 0, 0).unwrap();
        assert_eq!(sys::buffer_sizes(&sock).unwrap(), (rcv, snd));

        // poll: a socket with room is writable, an empty one not readable.
        let mut set = [PollFd::new(sock.as_fd(), true, true)];
        assert_eq!(sys::poll(&mut set, 0).unwrap(), 1);
        assert!(set[0].is_writable() && !set[0].is_readable());
        assert!(sys::poll_writable(sock.as_fd(), 0).unwrap());
        assert_eq!(sys::poll_readable(&[sock.as_fd()], 10).unwrap(), [false]);
    });
}

#[test]
fn udp_batches_64_datagrams_of_varying_sizes() {
    with_netns(|_ns| {
        let rx = sys::udp_socket(SocketAddrV4::new(LOCALHOST, 0), false).unwrap();
        let tx = sys::udp_socket(SocketAddrV4::new(LOCALHOST, 0), false).unwrap();
        sys::set_buffer_sizes(&rx, 8 << 20, 0).unwrap();
        sys::set_buffer_sizes(&tx, 0, 8 << 20).unwrap();
        let to = local_v4(&rx);
        let sizes: Vec<usize> = (0..64)
            .map(|i| match i {
                0 => 2,
                7 => 9000,
                30 => 65507,
                _ => 2 + (i * 37) % 1470,
            })
            .collect();
        let payloads: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| payload(i, n))
            .collect();
        let msgs: Vec<(&[u8], SocketAddrV4, Option<u16>)> =
            payloads.iter().map(|p| (p.as_slice(), to, None)).collect();
        let mut send = SendBatch::new(64);
        let started = Instant::now();
        assert_eq!(
            send.send(&tx, &msgs).unwrap(),
            64,
            "one sendmmsg takes all 64"
        );

        // Let the loopback deliver all 64 (normally done before sendmmsg returns).
        wait_readable(rx.as_fd());
        std::thread::sleep(Duration::from_millis(50));
        let mut recv = RecvBatch::new(64);
        let (got, calls) = recv_all(&rx, &mut recv, 65536, 64);
        eprintln!(
            "64 datagrams ({} bytes) in 1 sendmmsg and {calls} recvmmsg call(s), {:?}",
            sizes.iter().sum::<usize>(),
            started.elapsed()
        );
        assert_eq!(got.len(), 64);
        assert!(calls <= 2, "{calls} recvmmsg calls for 64 queued datagrams");
        for (i, (bytes, source, gro, truncated)) in got.iter().enumerate() {
            assert_eq!(bytes.len(), sizes[i], "datagram {i}");
            assert_eq!(bytes, &payloads[i], "datagram {i}");
            assert_eq!(*source, Some(local_v4(&tx)));
            assert_eq!(*gro, None);
            assert!(!truncated);
        }

        // The iterator form: more messages than the capacity sends a batch's worth.
        let mut small = SendBatch::new(8);
        let sent = small
            .send_from(&tx, payloads.iter().map(|p| (p.as_slice(), to, None)))
            .unwrap();
        assert_eq!(sent, 8);
        let (got, _) = recv_all(&rx, &mut recv, 65536, 8);
        assert_eq!(got.len(), 8);
        // An empty batch is a no-op.
        assert_eq!(small.send(&tx, &[]).unwrap(), 0);
    });
}

#[test]
fn udp_send_batch_mixes_destinations() {
    with_netns(|_ns| {
        let a = sys::udp_socket(SocketAddrV4::new(LOCALHOST, 0), false).unwrap();
        let b = sys::udp_socket(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 0), false).unwrap();
        let tx = sys::udp_socket(SocketAddrV4::new(LOCALHOST, 0), false).unwrap();
        let payloads: Vec<Vec<u8>> = (0..16).map(|i| payload(i, 100 + i)).collect();
        let msgs: Vec<(&[u8], SocketAddrV4, Option<u16>)> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (
                    p.as_slice(),
                    if i % 2 == 0 {
                        local_v4(&a)
                    } else {
                        local_v4(&b)
                    },
                    None,
                )
            })
            .collect();
        let mut send = SendBatch::new(16);
        assert_eq!(send.send(&tx, &msgs).unwrap(), 16);
        let mut recv = RecvBatch::new(16);
        let (to_a, _) = recv_all(&a, &mut recv, 2048, 8);
        let (to_b, _) = recv_all(&b, &mut recv, 2048, 8);
        let a_ids: Vec<u8> = to_a.iter().map(|m| m.0[0]).collect();
        let b_ids: Vec<u8> = to_b.iter().map(|m| m.0[0]).collect();
        assert_eq!(a_ids, [0, 2, 4, 6, 8, 10, 12, 14]);
        assert_eq!(b_ids, [1, 3, 5, 7, 9, 11, 13, 15]);
    });
}

#[test]
fn udp_gso_splits_a_train_into_datagrams() {
    with_netns(|_ns| {
        let rx = sys::udp_socket(SocketAddrV4::new(LOCALHOST, 0), false).unwrap();
        let tx = sys::udp_socket(SocketAddrV4::new(LOCALHOST, 0), false).unwrap();
        assert!(sys::udp_gso_supported(&tx), "UDP_SEGMENT (Linux >= 4.18)");
        let to = local_v4(&rx);
        let train = payload(1, 12000);
        let short = payload(2, 3000);
        let plain = payload(3, 700);
        let mut send = SendBatch::new(8);
        let sent = send
            .send(
                &tx,
                &[
                    (&train, to, Some(1200)),
                    (&plain, to, None),
                    (&short, to, Some(1200)),
                ],
            )
            .unwrap();
        assert_eq!(sent, 3);
        let mut recv = RecvBatch::new(32);
        let (got, calls) = recv_all(&rx, &mut recv, 65536, 14);
        eprintln!(
            "GSO without GRO: {} datagrams in {calls} call(s)",
            got.len()
        );
        let lens: Vec<usize> = got.iter().map(|m| m.0.len()).collect();
        let mut want = vec![1200; 10];
        want.extend([700, 1200, 1200, 600]);
        assert_eq!(lens, want);
        let joined: Vec<u8> = got[..10].iter().flat_map(|m| m.0.clone()).collect();
        assert_eq!(joined, train);
        assert_eq!(got[10].0, plain);
        let joined: Vec<u8> = got[11..].iter().flat_map(|m| m.0.clone()).collect();
        assert_eq!(joined, short);
        assert!(
            got.iter()
                .all(|m| m.2.is_none() && !m.3 && m.1 == Some(local_v4(&tx)))
        );

        // A segment size giving more than the kernel's limit of segments fails
        // for that message alone.
        let too_many = vec![0u8; 200 * 10];
        let err = send.send(&tx, &[(&too_many, to, Some(10))]).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(nix::errno::Errno::EINVAL as i32),
            "{err}"
        );
    });
}

/// Messages gathered from many slices: each datagram of a GSO train is a
/// 40-byte header slice and a payload slice elsewhere (the engine's split),
/// and the receiver sees the datagrams whole; too many slices is refused.
#[test]
fn udp_gso_gathers_a_train_from_slices() {
    with_netns(|_ns| {
        let rx = sys::udp_socket(SocketAddrV4::new(LOCALHOST, 0), false).unwrap();
        let tx = sys::udp_socket(SocketAddrV4::new(LOCALHOST, 0), false).unwrap();
        let to = local_v4(&rx);
        let headers: Vec<Vec<u8>> = (0..7u8).map(|i| vec![i; 40]).collect();
        let body = payload(4, 6 * 1000 + 300);
        let train: Vec<&[u8]> = body
            .chunks(1000)
            .zip(&headers)
            .flat_map(|(p, h)| [&h[..], p])
            .collect();
        let lone: [&[u8]; 3] = [b"ab", b"", b"cde"];
        let mut send = SendBatch::with_parts(4, 14);
        assert_eq!(send.max_parts(), 14);
        let messages = [(train.clone(), to, Some(1040)), (lone.to_vec(), to, None)];
        assert_eq!(send.send_parts(&tx, messages).unwrap(), 2);
        let mut recv = RecvBatch::new(32);
        let (got, _) = recv_all(&rx, &mut recv, 65536, 8);
        let want: Vec<Vec<u8>> = train
            .chunks(2)
            .map(<[&[u8]]>::concat)
            .chain([b"abcde".to_vec()])
            .collect();
        let got: Vec<Vec<u8>> = got.into_iter().map(|m| m.0).collect();
        assert_eq!(got, want);

        // 15 slices in a batch of 14 per message: nothing sent, a clear error.
        let mut too_many = train.clone();
        too_many.push(b"x");
        let err = send
            .send_parts(&tx, [(too_many.clone(), to, Some(1040))])
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        // After a good message, the bad one stops the batch there.
        let sent = send
            .send_parts(&tx, [(lone.to_vec(), to, None), (too_many, to, None)])
            .unwrap();
        assert_eq!(sent, 1);
    });
}

/// A reuseport group steered by inner flow: every datagram of a flow reaches
/// the socket its inner addresses and ports hash to (computed here
/// independently of the BPF program), different flows reach both sockets,
/// and a datagram too short to hash reaches the first.
#[test]
fn reuseport_steers_datagrams_by_inner_flow() {
    with_netns(|_ns| {
        let first = sys::udp_socket(SocketAddrV4::new(LOCALHOST, 0), true).unwrap();
        let to = local_v4(&first);
        let second = sys::udp_socket(to, true).unwrap();
        sys::steer_by_inner_flow(&first, 2).unwrap();
        let tx = sys::udp_socket(SocketAddrV4::new(LOCALHOST, 0), false).unwrap();
        let be32 = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
        let expected_socket = |p: &[u8]| {
            let h = be32(&p[20..24]) ^ be32(&p[12..16]) ^ be32(&p[16..20]);
            usize::try_from((h ^ (h >> 16)) % 2).unwrap()
        };
        let inner = |flow: u16, seq: u8| {
            let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
            p.extend_from_slice(&[10, 244, 1, 2, 10, 244, 2, 2]);
            p.extend_from_slice(&(40_000 + flow).to_be_bytes());
            p.extend_from_slice(&5201u16.to_be_bytes());
            p.extend_from_slice(&[seq; 16]);
            p
        };
        let mut sent = Vec::new();
        for seq in 0..3 {
            for flow in 0..16 {
                let p = inner(flow, seq);
                tx.send_to(&p, to).unwrap();
                sent.push(p);
            }
        }
        tx.send_to(&[0x45; 10], to).unwrap();
        let mut got: Vec<(usize, Vec<u8>)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 256];
        while got.len() < sent.len() + 1 && Instant::now() < deadline {
            for (i, sock) in [&first, &second].into_iter().enumerate() {
                match sock.recv(&mut buf) {
                    Ok(n) => got.push((i, buf[..n].to_vec())),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("recv: {e}"),
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(got.len(), sent.len() + 1, "every datagram arrives");
        for (socket, p) in &got {
            if p.len() == 10 {
                assert_eq!(*socket, 0, "too short to hash: the first socket");
            } else {
                assert_eq!(*socket, expected_socket(p), "flow {:?}", &p[20..22]);
            }
        }
        let on_second = got.iter().filter(|(s, _)| *s == 1).count();
        assert!(
            on_second > 0 && on_second < sent.len(),
            "16 flows spread over both sockets ({on_second} of {} on the second)",
            sent.len()
        );
    });
}

#[test]
fn udp_gro_receives_a_train_as_one_message() {
    with_netns(|_ns| {
        let rx = sys::udp_socket(SocketAddrV4::new(LOCALHOST, 0), false).unwrap();
        sys::enable_udp_gro(&rx).unwrap();
        let tx = sys::udp_socket(SocketAddrV4::new(LOCALHOST, 0), false).unwrap();
        let to = local_v4(&rx);
        let train = payload(1, 12000);
        let tail = payload(2, 12500);
        let mut send = SendBatch::new(4);
        assert_eq!(
            send.send(&tx, &[(&train, to, Some(1200)), (&tail, to, Some(1200))])
                .unwrap(),
            2
        );
        let mut recv = RecvBatch::new(8);
        let (got, _) = recv_all(&rx, &mut recv, 65536, 2);
        assert_eq!(got.len(), 2, "GRO keeps each train whole");
        assert_eq!(got[0].0, train);
        assert_eq!(got[0].2, Some(1200));
        assert_eq!(got[1].0, tail, "the last segment (500 bytes) is shorter");
        assert_eq!(got[1].2, Some(1200));
        assert!(got.iter().all(|m| !m.3 && m.1 == Some(local_v4(&tx))));

        // A single datagram carries no segment size.
        send.send(&tx, &[(&train[..800], to, None)]).unwrap();
        let (got, _) = recv_all(&rx, &mut recv, 65536, 1);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.len(), 800);
        assert_eq!(got[0].2, None);
    });
}

#[test]
fn udp_truncation_and_drops_are_reported() {
    with_netns(|_ns| {
        let rx = sys::udp_socket(SocketAddrV4::new(LOCALHOST, 0), false).unwrap();
        let tx = sys::udp_socket(SocketAddrV4::new(LOCALHOST, 0), false).unwrap();
        let to = local_v4(&rx);
        let long = payload(1, 2000);
        let fits = payload(2, 100);
        let mut send = SendBatch::new(64);
        assert_eq!(
            send.send(&tx, &[(&long, to, None), (&fits, to, None)])
                .unwrap(),
            2
        );
        let mut recv = RecvBatch::new(2);
        let mut bufs = vec![vec![0u8; 1000]; 2];
        wait_readable(rx.as_fd());
        let n = recv.recv(&rx, &mut bufs).unwrap();
        assert_eq!(n, 2);
        assert!(recv.truncated(0));
        assert_eq!(recv.len(0), 1000);
        assert_eq!(bufs[0], long[..1000]);
        assert!(!recv.truncated(1));
        assert_eq!(recv.len(1), 100);
        assert_eq!(bufs[1][..100], fits[..]);
        assert!(!recv.control_truncated(0));

        // SO_RXQ_OVFL: overflow a tiny receive buffer, drain it, and the next
        // datagram carries the drop count.
        sys::enable_rxq_overflow(&rx).unwrap();
        sys::set_buffer_sizes(&rx, 4096, 0).unwrap();
        let burst = payload(3, 1000);
        let msgs: Vec<(&[u8], SocketAddrV4, Option<u16>)> =
            (0..64).map(|_| (burst.as_slice(), to, None)).collect();
        assert_eq!(send.send(&tx, &msgs).unwrap(), 64);
        // Count what was queued; a marker of another size, sent after the
        // burst, arrives last and carries the drop count.
        send.send(&tx, &[(&fits, to, None)]).unwrap();
        let mut recv = RecvBatch::new(64);
        let mut bufs = vec![vec![0u8; 2048]; 64];
        let mut queued = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        let dropped = 'marker: loop {
            assert!(Instant::now() < deadline, "the marker never came");
            match recv.recv(&rx, &mut bufs) {
                Ok(n) => {
                    for i in 0..n {
                        if recv.len(i) == fits.len() {
                            break 'marker recv.rxq_dropped(i).unwrap();
                        }
                        queued += 1;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => wait_readable(rx.as_fd()),
                Err(e) => panic!("recv: {e}"),
            }
        };
        assert!(queued < 64, "a 4 KiB buffer held {queued} datagrams");
        assert_eq!(dropped as usize, 64 - queued, "kernel drop counter");
        eprintln!("rx queue overflow: {queued} queued, {dropped} dropped");
    });
}
