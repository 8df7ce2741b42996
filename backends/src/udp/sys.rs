//! The system-call layer of the `udp` backend: the TUN device and batched UDP.
//!
//! This is the only module of the project allowed to contain `unsafe`; every
//! block says why it is sound. Everything here is a thin, allocation-free
//! wrapper over one Linux interface:
//!
//! - [`Tun`]: `/dev/net/tun` with `TUNSETIFF` (`IFF_TUN | IFF_NO_PI`, plus
//!   `IFF_MULTI_QUEUE` and `IFF_VNET_HDR` on request), `TUNSETOFFLOAD`,
//!   `TUNSETVNETHDRSZ`, `TUNGETIFF`, and plain `read`/`write`/`readv`/`writev`.
//! - [`RecvBatch`] / [`SendBatch`]: `recvmmsg(2)` / `sendmmsg(2)` over
//!   arrays owned by the batch (headers, `iovec`s, addresses, control
//!   buffers), so a call allocates nothing and copies no payload (a sent
//!   message may be gathered from many slices); control messages `UDP_GRO`
//!   (receive), `UDP_SEGMENT` (send, GSO) and `SO_RXQ_OVFL` (receive, drop
//!   counter).
//! - socket set-up: [`udp_socket`], [`enable_udp_gro`], [`udp_gso_supported`],
//!   [`set_buffer_sizes`], [`enable_rxq_overflow`], [`steer_by_inner_flow`]
//!   (`SO_ATTACH_REUSEPORT_CBPF`);
//! - [`poll`] / [`poll_readable`] / [`poll_writable`]: `poll(2)` for callers
//!   without a runtime (or use `tokio::io::unix::AsyncFd` on a [`Tun`]).
//!
//! Every file descriptor made here is non-blocking and close-on-exec, and owned
//! (it is closed on drop).
//!
//! The netns gotcha: `TUNSETIFF` creates (or attaches to) a device in the
//! network namespace of the *thread* that opened `/dev/net/tun`. [`Tun::open`]
//! remembers that namespace and [`Tun::open_queue`] refuses to run on a thread
//! that is in another one (it would silently create a second device there).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::marker::PhantomData;
use std::mem::size_of;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::ptr;

use libc::{c_int, c_short, c_uint, c_ulong, c_void, socklen_t};

// ---------------------------------------------------------------------------
// Constants of the kernel ABI.

/// `TUNSETOFFLOAD`: the reader can take packets with partial checksums.
pub const TUN_F_CSUM: u32 = libc::TUN_F_CSUM;
/// `TUNSETOFFLOAD`: the reader can take TCPv4 super-packets (TSO).
pub const TUN_F_TSO4: u32 = libc::TUN_F_TSO4;
/// `TUNSETOFFLOAD`: the reader can take TCPv6 super-packets (TSO).
pub const TUN_F_TSO6: u32 = libc::TUN_F_TSO6;
/// `TUNSETOFFLOAD`: the reader can take UDPv4 super-packets (USO, Linux >= 6.2).
pub const TUN_F_USO4: u32 = libc::TUN_F_USO4;
/// `TUNSETOFFLOAD`: the reader can take UDPv6 super-packets (USO, Linux >= 6.2).
pub const TUN_F_USO6: u32 = libc::TUN_F_USO6;

/// Interface flag: a TUN (layer 3) device.
pub const IFF_TUN: u32 = libc::IFF_TUN as u32;
/// Interface flag: no 4-byte packet-information header before each packet.
pub const IFF_NO_PI: u32 = libc::IFF_NO_PI as u32;
/// Interface flag: every read/write starts with a `virtio_net_hdr`.
pub const IFF_VNET_HDR: u32 = libc::IFF_VNET_HDR as u32;
/// Interface flag: the device has several queues (one file each).
pub const IFF_MULTI_QUEUE: u32 = libc::IFF_MULTI_QUEUE as u32;

/// Size of the `virtio_net_hdr` in front of every packet with `IFF_VNET_HDR`
/// (the kernel's default; [`Tun::set_vnet_hdr_size`] can make it larger).
pub const VNET_HDR_LEN: usize = 10;
/// `virtio_net_hdr.flags`: the checksum at `csum_start + csum_offset` must
/// still be computed (it holds the pseudo-header sum).
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr.flags`: the checksum was already checked.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// `virtio_net_hdr.gso_type`: not a super-packet.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// `virtio_net_hdr.gso_type`: a TCPv4 super-packet (segment by `gso_size`).
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// `virtio_net_hdr.gso_type`: a TCPv6 super-packet.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// `virtio_net_hdr.gso_type`: a UDP super-packet split at layer 4 (USO).
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
/// `virtio_net_hdr.gso_type` bit: the TCP super-packet carries ECN (CWR).
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// Segments per `UDP_SEGMENT` send that every kernel with UDP GSO accepts
/// (64 before Linux 6.9, 128 since). A message with more fails `EINVAL`.
pub const UDP_MAX_SEGMENTS: usize = 64;

/// The most messages one `recvmmsg`/`sendmmsg` call takes (`UIO_MAXIOV`);
/// batch capacities are capped to it.
pub const MAX_BATCH: usize = 1024;

/// Longest interface name (`IFNAMSIZ` - 1).
const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

// ---------------------------------------------------------------------------
// Small helpers.

/// `Err(last OS error)` when a system call returned a negative value.
fn check(rc: c_int) -> io::Result<c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Converts a length for a C interface, refusing what does not fit.
fn to_c<T: TryFrom<usize>>(value: usize) -> io::Result<T> {
    T::try_from(value).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))
}

/// Sets an integer socket option.
fn setsockopt_int(fd: BorrowedFd<'_>, level: c_int, name: c_int, value: c_int) -> io::Result<()> {
    // SAFETY: `fd` is an open descriptor for the duration of the borrow; the
    // option value points at a live `c_int` whose exact size is passed, and
    // the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            ptr::from_ref(&value).cast::<c_void>(),
            INT_LEN,
        )
    };
    check(rc).map(drop)
}

/// Reads an integer socket option.
fn getsockopt_int(fd: BorrowedFd<'_>, level: c_int, name: c_int) -> io::Result<c_int> {
    let mut value: c_int = 0;
    let mut len = INT_LEN;
    // SAFETY: `fd` is open for the duration of the borrow; `value` and `len`
    // are live, writable locals and `len` tells the kernel the buffer's size,
    // so it writes at most `size_of::<c_int>()` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            ptr::from_mut(&mut value).cast::<c_void>(),
            &mut len,
        )
    };
    check(rc)?;
    Ok(value)
}

#[allow(clippy::cast_possible_truncation)] // 4 and 16 always fit a socklen_t.
const INT_LEN: socklen_t = size_of::<c_int>() as socklen_t;
#[allow(clippy::cast_possible_truncation)]
const SOCKADDR_IN_LEN: socklen_t = size_of::<libc::sockaddr_in>() as socklen_t;

#[allow(clippy::cast_possible_truncation)] // AF_INET is 2.
const AF_INET_FAMILY: libc::sa_family_t = libc::AF_INET as libc::sa_family_t;

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: AF_INET_FAMILY,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn zeroed_sockaddr_in() -> libc::sockaddr_in {
    sockaddr_in(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
}

/// An all-zero `mmsghdr` (null pointers, zero lengths).
fn zeroed_mmsghdr() -> libc::mmsghdr {
    // SAFETY: `mmsghdr` is a plain C struct of integers and raw pointers (and
    // padding on some libcs); all-zero bytes are a valid value of each field
    // (null pointers, zero lengths and flags).
    unsafe { std::mem::zeroed() }
}

fn empty_iovec() -> libc::iovec {
    libc::iovec {
        iov_base: ptr::null_mut(),
        iov_len: 0,
    }
}

/// The device's network namespace as (device, inode) of the thread's nsfs file.
fn thread_netns() -> io::Result<(u64, u64)> {
    let meta = std::fs::metadata("/proc/thread-self/ns/net")?;
    Ok((meta.dev(), meta.ino()))
}

// ---------------------------------------------------------------------------
// Control messages, encoded and decoded in safe code over aligned byte
// buffers following the kernel's `struct cmsghdr { size_t cmsg_len; int
// cmsg_level; int cmsg_type; }` layout and `CMSG_ALIGN` (to `sizeof(long)`).

const CMSG_ALIGN_TO: usize = size_of::<usize>();
const CMSG_LEVEL_AT: usize = size_of::<usize>();
const CMSG_TYPE_AT: usize = CMSG_LEVEL_AT + size_of::<c_int>();
const CMSG_HDR_LEN: usize = cmsg_align(CMSG_TYPE_AT + size_of::<c_int>());
const _: () = assert!(CMSG_HDR_LEN == size_of::<libc::cmsghdr>());

const fn cmsg_align(len: usize) -> usize {
    (len + CMSG_ALIGN_TO - 1) & !(CMSG_ALIGN_TO - 1)
}

/// Room for a message's control data: `UDP_GRO` and `SO_RXQ_OVFL` on
/// receive (24 bytes each on 64-bit), `UDP_SEGMENT` on send, with spare.
const CMSG_BUF_LEN: usize = 4 * cmsg_align(CMSG_HDR_LEN + size_of::<c_int>());

/// A control buffer aligned like a `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BUF_LEN]);

const _: () = assert!(std::mem::align_of::<CmsgBuf>() >= std::mem::align_of::<libc::cmsghdr>());

impl CmsgBuf {
    const ZERO: CmsgBuf = CmsgBuf([0; CMSG_BUF_LEN]);

    /// Writes one control message carrying `data`; returns the control length.
    fn put(&mut self, level: c_int, kind: c_int, data: &[u8]) -> usize {
        let len = CMSG_HDR_LEN + data.len();
        let buf = &mut self.0;
        buf[..CMSG_LEVEL_AT].copy_from_slice(&len.to_ne_bytes());
        buf[CMSG_LEVEL_AT..CMSG_TYPE_AT].copy_from_slice(&level.to_ne_bytes());
        buf[CMSG_TYPE_AT..CMSG_TYPE_AT + size_of::<c_int>()].copy_from_slice(&kind.to_ne_bytes());
        buf[CMSG_HDR_LEN..len].copy_from_slice(data);
        cmsg_align(len)
    }

    /// The data of the first control message `(level, kind)` among the first
    /// `controllen` bytes (as the kernel left them).
    fn find(&self, controllen: usize, level: c_int, kind: c_int) -> Option<&[u8]> {
        let buf = &self.0[..controllen.min(CMSG_BUF_LEN)];
        let mut at = 0;
        while at + CMSG_HDR_LEN <= buf.len() {
            let word = |from: usize, to: usize| &buf[at + from..at + to];
            let len = usize::from_ne_bytes(word(0, CMSG_LEVEL_AT).try_into().ok()?);
            let lvl = c_int::from_ne_bytes(word(CMSG_LEVEL_AT, CMSG_TYPE_AT).try_into().ok()?);
            let typ = c_int::from_ne_bytes(
                word(CMSG_TYPE_AT, CMSG_TYPE_AT + size_of::<c_int>())
                    .try_into()
                    .ok()?,
            );
            if len < CMSG_HDR_LEN || at + len > buf.len() {
                return None;
            }
            if lvl == level && typ == kind {
                return Some(&buf[at + CMSG_HDR_LEN..at + len]);
            }
            at += cmsg_align(len);
        }
        None
    }
}

/// Decodes a native-endian integer control payload of 2 or 4 bytes.
fn cmsg_uint(data: &[u8]) -> Option<u32> {
    match data.len() {
        2 => Some(u32::from(u16::from_ne_bytes([data[0], data[1]]))),
        4 => Some(u32::from_ne_bytes([data[0], data[1], data[2], data[3]])),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// TUN.

/// How to open a TUN device (always `IFF_TUN | IFF_NO_PI`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunOptions {
    /// `IFF_MULTI_QUEUE`: more queues can be attached with [`Tun::open_queue`].
    pub multi_queue: bool,
    /// `IFF_VNET_HDR`: every packet read or written starts with a
    /// `virtio_net_hdr` ([`VNET_HDR_LEN`] bytes unless changed); needed for
    /// offloads ([`Tun::set_offload`]).
    pub vnet_hdr: bool,
}

impl TunOptions {
    fn flags(self) -> u32 {
        let mut flags = IFF_TUN | IFF_NO_PI;
        if self.multi_queue {
            flags |= IFF_MULTI_QUEUE;
        }
        if self.vnet_hdr {
            flags |= IFF_VNET_HDR;
        }
        flags
    }
}

/// `struct ifreq` as far as the TUN ioctls use it: the name and the flags
/// (the first member of the 24-byte union).
#[repr(C, align(8))]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

const _: () = assert!(size_of::<IfReq>() == size_of::<libc::ifreq>());

impl IfReq {
    fn new(name: &str, flags: u32) -> io::Result<IfReq> {
        if name.len() > MAX_NAME_LEN || name.as_bytes().contains(&0) || name.contains('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "bad interface name {name:?} (at most {MAX_NAME_LEN} bytes, no NUL or '/')"
                ),
            ));
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let flags = c_short::try_from(flags)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "flags out of range"))?;
        req.data[..2].copy_from_slice(&flags.to_ne_bytes());
        Ok(req)
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }

    fn flags(&self) -> u32 {
        // The kernel's flags are a `short` holding bits; keep them as bits.
        u32::from(u16::from_ne_bytes([self.data[0], self.data[1]]))
    }
}

/// One queue of a TUN device (`IFF_TUN | IFF_NO_PI`), non-blocking.
///
/// The device lives while at least one queue is open (it is not persistent):
/// dropping the last `Tun` deletes the interface.
#[derive(Debug)]
pub struct Tun {
    file: File,
    name: String,
    opts: TunOptions,
    netns: (u64, u64),
}

impl Tun {
    /// Creates the device `name` (or attaches to it, if a multi-queue device
    /// of that name exists) in the calling thread's network namespace. `name`
    /// may be a template such as `flannel%d`; [`Tun::name`] is the kernel's
    /// choice. An empty name lets the kernel pick `tun%d`.
    pub fn open(name: &str, opts: TunOptions) -> io::Result<Tun> {
        let netns = thread_netns()?;
        Self::attach(name, opts, netns)
    }

    fn attach(name: &str, opts: TunOptions, netns: (u64, u64)) -> io::Result<Tun> {
        let mut req = IfReq::new(name, opts.flags())?;
        let file = open_clone_device()?;
        // SAFETY: `file` is an open `/dev/net/tun`; TUNSETIFF reads and then
        // writes back a `struct ifreq`, and `req` is a live, exclusively
        // borrowed buffer of exactly `sizeof(struct ifreq)` bytes (checked at
        // compile time) with a NUL-terminated name.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, ptr::from_mut(&mut req)) };
        check(rc)?;
        Ok(Tun {
            file,
            name: req.name(),
            opts,
            netns,
        })
    }

    /// The interface's name as the kernel made it (e.g. `flannel0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The options the device was opened with.
    pub fn options(&self) -> TunOptions {
        self.opts
    }

    /// Opens another queue of this multi-queue device. Must run on a thread in
    /// the namespace where the device was opened (else an error, as the
    /// kernel would create a new device in the thread's namespace). The queue
    /// shares the device's offloads and `virtio_net_hdr` size. At most 256
    /// queues per device.
    pub fn open_queue(&self) -> io::Result<Tun> {
        if !self.opts.multi_queue {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a multi-queue device", self.name),
            ));
        }
        if thread_netns()? != self.netns {
            return Err(io::Error::other(format!(
                "open_queue({}) on a thread in another network namespace: it would create a new device there",
                self.name
            )));
        }
        Self::attach(&self.name, self.opts, self.netns)
    }

    /// The device's interface flags (`TUNGETIFF`): [`IFF_TUN`], [`IFF_NO_PI`],
    /// [`IFF_MULTI_QUEUE`], [`IFF_VNET_HDR`], ...
    pub fn flags(&self) -> io::Result<u32> {
        let mut req = IfReq::new("", 0)?;
        // SAFETY: TUNGETIFF writes one `struct ifreq`; `req` is a live,
        // exclusively borrowed buffer of exactly that size.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNGETIFF,
                ptr::from_mut(&mut req),
            )
        };
        check(rc)?;
        Ok(req.flags())
    }

    /// `TUNSETOFFLOAD`: the offloads this reader accepts, a mix of
    /// [`TUN_F_CSUM`], [`TUN_F_TSO4`], [`TUN_F_TSO6`], [`TUN_F_USO4`],
    /// [`TUN_F_USO6`] (0 turns them off). Needs `IFF_VNET_HDR`. The kernel
    /// ignores TSO/USO without CSUM and fails `EINVAL` for bits it does not
    /// know (so probing USO is: try it, fall back to CSUM|TSO). Applies to
    /// the whole device (every queue).
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned
        // long); no memory is passed to the kernel.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                c_ulong::from(flags),
            )
        };
        check(rc).map(drop)
    }

    /// `TUNSETVNETHDRSZ`: the size of the `virtio_net_hdr` in front of each
    /// packet (at least 10; 12 is the `virtio_net_hdr_mrg_rxbuf` form).
    pub fn set_vnet_hdr_size(&self, size: i32) -> io::Result<()> {
        let size: c_int = size;
        // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which
        // points at a live local of that type.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETVNETHDRSZ,
                ptr::from_ref(&size),
            )
        };
        check(rc).map(drop)
    }

    /// Reads one packet (with its `virtio_net_hdr` first if `vnet_hdr`).
    /// `WouldBlock` when there is none. The buffer must hold the whole
    /// packet: the MTU (plus the header), or 64 KiB with TSO/USO offloads.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Reads one packet scattered over `bufs` (`readv`).
    pub fn read_vectored(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        (&self.file).read_vectored(bufs)
    }

    /// Writes one packet (with its `virtio_net_hdr` first if `vnet_hdr`).
    /// `WouldBlock` when the device's queue is full.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }

    /// Writes one packet gathered from `bufs` (`writev`), e.g. a separate
    /// `virtio_net_hdr` and the packet.
    pub fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&self.file).write_vectored(bufs)
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl From<Tun> for OwnedFd {
    fn from(tun: Tun) -> OwnedFd {
        tun.file.into()
    }
}

/// Opens `/dev/net/tun` non-blocking (std adds `O_CLOEXEC`).
fn open_clone_device() -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
}

/// `TUNGETFEATURES`: the interface flags this kernel's TUN driver supports
/// ([`IFF_MULTI_QUEUE`], [`IFF_VNET_HDR`], ...), without creating a device.
pub fn tun_features() -> io::Result<u32> {
    let file = open_clone_device()?;
    let mut features: c_uint = 0;
    // SAFETY: TUNGETFEATURES writes one `unsigned int` through the pointer,
    // which points at a live, exclusively borrowed local of that type.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNGETFEATURES,
            ptr::from_mut(&mut features),
        )
    };
    check(rc)?;
    Ok(features)
}

// ---------------------------------------------------------------------------
// poll(2).

/// One entry of a [`poll`] set: a borrowed descriptor and what to wait for.
#[repr(transparent)]
pub struct PollFd<'fd> {
    raw: libc::pollfd,
    _fd: PhantomData<BorrowedFd<'fd>>,
}

impl<'fd> PollFd<'fd> {
    /// Waits for `fd` to become readable and/or writable.
    pub fn new(fd: BorrowedFd<'fd>, readable: bool, writable: bool) -> PollFd<'fd> {
        let mut events = 0;
        if readable {
            events |= libc::POLLIN;
        }
        if writable {
            events |= libc::POLLOUT;
        }
        PollFd {
            raw: libc::pollfd {
                fd: fd.as_raw_fd(),
                events,
                revents: 0,
            },
            _fd: PhantomData,
        }
    }

    /// Waits for `fd` to become readable.
    pub fn readable(fd: BorrowedFd<'fd>) -> PollFd<'fd> {
        Self::new(fd, true, false)
    }

    /// After [`poll`]: a read would not block (data, or an error or hang-up
    /// that the read will report).
    pub fn is_readable(&self) -> bool {
        self.raw.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
    }

    /// After [`poll`]: a write would not block (or would report an error).
    pub fn is_writable(&self) -> bool {
        self.raw.revents & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
    }

    /// The raw `revents` of the last [`poll`].
    pub fn revents(&self) -> i16 {
        self.raw.revents
    }
}

impl fmt::Debug for PollFd<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PollFd")
            .field("fd", &self.raw.fd)
            .field("events", &self.raw.events)
            .field("revents", &self.raw.revents)
            .finish()
    }
}

/// `poll(2)`: waits up to `timeout_ms` (-1: forever, 0: not at all) until one
/// of `fds` is ready; returns how many are (0 on timeout or on a signal).
pub fn poll(fds: &mut [PollFd<'_>], timeout_ms: i32) -> io::Result<usize> {
    for fd in fds.iter_mut() {
        fd.raw.revents = 0;
    }
    let nfds: libc::nfds_t = to_c(fds.len())?;
    // SAFETY: `PollFd` is `repr(transparent)` over `libc::pollfd`, so the
    // slice is an array of `nfds` pollfds that the kernel may write
    // (`revents`) through the exclusive borrow; the descriptors are borrowed
    // for the slice's lifetime, so they are open.
    let rc = unsafe { libc::poll(fds.as_mut_ptr().cast::<libc::pollfd>(), nfds, timeout_ms) };
    match check(rc) {
        Ok(ready) => Ok(usize::try_from(ready).unwrap_or(0)),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
        Err(e) => Err(e),
    }
}

/// Waits up to `timeout_ms` until one of `fds` is readable; element `i` of the
/// answer says whether `fds[i]` is (all false on timeout). Allocates: for
/// hot loops keep a `[PollFd]` and call [`poll`].
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut set: Vec<PollFd<'_>> = fds.iter().map(|fd| PollFd::readable(*fd)).collect();
    poll(&mut set, timeout_ms)?;
    Ok(set.iter().map(PollFd::is_readable).collect())
}

/// Waits up to `timeout_ms` until `fd` is writable (or has an error that a
/// write will report); `false` on timeout.
pub fn poll_writable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut set = [PollFd::new(fd, false, true)];
    poll(&mut set, timeout_ms)?;
    Ok(set[0].is_writable())
}

// ---------------------------------------------------------------------------
// UDP socket set-up.

/// A non-blocking, close-on-exec IPv4 UDP socket bound to `bind`, with
/// `SO_REUSEPORT` set first when asked (one socket per worker on one port).
pub fn udp_socket(bind: SocketAddrV4, reuse_port: bool) -> io::Result<UdpSocket> {
    // SAFETY: plain system call with integer arguments.
    let raw = check(unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: `raw` was just returned by socket(2), is open and owned by no
    // one else; the OwnedFd takes sole ownership and closes it on drop.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if reuse_port {
        setsockopt_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    }
    let addr = sockaddr_in(bind);
    // SAFETY: `fd` is open; the address points at a live `sockaddr_in` and
    // the length passed is its exact size; the kernel only reads it.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            ptr::from_ref(&addr).cast::<libc::sockaddr>(),
            SOCKADDR_IN_LEN,
        )
    };
    check(rc)?;
    Ok(UdpSocket::from(fd))
}

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h; the libc crate has it
/// for Android only).
const SO_ATTACH_REUSEPORT_CBPF: c_int = 51;

/// One classic BPF instruction without jumps.
fn bpf(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        // Every opcode is an 8-bit or-combination of the BPF_* classes.
        code: u16::try_from(code).unwrap_or(u16::MAX),
        jt: 0,
        jf: 0,
        k,
    }
}

/// The classic BPF program [`steer_by_inner_flow`] attaches: it sees the
/// UDP payload (the inner IPv4 packet) and returns
/// `(h ^ (h >> 16)) % sockets` for `h = src ^ dst ^ ports`, the inner
/// addresses and the 4 bytes after the inner header (TCP/UDP ports). A
/// packet too short for a load returns 0 (the kernel's rule for a load out of
/// bounds); an index past the group makes the kernel hash as usual.
fn inner_flow_program(sockets: u32) -> Vec<libc::sock_filter> {
    use libc::{
        BPF_A, BPF_ABS, BPF_ALU, BPF_B, BPF_IND, BPF_K, BPF_LD, BPF_LDX, BPF_MISC, BPF_MOD,
        BPF_MSH, BPF_RET, BPF_RSH, BPF_TAX, BPF_W, BPF_X, BPF_XOR,
    };
    vec![
        // X = inner IPv4 header length; A = the 4 bytes after it.
        bpf(BPF_LDX | BPF_B | BPF_MSH, 0),
        bpf(BPF_LD | BPF_W | BPF_IND, 0),
        bpf(BPF_MISC | BPF_TAX, 0),
        // A = ports ^ src ^ dst.
        bpf(BPF_LD | BPF_W | BPF_ABS, 12),
        bpf(BPF_ALU | BPF_XOR | BPF_X, 0),
        bpf(BPF_MISC | BPF_TAX, 0),
        bpf(BPF_LD | BPF_W | BPF_ABS, 16),
        bpf(BPF_ALU | BPF_XOR | BPF_X, 0),
        // Fold the high half in (the ports differ there), then pick.
        bpf(BPF_MISC | BPF_TAX, 0),
        bpf(BPF_ALU | BPF_RSH | BPF_K, 16),
        bpf(BPF_ALU | BPF_XOR | BPF_X, 0),
        bpf(BPF_ALU | BPF_MOD | BPF_K, sockets.max(1)),
        bpf(BPF_RET | BPF_A, 0),
    ]
}

/// Spreads the datagrams arriving at the `SO_REUSEPORT` group of `sock` (the
/// workers' sockets, numbered in the order they were bound) over `sockets`
/// of them by the inner flow each carries, so that one flow always reaches
/// the same worker and different flows spread: a classic BPF program over
/// the UDP payload (the inner IPv4 packet) returns `(h ^ (h >> 16)) %
/// sockets` for `h` = inner source ^ inner destination ^ the 4 bytes after
/// the inner header (TCP/UDP ports); a packet too short for a load goes to
/// socket 0.
/// Without it the kernel hashes the outer addresses and ports, which are the
/// same for all traffic between two nodes (flannel's one port): one socket,
/// one worker, would receive everything a node gets.
pub fn steer_by_inner_flow(sock: &UdpSocket, sockets: u32) -> io::Result<()> {
    let mut program = inner_flow_program(sockets);
    let fprog = libc::sock_fprog {
        len: to_c(program.len())?,
        filter: program.as_mut_ptr(),
    };
    let len: libc::socklen_t = to_c(std::mem::size_of::<libc::sock_fprog>())?;
    // SAFETY: `fprog` points at `program`, a live array of exactly `len`
    // instructions that outlives the call; the kernel copies the program
    // during the call and keeps no pointer into our memory.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            ptr::from_ref(&fprog).cast::<c_void>(),
            len,
        )
    };
    check(rc).map(drop)
}

/// Turns on `UDP_GRO`: the kernel may hand over several datagrams of one flow
/// as one message, cut at [`RecvBatch::gro_segment`] bytes (the last one may
/// be shorter). Receive buffers must then be 64 KiB, or coalesced messages
/// are truncated. `ENOPROTOOPT` on kernels before 5.0.
pub fn enable_udp_gro(sock: &UdpSocket) -> io::Result<()> {
    setsockopt_int(sock.as_fd(), libc::SOL_UDP, libc::UDP_GRO, 1)
}

/// Whether the kernel takes `UDP_SEGMENT` (GSO) on this socket (Linux >= 4.18).
/// A send may still fail `EIO` if the route's device cannot checksum: then
/// send without a segment size.
pub fn udp_gso_supported(sock: &UdpSocket) -> bool {
    getsockopt_int(sock.as_fd(), libc::SOL_UDP, libc::UDP_SEGMENT).is_ok()
}

/// Turns on `SO_RXQ_OVFL`: received messages carry the socket's count of
/// datagrams dropped for lack of buffer space ([`RecvBatch::rxq_dropped`]).
pub fn enable_rxq_overflow(sock: &UdpSocket) -> io::Result<()> {
    setsockopt_int(sock.as_fd(), libc::SOL_SOCKET, libc::SO_RXQ_OVFL, 1)
}

/// Sets the receive and send buffer sizes in bytes (0 leaves one as is).
/// Tries `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` first (they pass
/// `net.core.rmem_max`/`wmem_max` with `CAP_NET_ADMIN`) and falls back to the
/// capped `SO_RCVBUF`/`SO_SNDBUF`. The kernel doubles the value for its
/// bookkeeping; see [`buffer_sizes`].
pub fn set_buffer_sizes(sock: &UdpSocket, rcv: usize, snd: usize) -> io::Result<()> {
    let fd = sock.as_fd();
    for (size, forced, plain) in [
        (rcv, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (snd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if size == 0 {
            continue;
        }
        let size = c_int::try_from(size).unwrap_or(c_int::MAX);
        if setsockopt_int(fd, libc::SOL_SOCKET, forced, size).is_err() {
            setsockopt_int(fd, libc::SOL_SOCKET, plain, size)?;
        }
    }
    Ok(())
}

/// The socket's receive and send buffer sizes as the kernel reports them
/// (`SO_RCVBUF`, `SO_SNDBUF`: twice what was set).
pub fn buffer_sizes(sock: &UdpSocket) -> io::Result<(usize, usize)> {
    let fd = sock.as_fd();
    let rcv = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF)?;
    let snd = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF)?;
    Ok((
        usize::try_from(rcv).unwrap_or(0),
        usize::try_from(snd).unwrap_or(0),
    ))
}

// ---------------------------------------------------------------------------
// Batched receive.

fn clamp_capacity(capacity: usize) -> usize {
    capacity.clamp(1, MAX_BATCH)
}

/// State for `recvmmsg(2)`: headers, `iovec`s, source addresses and control
/// buffers for up to [`RecvBatch::capacity`] datagrams, allocated once.
///
/// After [`RecvBatch::recv`] returned `n`, message `i < n` was received into
/// `bufs[i]`, and `len(i)`, `source(i)`, `gro_segment(i)`, `truncated(i)` and
/// `rxq_dropped(i)` describe it (they panic for `i >= n`).
pub struct RecvBatch {
    hdrs: Box<[libc::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    addrs: Box<[libc::sockaddr_in]>,
    cmsgs: Box<[CmsgBuf]>,
    received: usize,
}

// SAFETY: the raw pointers inside the headers and `iovec`s point only into
// this batch's own boxed arrays (which move with it) or into the caller's
// buffers during a `recv` call; they are rewritten before every system call
// and never dereferenced by Rust code, so moving the batch to another thread
// cannot create shared access.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// A batch for up to `capacity` datagrams per call (1..=[`MAX_BATCH`]).
    pub fn new(capacity: usize) -> RecvBatch {
        let n = clamp_capacity(capacity);
        RecvBatch {
            hdrs: (0..n).map(|_| zeroed_mmsghdr()).collect(),
            iovs: (0..n).map(|_| empty_iovec()).collect(),
            addrs: (0..n).map(|_| zeroed_sockaddr_in()).collect(),
            cmsgs: vec![CmsgBuf::ZERO; n].into_boxed_slice(),
            received: 0,
        }
    }

    /// The most datagrams one [`RecvBatch::recv`] takes.
    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Receives up to `min(bufs.len(), capacity)` queued datagrams, one per
    /// buffer, with one `recvmmsg(MSG_DONTWAIT)`; returns how many (>= 1).
    /// `WouldBlock` when none is queued. Nothing is allocated or copied: the
    /// kernel writes straight into `bufs`.
    pub fn recv<B: AsMut<[u8]>>(&mut self, sock: &UdpSocket, bufs: &mut [B]) -> io::Result<usize> {
        self.received = 0;
        let mut n = 0;
        for ((((hdr, iov), addr), cmsg), buf) in self
            .hdrs
            .iter_mut()
            .zip(self.iovs.iter_mut())
            .zip(self.addrs.iter_mut())
            .zip(self.cmsgs.iter_mut())
            .zip(bufs.iter_mut())
        {
            let buf = buf.as_mut();
            *iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast::<c_void>(),
                iov_len: buf.len(),
            };
            hdr.msg_len = 0;
            let msg = &mut hdr.msg_hdr;
            msg.msg_name = ptr::from_mut(addr).cast::<c_void>();
            msg.msg_namelen = SOCKADDR_IN_LEN;
            msg.msg_iov = ptr::from_mut(iov);
            msg.msg_iovlen = 1;
            msg.msg_control = cmsg.0.as_mut_ptr().cast::<c_void>();
            msg.msg_controllen = CMSG_BUF_LEN as _;
            msg.msg_flags = 0;
            n += 1;
        }
        if n == 0 {
            return Ok(0);
        }
        let vlen: c_uint = to_c(n)?;
        // SAFETY: the first `n` headers are initialised above: each points at
        // its own `iovec`, `sockaddr_in` and control buffer (elements of this
        // batch's boxed arrays, not otherwise borrowed until the call
        // returns) with their true sizes, and each `iovec` covers exactly one
        // caller buffer, exclusively borrowed for this call. The kernel
        // writes only within those bounds. The timeout pointer may be null.
        let rc = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                vlen,
                libc::MSG_DONTWAIT,
                ptr::null_mut(),
            )
        };
        let got = usize::try_from(check(rc)?).unwrap_or(0);
        self.received = got.min(n);
        Ok(self.received)
    }

    /// How many datagrams the last [`RecvBatch::recv`] received.
    pub fn received(&self) -> usize {
        self.received
    }

    fn hdr(&self, i: usize) -> &libc::mmsghdr {
        &self.hdrs[..self.received][i]
    }

    /// Bytes of datagram `i` in its buffer (a GRO message: all its segments).
    pub fn len(&self, i: usize) -> usize {
        self.hdr(i).msg_len as usize
    }

    /// The sender of datagram `i` (`None` if it is not IPv4).
    pub fn source(&self, i: usize) -> Option<SocketAddrV4> {
        let hdr = self.hdr(i);
        let addr = &self.addrs[i];
        if hdr.msg_hdr.msg_namelen < SOCKADDR_IN_LEN
            || c_int::from(addr.sin_family) != libc::AF_INET
        {
            return None;
        }
        Some(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
            u16::from_be(addr.sin_port),
        ))
    }

    /// With [`enable_udp_gro`]: the segment size if message `i` is several
    /// coalesced datagrams (each `gro_segment` bytes, the last may be
    /// shorter); `None` for a single datagram.
    pub fn gro_segment(&self, i: usize) -> Option<u16> {
        let controllen = control_len(self.hdr(i));
        self.cmsgs[i]
            .find(controllen, libc::SOL_UDP, libc::UDP_GRO)
            .and_then(cmsg_uint)
            .and_then(|size| u16::try_from(size).ok())
    }

    /// Whether datagram `i` was longer than its buffer and cut (`MSG_TRUNC`).
    pub fn truncated(&self, i: usize) -> bool {
        self.hdr(i).msg_hdr.msg_flags & libc::MSG_TRUNC != 0
    }

    /// Whether the control data of message `i` did not fit (`MSG_CTRUNC`).
    pub fn control_truncated(&self, i: usize) -> bool {
        self.hdr(i).msg_hdr.msg_flags & libc::MSG_CTRUNC != 0
    }

    /// With [`enable_rxq_overflow`]: the socket's running count of dropped
    /// datagrams when message `i` was queued (the kernel sends it only once
    /// it is non-zero).
    pub fn rxq_dropped(&self, i: usize) -> Option<u32> {
        let controllen = control_len(self.hdr(i));
        self.cmsgs[i]
            .find(controllen, libc::SOL_SOCKET, libc::SO_RXQ_OVFL)
            .and_then(cmsg_uint)
    }
}

/// The control length the kernel left in a header (`size_t` in glibc,
/// `socklen_t` in musl).
#[allow(clippy::unnecessary_cast)]
fn control_len(hdr: &libc::mmsghdr) -> usize {
    hdr.msg_hdr.msg_controllen as usize
}

impl fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvBatch")
            .field("capacity", &self.capacity())
            .field("received", &self.received)
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Batched send.

/// One datagram (or GSO train) for [`SendBatch`]: payload, destination, and
/// an optional `UDP_SEGMENT` size.
pub type SendMsg<'a> = (&'a [u8], SocketAddrV4, Option<u16>);

/// The most slices one message of a [`SendBatch`] may have (`UIO_MAXIOV`).
pub const MAX_PARTS: usize = 1024;

/// State for `sendmmsg(2)`: headers, `iovec`s (up to
/// [`SendBatch::max_parts`] per message), destination addresses and control
/// buffers for up to [`SendBatch::capacity`] messages, allocated once.
pub struct SendBatch {
    hdrs: Box<[libc::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    max_parts: usize,
    addrs: Box<[libc::sockaddr_in]>,
    cmsgs: Box<[CmsgBuf]>,
}

// SAFETY: as for `RecvBatch`: the pointers inside point into this batch's
// own boxed arrays or, during a `send` call only, into the caller's borrowed
// payloads; they are rewritten before every system call and never
// dereferenced by Rust code.
unsafe impl Send for SendBatch {}

impl SendBatch {
    /// A batch for up to `capacity` messages per call (1..=[`MAX_BATCH`]),
    /// each from one slice.
    pub fn new(capacity: usize) -> SendBatch {
        SendBatch::with_parts(capacity, 1)
    }

    /// A batch for up to `capacity` messages per call (1..=[`MAX_BATCH`]),
    /// each gathered from up to `max_parts` slices (1..=[`MAX_PARTS`]).
    pub fn with_parts(capacity: usize, max_parts: usize) -> SendBatch {
        let n = clamp_capacity(capacity);
        let max_parts = max_parts.clamp(1, MAX_PARTS);
        SendBatch {
            hdrs: (0..n).map(|_| zeroed_mmsghdr()).collect(),
            iovs: (0..n * max_parts).map(|_| empty_iovec()).collect(),
            max_parts,
            addrs: (0..n).map(|_| zeroed_sockaddr_in()).collect(),
            cmsgs: vec![CmsgBuf::ZERO; n].into_boxed_slice(),
        }
    }

    /// The most messages one call sends.
    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// The most slices one message may be gathered from.
    pub fn max_parts(&self) -> usize {
        self.max_parts
    }

    /// Sends `msgs` (at most [`SendBatch::capacity`] of them) with one
    /// `sendmmsg(MSG_DONTWAIT)`; see [`SendBatch::send_from`].
    pub fn send(&mut self, sock: &UdpSocket, msgs: &[SendMsg<'_>]) -> io::Result<usize> {
        self.send_from(sock, msgs.iter().copied())
    }

    /// Sends the first [`SendBatch::capacity`] messages of `msgs` with one
    /// `sendmmsg(MSG_DONTWAIT)`, without allocating or copying payloads.
    ///
    /// A message `(payload, to, Some(size))` is a GSO train: the kernel cuts
    /// the payload into datagrams of `size` bytes (the last may be shorter),
    /// at most [`UDP_MAX_SEGMENTS`] and 65507 bytes in all; check
    /// [`udp_gso_supported`] first.
    ///
    /// Returns how many messages, from the first, the kernel took. That can be
    /// fewer than given (partial send): the socket buffer filled, or message
    /// `n` failed. Retry from message `n`: an error then comes back as `Err`
    /// for it. `Err` means message 0 was not sent: `WouldBlock` (buffer full:
    /// wait for writable) or an error that belongs to that message (e.g.
    /// `EMSGSIZE`, `EINVAL` for a bad segment size, `EIO` for GSO over a
    /// device without checksum offload), which the caller drops or resends
    /// without GSO.
    pub fn send_from<'a, I>(&mut self, sock: &UdpSocket, msgs: I) -> io::Result<usize>
    where
        I: IntoIterator<Item = SendMsg<'a>>,
    {
        self.send_parts(
            sock,
            msgs.into_iter()
                .map(|(payload, to, segment)| (std::iter::once(payload), to, segment)),
        )
    }

    /// [`SendBatch::send_from`] for messages gathered from several slices
    /// each (one `iovec` per slice, nothing copied): a message's datagram,
    /// or GSO train, is its slices one after the other. A message with more
    /// than [`SendBatch::max_parts`] slices is not sent, nor any after it;
    /// if it is the first, the result is an `InvalidInput` error.
    pub fn send_parts<'a, I, P>(&mut self, sock: &UdpSocket, msgs: I) -> io::Result<usize>
    where
        I: IntoIterator<Item = (P, SocketAddrV4, Option<u16>)>,
        P: IntoIterator<Item = &'a [u8]>,
    {
        let mut n = 0;
        let mut too_many_parts = false;
        for ((((hdr, iovs), addr), cmsg), (parts, to, segment)) in self
            .hdrs
            .iter_mut()
            .zip(self.iovs.chunks_exact_mut(self.max_parts))
            .zip(self.addrs.iter_mut())
            .zip(self.cmsgs.iter_mut())
            .zip(msgs)
        {
            let mut used = 0;
            for part in parts {
                let Some(iov) = iovs.get_mut(used) else {
                    too_many_parts = true;
                    break;
                };
                *iov = libc::iovec {
                    iov_base: part.as_ptr().cast_mut().cast::<c_void>(),
                    iov_len: part.len(),
                };
                used += 1;
            }
            if too_many_parts {
                break;
            }
            *addr = sockaddr_in(to);
            hdr.msg_len = 0;
            let msg = &mut hdr.msg_hdr;
            msg.msg_name = ptr::from_mut(addr).cast::<c_void>();
            msg.msg_namelen = SOCKADDR_IN_LEN;
            msg.msg_iov = iovs.as_mut_ptr();
            msg.msg_iovlen = used as _;
            msg.msg_flags = 0;
            match segment {
                Some(size) => {
                    let len = cmsg.put(libc::SOL_UDP, libc::UDP_SEGMENT, &size.to_ne_bytes());
                    msg.msg_control = cmsg.0.as_mut_ptr().cast::<c_void>();
                    msg.msg_controllen = len as _;
                }
                None => {
                    msg.msg_control = ptr::null_mut();
                    msg.msg_controllen = 0;
                }
            }
            n += 1;
        }
        if n == 0 {
            if too_many_parts {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a message has more than {} parts", self.max_parts),
                ));
            }
            return Ok(0);
        }
        let vlen: c_uint = to_c(n)?;
        // SAFETY: the first `n` headers are initialised above: each points at
        // its own run of `iovec`s (`msg_iovlen` of them, all initialised),
        // `sockaddr_in` and (optional) control buffer, elements of this
        // batch's boxed arrays with their true lengths, and each `iovec`
        // covers one payload slice borrowed for `'a`, which outlives this
        // call. The kernel only reads those and writes each header's
        // `msg_len`.
        let rc = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                vlen,
                libc::MSG_DONTWAIT,
            )
        };
        let sent = usize::try_from(check(rc)?).unwrap_or(0);
        Ok(sent.min(n))
    }
}

impl fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendBatch")
            .field("capacity", &self.capacity())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_round_trip() {
        let mut buf = CmsgBuf::ZERO;
        let len = buf.put(libc::SOL_UDP, libc::UDP_SEGMENT, &1200u16.to_ne_bytes());
        assert_eq!(len, cmsg_align(CMSG_HDR_LEN + 2));
        // The kernel insists on cmsg_len == CMSG_LEN(sizeof(u16)).
        assert_eq!(
            usize::from_ne_bytes(buf.0[..CMSG_LEVEL_AT].try_into().unwrap()),
            CMSG_HDR_LEN + 2
        );
        let data = buf.find(len, libc::SOL_UDP, libc::UDP_SEGMENT).unwrap();
        assert_eq!(cmsg_uint(data), Some(1200));
        assert!(buf.find(len, libc::SOL_UDP, libc::UDP_GRO).is_none());
        assert!(buf.find(0, libc::SOL_UDP, libc::UDP_SEGMENT).is_none());
    }

    #[test]
    fn control_parser_walks_several_and_rejects_garbage() {
        let mut buf = CmsgBuf::ZERO;
        let first = {
            let mut one = CmsgBuf::ZERO;
            let len = one.put(libc::SOL_SOCKET, libc::SO_RXQ_OVFL, &7u32.to_ne_bytes());
            buf.0[..len].copy_from_slice(&one.0[..len]);
            len
        };
        let mut two = CmsgBuf::ZERO;
        let len2 = two.put(libc::SOL_UDP, libc::UDP_GRO, &1400i32.to_ne_bytes());
        buf.0[first..first + len2].copy_from_slice(&two.0[..len2]);
        let total = first + len2;
        assert_eq!(
            buf.find(total, libc::SOL_UDP, libc::UDP_GRO)
                .and_then(cmsg_uint),
            Some(1400)
        );
        assert_eq!(
            buf.find(total, libc::SOL_SOCKET, libc::SO_RXQ_OVFL)
                .and_then(cmsg_uint),
            Some(7)
        );
        // A cmsg_len pointing past the end, or shorter than a header.
        let mut bad = buf;
        bad.0[..CMSG_LEVEL_AT].copy_from_slice(&(CMSG_BUF_LEN + 1).to_ne_bytes());
        assert!(bad.find(total, libc::SOL_UDP, libc::UDP_GRO).is_none());
        bad.0[..CMSG_LEVEL_AT].copy_from_slice(&3usize.to_ne_bytes());
        assert!(bad.find(total, libc::SOL_UDP, libc::UDP_GRO).is_none());
        // Lengths beyond the buffer are clamped, never a panic.
        assert!(buf.find(usize::MAX, libc::SOL_IP, 1).is_none());
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(IfReq::new("flannel0", IFF_TUN | IFF_NO_PI).is_ok());
        assert!(IfReq::new("a-name-of-16-chr", 0).is_err());
        assert!(IfReq::new("bad\0name", 0).is_err());
        assert!(IfReq::new("bad/name", 0).is_err());
        let req = IfReq::new("flannel%d", IFF_TUN | IFF_NO_PI | IFF_VNET_HDR).unwrap();
        assert_eq!(req.name(), "flannel%d");
        assert_eq!(req.flags(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR);
    }

    #[test]
    fn capacities_are_clamped() {
        assert_eq!(RecvBatch::new(0).capacity(), 1);
        assert_eq!(SendBatch::new(100_000).capacity(), MAX_BATCH);
    }
}
