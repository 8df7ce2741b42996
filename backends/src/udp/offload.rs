//! TUN offloads for the `udp` backend: pure, no I/O, no allocation per packet.
//!
//! With `IFF_VNET_HDR` and `TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4)` (and
//! optionally `TUN_F_USO4`) the kernel hands the TUN reader TCP (UDP)
//! super-packets of up to 64 KiB with a `virtio_net_hdr` in front, and
//! accepts super-packets on write. The wire between nodes still carries one
//! plain IPv4 packet per UDP datagram (flannel's format), so:
//!
//! - **TUN -> network** ([`from_tun`], [`split_for_gso`]): a super-packet is
//!   cut into wire-ready IPv4 packets, each with its own IPv4 header (total
//!   length, ID + i, header checksum) and TCP header (sequence number
//!   advanced, FIN/PSH only on the last segment, CWR only on the first) or
//!   UDP header (length), and a complete L4 checksum. The segments are
//!   written back to back, every one but the last exactly
//!   [`GsoSplit::segment`] bytes long, so one `sendmsg` with `UDP_SEGMENT`
//!   carries them all to the peer ([`GsoSplit::batches`] cuts that into what
//!   one send may carry). A plain packet only gets its checksum completed
//!   when the header says `NEEDS_CSUM`, in place.
//! - **network -> TUN** ([`Coalescer`]): consecutive TCP segments of one
//!   flow (e.g. the datagrams of one UDP GRO message) are merged back into
//!   one super-packet behind a `virtio_net_hdr` with `gso_type` TCPV4, which
//!   the kernel takes in one `write` and re-segments (or delivers whole to a
//!   local socket) as it would a packet from its own GRO.
//!
//! What the TUN driver accepts on write (`tun_get_user` ->
//! `virtio_net_hdr_to_skb`; the kernel test `backends/tests/udp_offload.rs`
//! checks the first two on Linux 6.18): `gso_type` TCPV4 with `gso_size` > 0,
//! and either
//!
//! - `NEEDS_CSUM` with `csum_start` = IPv4 header length and `csum_offset` =
//!   16, the TCP checksum field holding the pseudo-header sum of the whole
//!   super-packet (not complemented): the skb becomes `CHECKSUM_PARTIAL` and
//!   nothing is verified. This is what the [`Coalescer`] writes, so it
//!   verifies every segment's TCP checksum itself before merging it (a bad
//!   one is passed on alone, for the kernel to drop);
//! - or no flag, with the full TCP checksum of the super-packet in the field
//!   (the kernel probes the transport header and verifies the sum).
//!
//! `DATA_VALID` is ignored on write: with it and only the pseudo-header sum,
//! the write succeeds but TCP drops every segment as a bad checksum.
//! Offloads: `TUN_F_TSO4` is ignored without `TUN_F_CSUM`, and the kernel
//! refuses (`EINVAL`) `TUN_F_USO4` without `TUN_F_USO6`.
//!
//! The `virtio_net_hdr` fields are in native byte order: the TUN default
//! (no `TUNSETVNETLE`/`TUNSETVNETBE`), little endian on every host we run.

use std::ops::Range;

use super::packet::{self, DropReason, MIN_HEADER_LEN};
use super::sys::{
    UDP_MAX_SEGMENTS, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_UDP_L4, VNET_HDR_LEN,
};

/// The largest IPv4 packet (the total length field is 16 bits).
pub const MAX_PACKET: usize = 65535;
/// The largest UDP payload one IPv4 datagram (or one `UDP_SEGMENT` send)
/// carries: 65535 - 20 (IPv4) - 8 (UDP).
pub const MAX_UDP_PAYLOAD: usize = 65507;
/// Room a reader needs for one TUN read with TSO/USO: header + 64 KiB.
pub const TUN_READ_BUFFER: usize = VNET_HDR_LEN + MAX_PACKET;
/// An output buffer for [`split_for_gso`] that holds every super-packet
/// whose `gso_size` is at least its header length (IPv4 + TCP/UDP), which
/// every real MSS is: the copied headers then add less than the payload.
/// A smaller `gso_size` can need more (up to ~4 MiB for `gso_size` 1), and
/// is [`DropReason::Oversize`] with this buffer.
pub const SPLIT_BUFFER: usize = 2 * MAX_PACKET;
/// A `virtio_net_hdr` saying "a plain packet, checksum complete".
pub const VNET_HDR_NONE: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

const TCP_MIN_HEADER_LEN: usize = 20;
const UDP_HEADER_LEN: usize = 8;
const TCP_CHECKSUM_OFF: usize = 16;
const UDP_CHECKSUM_OFF: usize = 6;

const IP_TOS: usize = 1;
const IP_TOTAL_LEN: usize = 2;
const IP_ID: usize = 4;
const IP_FRAG: usize = 6;
const IP_TTL: usize = 8;
const IP_CHECKSUM: usize = 10;
const IP_ADDRS: Range<usize> = 12..20;
/// MF and the fragment offset, in the flags/fragment word.
const IP_MF_OFFSET: u16 = 0x3fff;
/// DF, in the first byte of the flags/fragment word.
const IP_DF_BYTE: u8 = 0x40;

const TCP_SEQ: usize = 4;
const TCP_DATA_OFF: usize = 12;
const TCP_FLAGS: usize = 13;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_URG: u8 = 0x20;
const TCP_CWR: u8 = 0x80;
const UDP_LEN: usize = 4;

// ---------------------------------------------------------------------------
// The virtio-net header.

/// A `struct virtio_net_hdr` (the 10-byte form), decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `VIRTIO_NET_HDR_F_NEEDS_CSUM` and/or `VIRTIO_NET_HDR_F_DATA_VALID`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`, possibly with `VIRTIO_NET_HDR_GSO_ECN`.
    pub gso_type: u8,
    /// Length of the headers (a hint only: the kernel sets the linear length).
    pub hdr_len: u16,
    /// Payload bytes per segment (TCP MSS, or UDP payload per datagram).
    pub gso_size: u16,
    /// Where checksumming starts (the L4 header), with `NEEDS_CSUM`.
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start`, with `NEEDS_CSUM`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Decodes the first [`VNET_HDR_LEN`] bytes of `buf` (`None` if shorter).
    pub fn parse(buf: &[u8]) -> Option<VnetHdr> {
        let h = buf.first_chunk::<VNET_HDR_LEN>()?;
        let word = |i: usize| u16::from_ne_bytes([h[i], h[i + 1]]);
        Some(VnetHdr {
            flags: h[0],
            gso_type: h[1],
            hdr_len: word(2),
            gso_size: word(4),
            csum_start: word(6),
            csum_offset: word(8),
        })
    }

    /// Encodes the header (native byte order, the TUN default).
    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut h = [0u8; VNET_HDR_LEN];
        h[0] = self.flags;
        h[1] = self.gso_type;
        h[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        h[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        h[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        h[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        h
    }

    /// Whether the checksum at `csum_start + csum_offset` is still to be done.
    pub fn needs_csum(&self) -> bool {
        self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
    }
}

// ---------------------------------------------------------------------------
// TUN -> network.

/// Where [`split_for_gso`] left the segments of one packet in its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GsoSplit {
    /// Bytes written, from the start of the output buffer.
    pub len: usize,
    /// Length of every segment but the last (which may be shorter); equal to
    /// `len` when there is one segment.
    pub segment: usize,
    /// Number of segments (at least 1).
    pub count: usize,
}

impl GsoSplit {
    /// Cuts the segments into sends that one `sendmsg` with `UDP_SEGMENT`
    /// takes: at most `max_segments` (clamped to 1..=[`UDP_MAX_SEGMENTS`])
    /// segments and [`MAX_UDP_PAYLOAD`] bytes each. Yields the byte range
    /// in the output buffer and the segment size to pass (`None` when that
    /// send holds a single datagram, which needs no GSO).
    pub fn batches(&self, max_segments: usize) -> GsoBatches {
        let max_segments = max_segments.clamp(1, UDP_MAX_SEGMENTS);
        let per_send = (MAX_UDP_PAYLOAD / self.segment.max(1)).clamp(1, max_segments);
        GsoBatches {
            next: 0,
            len: self.len,
            segment: self.segment.max(1),
            step: per_send * self.segment.max(1),
        }
    }
}

/// The sends of one [`GsoSplit`]; see [`GsoSplit::batches`].
#[derive(Debug, Clone)]
pub struct GsoBatches {
    next: usize,
    len: usize,
    segment: usize,
    step: usize,
}

impl Iterator for GsoBatches {
    type Item = (Range<usize>, Option<u16>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.len {
            return None;
        }
        let start = self.next;
        let end = start.saturating_add(self.step).min(self.len);
        self.next = end;
        let gso = if end - start > self.segment {
            u16::try_from(self.segment).ok()
        } else {
            None
        };
        Some((start..end, gso))
    }
}

/// What to send for one TUN read, as [`from_tun`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunPacket {
    /// One plain packet, at this range of the read buffer (checksum done in
    /// place): send it from there.
    InPlace(Range<usize>),
    /// A super-packet, split into the output buffer.
    Split(GsoSplit),
}

/// Handles one TUN read `buf` (`virtio_net_hdr` + IPv4 packet): a plain
/// packet has its checksum completed in place and is returned as a range
/// of `buf` (no copy); a super-packet is split into `out` by
/// [`split_for_gso`]. Errors as there.
pub fn from_tun(buf: &mut [u8], out: &mut [u8]) -> Result<TunPacket, DropReason> {
    let hdr = VnetHdr::parse(buf).ok_or(DropReason::TooShort)?;
    if hdr.gso_type != VIRTIO_NET_HDR_GSO_NONE {
        return split_for_gso(buf, out).map(TunPacket::Split);
    }
    let packet = buf.get_mut(VNET_HDR_LEN..).ok_or(DropReason::TooShort)?;
    let total_len = complete_checksum(packet, &hdr)?;
    Ok(TunPacket::InPlace(VNET_HDR_LEN..VNET_HDR_LEN + total_len))
}

/// For a packet that is not a super-packet: completes the checksum the
/// `virtio_net_hdr` `hdr` asks for (`NEEDS_CSUM`: the one's complement sum
/// from `csum_start` to the end of the packet, which includes the
/// pseudo-header sum the kernel left in the field, stored at `csum_start +
/// csum_offset`, 0 sent as 0xffff), in place. Returns the IPv4 total length
/// (bytes after it are padding). Errors: the packet does not [`packet::parse`];
/// `csum_start` before the end of the IPv4 header or the checksum field past
/// the packet ([`DropReason::BadHeaderLength`]).
pub fn complete_checksum(packet: &mut [u8], hdr: &VnetHdr) -> Result<usize, DropReason> {
    let info = packet::parse(packet)?;
    if hdr.needs_csum() {
        let start = usize::from(hdr.csum_start);
        let field = start + usize::from(hdr.csum_offset);
        if start < info.header_len || field + 2 > info.total_len {
            return Err(DropReason::BadHeaderLength);
        }
        let covered = packet
            .get(start..info.total_len)
            .ok_or(DropReason::BadHeaderLength)?;
        let sum = finish(sum_be(covered));
        put16(packet, field, sum);
    }
    Ok(info.total_len)
}

/// The fields of a super-packet that every segment is derived from.
struct Super {
    ip_hl: usize,
    /// IPv4 + L4 header length.
    hl: usize,
    /// IPv4 total length.
    total: usize,
    tcp: bool,
}

/// Validates a super-packet's headers against its `virtio_net_hdr`.
fn check_super(packet: &[u8], hdr: &VnetHdr) -> Result<Super, DropReason> {
    let info = packet::parse(packet)?;
    let gso = hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN;
    let tcp = match (gso, info.protocol) {
        (VIRTIO_NET_HDR_GSO_TCPV4, IPPROTO_TCP) => true,
        (VIRTIO_NET_HDR_GSO_UDP_L4, IPPROTO_UDP) => false,
        // TCPv6, legacy UFO, unknown types, or a type that is not the
        // packet's protocol.
        _ => return Err(DropReason::BadHeaderLength),
    };
    if hdr.gso_size == 0 || be16(packet, IP_FRAG).unwrap_or(0) & IP_MF_OFFSET != 0 {
        return Err(DropReason::BadHeaderLength);
    }
    let l4_hl = if tcp {
        let off = packet
            .get(info.header_len + TCP_DATA_OFF)
            .ok_or(DropReason::BadHeaderLength)?;
        usize::from(off >> 4) * 4
    } else {
        UDP_HEADER_LEN
    };
    let hl = info.header_len + l4_hl;
    if l4_hl < UDP_HEADER_LEN || (tcp && l4_hl < TCP_MIN_HEADER_LEN) || hl > info.total_len {
        return Err(DropReason::BadHeaderLength);
    }
    if hdr.needs_csum() {
        let field = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset);
        if usize::from(hdr.csum_start) < info.header_len || field + 2 > info.total_len {
            return Err(DropReason::BadHeaderLength);
        }
    }
    Ok(Super {
        ip_hl: info.header_len,
        hl,
        total: info.total_len,
        tcp,
    })
}

/// Splits one TUN read `input` (`virtio_net_hdr` + IPv4 packet) into
/// wire-ready IPv4 packets written back to back into `out`.
///
/// A super-packet (`gso_type` TCPV4, or UDP_L4 for USO) becomes
/// `ceil(payload / gso_size)` segments, each with the original headers
/// (IPv4 options and TCP options included) and `gso_size` bytes of payload
/// (the last one the rest): IPv4 total length, ID (+1 per segment, wrapping)
/// and header checksum; TCP sequence number advanced, FIN and PSH kept only on
/// the last segment and CWR only on the first; UDP length; the L4 checksum
/// computed in full (whatever the field held, so `NEEDS_CSUM` or not). A
/// packet with no more than `gso_size` of payload is one segment. A plain
/// packet (`gso_type` NONE) is copied and its checksum completed as
/// [`complete_checksum`] does; [`from_tun`] avoids that copy.
///
/// Errors, with nothing meaningful in `out`: fewer than 10 bytes
/// ([`DropReason::TooShort`]); what [`packet::parse`] rejects; a `gso_type`
/// other than TCPV4 (with or without ECN) on TCP or UDP_L4 on UDP, `gso_size`
/// 0, a fragment, an L4 header that does not fit, a `NEEDS_CSUM` field outside
/// the packet ([`DropReason::BadHeaderLength`]); `out` too small for the
/// segments ([`DropReason::Oversize`]).
pub fn split_for_gso(input: &[u8], out: &mut [u8]) -> Result<GsoSplit, DropReason> {
    let hdr = VnetHdr::parse(input).ok_or(DropReason::TooShort)?;
    let packet = input.get(VNET_HDR_LEN..).ok_or(DropReason::TooShort)?;
    if hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE {
        let info = packet::parse(packet)?;
        let dst = out.get_mut(..info.total_len).ok_or(DropReason::Oversize)?;
        dst.copy_from_slice(packet.get(..info.total_len).ok_or(DropReason::TooShort)?);
        let len = complete_checksum(dst, &hdr)?;
        return Ok(GsoSplit {
            len,
            segment: len,
            count: 1,
        });
    }
    let sp = check_super(packet, &hdr)?;
    let packet = packet.get(..sp.total).ok_or(DropReason::BadTotalLength)?;
    let (headers, payload) = packet.split_at(sp.hl);
    let gso = usize::from(hdr.gso_size);
    let count = payload.len().div_ceil(gso).max(1);
    let needed = count * sp.hl + payload.len();
    let out = out.get_mut(..needed).ok_or(DropReason::Oversize)?;
    let id = be16(headers, IP_ID).unwrap_or(0);
    let seq = be32(headers, sp.ip_hl + TCP_SEQ).unwrap_or(0);
    let flags = headers.get(sp.ip_hl + TCP_FLAGS).copied().unwrap_or(0);

    let mut chunks = payload.chunks(gso);
    let mut at = 0;
    for i in 0..count {
        let chunk = chunks.next().unwrap_or(&[]);
        let seg_len = sp.hl + chunk.len();
        let seg = out.get_mut(at..at + seg_len).ok_or(DropReason::Oversize)?;
        let (seg_headers, seg_payload) = seg.split_at_mut(sp.hl);
        seg_headers.copy_from_slice(headers);
        seg_payload.copy_from_slice(chunk);
        at += seg_len;

        // Both fit 16 bits: seg_len <= total <= 65535, i < 65535.
        let ip_len = u16::try_from(seg_len).map_err(|_| DropReason::BadTotalLength)?;
        let index = u16::try_from(i).map_err(|_| DropReason::BadTotalLength)?;
        put16(seg, IP_TOTAL_LEN, ip_len);
        put16(seg, IP_ID, id.wrapping_add(index));
        put16(seg, IP_CHECKSUM, 0);
        let ip_sum = finish_ip(seg.get(..sp.ip_hl).unwrap_or(&[]));
        put16(seg, IP_CHECKSUM, ip_sum);

        let l4_len = seg_len - sp.ip_hl;
        let checksum_at = if sp.tcp {
            // gso * i < 65536, so it fits; sequence numbers wrap.
            let advance = u32::try_from(gso * i).unwrap_or(0);
            put32(seg, sp.ip_hl + TCP_SEQ, seq.wrapping_add(advance));
            let mut f = flags;
            if i + 1 < count {
                f &= !(TCP_FIN | TCP_PSH);
            }
            if i > 0 {
                f &= !TCP_CWR;
            }
            if let Some(b) = seg.get_mut(sp.ip_hl + TCP_FLAGS) {
                *b = f;
            }
            sp.ip_hl + TCP_CHECKSUM_OFF
        } else {
            let udp_len = u16::try_from(l4_len).map_err(|_| DropReason::BadTotalLength)?;
            put16(seg, sp.ip_hl + UDP_LEN, udp_len);
            sp.ip_hl + UDP_CHECKSUM_OFF
        };
        put16(seg, checksum_at, 0);
        let proto = if sp.tcp { IPPROTO_TCP } else { IPPROTO_UDP };
        let sum = finish(l4_sum(seg, sp.ip_hl, proto));
        put16(seg, checksum_at, sum);
    }
    let segment = if count == 1 { needed } else { sp.hl + gso };
    Ok(GsoSplit {
        len: needed,
        segment,
        count,
    })
}

// ---------------------------------------------------------------------------
// Network -> TUN.

/// One TCP segment that may be merged, as [`candidate`] found it.
#[derive(Debug, Clone, Copy)]
struct Segment {
    total: usize,
    tcp_hl: usize,
    payload: usize,
    seq: u32,
    id: u16,
    psh: bool,
}

/// The merge state of the pending super-packet.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// IPv4 total length so far.
    total: usize,
    tcp_hl: usize,
    /// Payload of the first segment: the `gso_size`.
    gso_size: usize,
    segments: usize,
    next_seq: u32,
    next_id: u16,
    /// A short or PSH segment ended it: nothing more may follow.
    closed: bool,
}

/// Merges runs of consecutive TCP segments of one flow into TCPv4
/// super-packets for one TUN write each (the receive side of the offload,
/// what the kernel's GRO does for a NIC).
///
/// Feed it the inner IPv4 packets of a receive batch in order with
/// [`Coalescer::push`] and end the batch with [`Coalescer::flush`]; both call
/// `emit(vnet_hdr, packet)` for every TUN write that is ready (write the two
/// slices with one `writev`). A segment joins the pending super-packet when
/// it is the same flow (addresses, ports), the IPv4 header has no options,
/// the same TOS, TTL and DF, and the next ID; the TCP header has the next
/// sequence number, the same length, acknowledgment number, window, urgent
/// pointer, options and flags (PSH may come on the last segment, which
/// ends the super-packet); it carries data, no more than the first segment
/// (a shorter one ends the super-packet); its IPv4 and TCP checksums verify;
/// and the result stays within 65535 bytes. SYN, FIN, RST, URG or CWR
/// segments, fragments, other protocols and anything that does not parse are
/// passed on alone, unchanged, behind [`VNET_HDR_NONE`] (without a copy
/// when not TCP), as is a run of one.
///
/// Limits: only *consecutive* segments merge (flows interleaved packet by
/// packet are not); TCP over IPv4 only; one 64 KiB staging buffer, allocated
/// by [`Coalescer::new`], nothing after.
pub struct Coalescer {
    /// `virtio_net_hdr` + the pending packet.
    buf: Box<[u8]>,
    pending: Option<Pending>,
    merged: u64,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("pending", &self.pending)
            .field("merged", &self.merged)
            .finish()
    }
}

impl Default for Coalescer {
    fn default() -> Self {
        Self::new()
    }
}

impl Coalescer {
    /// A coalescer with its staging buffer (64 KiB + header).
    pub fn new() -> Coalescer {
        Coalescer {
            buf: vec![0u8; VNET_HDR_LEN + MAX_PACKET].into_boxed_slice(),
            pending: None,
            merged: 0,
        }
    }

    /// How many segments were appended to an earlier one so far (a counter
    /// for metrics: packets the kernel did not have to take one by one).
    pub fn merged(&self) -> u64 {
        self.merged
    }

    /// Whether a super-packet (or a lone TCP segment) is waiting for
    /// [`Coalescer::flush`].
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Takes the next inner packet; calls `emit` for what becomes ready
    /// (the pending super-packet when `packet` does not continue it, and
    /// `packet` itself when it cannot be merged at all).
    pub fn push<F>(&mut self, packet: &[u8], emit: &mut F)
    where
        F: FnMut(&[u8; VNET_HDR_LEN], &[u8]),
    {
        let Some(seg) = candidate(packet) else {
            self.flush(emit);
            emit(&VNET_HDR_NONE, packet);
            return;
        };
        if let Some(p) = self.pending
            && self.can_append(&p, packet, &seg)
        {
            self.append(p, packet, &seg);
        } else {
            self.flush(emit);
            self.start(packet, &seg);
        }
        if self.pending.is_some_and(|p| p.closed) {
            self.flush(emit);
        }
    }

    /// Emits the pending super-packet, if any.
    pub fn flush<F>(&mut self, emit: &mut F)
    where
        F: FnMut(&[u8; VNET_HDR_LEN], &[u8]),
    {
        let Some(p) = self.pending.take() else {
            return;
        };
        let Some((hdr, rest)) = self.buf.split_first_chunk_mut::<VNET_HDR_LEN>() else {
            return;
        };
        let Some(packet) = rest.get_mut(..p.total) else {
            return;
        };
        if p.segments == 1 {
            // Untouched: its own checksums are still right.
            emit(&VNET_HDR_NONE, packet);
            return;
        }
        let ip_hl = MIN_HEADER_LEN;
        // p.total <= MAX_PACKET, checked on every append.
        let total = u16::try_from(p.total).unwrap_or(u16::MAX);
        put16(packet, IP_TOTAL_LEN, total);
        put16(packet, IP_CHECKSUM, 0);
        let ip_sum = finish_ip(packet.get(..ip_hl).unwrap_or(&[]));
        put16(packet, IP_CHECKSUM, ip_sum);
        // The pseudo-header sum, not complemented: the kernel adds the rest.
        let tcp_len = u64::from(total) - 20;
        let pseudo =
            fold(sum_be(packet.get(IP_ADDRS).unwrap_or(&[])) + u64::from(IPPROTO_TCP) + tcp_len);
        put16(packet, ip_hl + TCP_CHECKSUM_OFF, pseudo);
        let vnet = VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: u16::try_from(ip_hl + p.tcp_hl).unwrap_or(0),
            gso_size: u16::try_from(p.gso_size).unwrap_or(0),
            csum_start: 20,
            csum_offset: 16,
        };
        *hdr = vnet.to_bytes();
        emit(hdr, packet);
    }

    fn start(&mut self, packet: &[u8], seg: &Segment) {
        let (Some(dst), Some(src)) = (
            self.buf.get_mut(VNET_HDR_LEN..VNET_HDR_LEN + seg.total),
            packet.get(..seg.total),
        ) else {
            return;
        };
        dst.copy_from_slice(src);
        self.pending = Some(Pending {
            total: seg.total,
            tcp_hl: seg.tcp_hl,
            gso_size: seg.payload,
            segments: 1,
            next_seq: seg
                .seq
                .wrapping_add(u32::try_from(seg.payload).unwrap_or(0)),
            next_id: seg.id.wrapping_add(1),
            closed: seg.psh,
        });
    }

    fn can_append(&self, p: &Pending, packet: &[u8], seg: &Segment) -> bool {
        if p.closed
            || seg.tcp_hl != p.tcp_hl
            || seg.seq != p.next_seq
            || seg.id != p.next_id
            || seg.payload > p.gso_size
            || p.total + seg.payload > MAX_PACKET
        {
            return false;
        }
        let Some(first) = self
            .buf
            .get(VNET_HDR_LEN..VNET_HDR_LEN + MIN_HEADER_LEN + p.tcp_hl)
        else {
            return false;
        };
        let Some(this) = packet.get(..MIN_HEADER_LEN + p.tcp_hl) else {
            return false;
        };
        let (fi, ft) = first.split_at(MIN_HEADER_LEN);
        let (ti, tt) = this.split_at(MIN_HEADER_LEN);
        // IPv4: TOS, DF, TTL, protocol, addresses (ID checked above).
        fi[IP_TOS] == ti[IP_TOS]
            && fi[IP_FRAG] & IP_DF_BYTE == ti[IP_FRAG] & IP_DF_BYTE
            && fi[IP_TTL..IP_TTL + 2] == ti[IP_TTL..IP_TTL + 2]
            && fi[IP_ADDRS] == ti[IP_ADDRS]
            // TCP: ports; ack; data offset; flags but PSH; window; urgent
            // pointer; options (sequence number and checksum differ).
            && ft[..TCP_SEQ] == tt[..TCP_SEQ]
            && ft[8..TCP_FLAGS] == tt[8..TCP_FLAGS]
            && ft[TCP_FLAGS] & !TCP_PSH == tt[TCP_FLAGS] & !TCP_PSH
            && ft[14..TCP_CHECKSUM_OFF] == tt[14..TCP_CHECKSUM_OFF]
            && ft[18..] == tt[18..]
    }

    fn append(&mut self, mut p: Pending, packet: &[u8], seg: &Segment) {
        let hl = MIN_HEADER_LEN + p.tcp_hl;
        let at = VNET_HDR_LEN + p.total;
        let (Some(dst), Some(src)) = (
            self.buf.get_mut(at..at + seg.payload),
            packet.get(hl..hl + seg.payload),
        ) else {
            return;
        };
        dst.copy_from_slice(src);
        if seg.psh
            && let Some(flags) = self.buf.get_mut(VNET_HDR_LEN + MIN_HEADER_LEN + TCP_FLAGS)
        {
            *flags |= TCP_PSH;
        }
        p.total += seg.payload;
        p.segments += 1;
        p.next_seq = seg
            .seq
            .wrapping_add(u32::try_from(seg.payload).unwrap_or(0));
        p.next_id = seg.id.wrapping_add(1);
        p.closed = seg.psh || seg.payload < p.gso_size;
        self.pending = Some(p);
        self.merged += 1;
    }
}

/// The TCP segment in `packet` if it may take part in a super-packet:
/// IPv4 without options, not a fragment, TCP with data, no SYN, FIN, RST,
/// URG or CWR, and valid IPv4 and TCP checksums.
fn candidate(packet: &[u8]) -> Option<Segment> {
    let info = packet::parse(packet).ok()?;
    if info.header_len != MIN_HEADER_LEN
        || info.protocol != IPPROTO_TCP
        || be16(packet, IP_FRAG)? & IP_MF_OFFSET != 0
    {
        return None;
    }
    let packet = packet.get(..info.total_len)?;
    let tcp_hl = usize::from(packet.get(MIN_HEADER_LEN + TCP_DATA_OFF)? >> 4) * 4;
    let hl = MIN_HEADER_LEN + tcp_hl;
    if tcp_hl < TCP_MIN_HEADER_LEN || hl >= info.total_len {
        return None;
    }
    let flags = *packet.get(MIN_HEADER_LEN + TCP_FLAGS)?;
    if flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_URG | TCP_CWR) != 0 {
        return None;
    }
    if !l4_valid(packet, MIN_HEADER_LEN, IPPROTO_TCP) {
        return None;
    }
    Some(Segment {
        total: info.total_len,
        tcp_hl,
        payload: info.total_len - hl,
        seq: be32(packet, MIN_HEADER_LEN + TCP_SEQ)?,
        id: be16(packet, IP_ID)?,
        psh: flags & TCP_PSH != 0,
    })
}

/// Splits a received message into its datagrams: `gro_segment` bytes each
/// (the last may be shorter), or one datagram when it is `None` or 0.
pub fn gro_datagrams(message: &[u8], gro_segment: Option<u16>) -> std::slice::Chunks<'_, u8> {
    let size = gro_segment
        .map(usize::from)
        .filter(|&s| s > 0)
        .unwrap_or(message.len())
        .max(1);
    message.chunks(size)
}

// ---------------------------------------------------------------------------
// Checksums and fields.

/// One's complement sum of `data` as big-endian 16-bit words (an odd last
/// byte padded with zero), unfolded. Adds 8 bytes at a time with an
/// end-around carry, which is the same sum modulo 0xffff (2^16 = 1 there).
fn sum_be(data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(8);
    let mut sum: u64 = 0;
    for w in words.by_ref() {
        let v = u64::from_be_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        let (s, carry) = sum.overflowing_add(v);
        sum = s + u64::from(carry);
    }
    // Fold to 32 bits so the tail cannot overflow.
    let mut sum = (sum >> 32) + (sum & 0xffff_ffff);
    let mut tail = words.remainder().chunks_exact(2);
    for w in tail.by_ref() {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = tail.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds a one's complement sum to 16 bits.
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).unwrap_or(0xffff)
}

/// The checksum field's value for a transport checksum whose covered sum is
/// `sum`: complemented, and 0 sent as 0xffff (as the kernel does; for UDP
/// 0 would mean "no checksum").
fn finish(sum: u64) -> u16 {
    match !fold(sum) {
        0 => 0xffff,
        c => c,
    }
}

/// The IPv4 header checksum of `header` whose checksum field is zero.
fn finish_ip(header: &[u8]) -> u16 {
    !fold(sum_be(header))
}

/// The one's complement sum, unfolded, of the L4 part of `packet` (from
/// `ip_hl` to its end) with the IPv4 pseudo-header. With the checksum field
/// zeroed, [`finish`] of it is the value to store; over a packet with a
/// valid checksum it folds to 0xffff ([`l4_valid`]).
fn l4_sum(packet: &[u8], ip_hl: usize, proto: u8) -> u64 {
    let l4 = packet.get(ip_hl..).unwrap_or(&[]);
    sum_be(packet.get(IP_ADDRS).unwrap_or(&[]))
        + u64::from(proto)
        + u64::try_from(l4.len()).unwrap_or(0)
        + sum_be(l4)
}

/// Whether the TCP/UDP checksum of `packet` verifies.
fn l4_valid(packet: &[u8], ip_hl: usize, proto: u8) -> bool {
    fold(l4_sum(packet, ip_hl, proto)) == 0xffff
}

fn be16(buf: &[u8], at: usize) -> Option<u16> {
    let b = buf.get(at..at + 2)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

fn be32(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn put16(buf: &mut [u8], at: usize, value: u16) {
    if let Some(b) = buf.get_mut(at..at + 2) {
        b.copy_from_slice(&value.to_be_bytes());
    }
}

fn put32(buf: &mut [u8], at: usize, value: u32) {
    if let Some(b) = buf.get_mut(at..at + 4) {
        b.copy_from_slice(&value.to_be_bytes());
    }
}

#[cfg(test)]
// Test fixtures build small packets with `as` casts of known-small values.
#[allow(clippy::cast_possible_truncation, clippy::type_complexity)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
    const B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);
    const ACK: u8 = 0x10;
    const ECE: u8 = 0x40;

    // An independent checksum: 16 bits at a time, no tricks.
    fn csum(parts: &[&[u8]]) -> u16 {
        let mut bytes = Vec::new();
        // Every part but the last has an even length.
        for p in parts {
            bytes.extend_from_slice(p);
        }
        let mut sum: u32 = 0;
        for pair in bytes.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            let lo = pair.get(1).map_or(0, |&b| u32::from(b));
            sum += hi | lo;
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn pseudo(p: &[u8], proto: u8) -> Vec<u8> {
        let ihl = usize::from(p[0] & 15) * 4;
        let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
        let l4 = (total - ihl) as u16;
        let mut v = p[12..20].to_vec();
        v.extend_from_slice(&[0, proto]);
        v.extend_from_slice(&l4.to_be_bytes());
        v
    }

    fn ip_ok(p: &[u8]) -> bool {
        let ihl = usize::from(p[0] & 15) * 4;
        csum(&[&p[..ihl]]) == 0
    }

    fn l4_ok(p: &[u8], proto: u8) -> bool {
        let ihl = usize::from(p[0] & 15) * 4;
        let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
        csum(&[&pseudo(p, proto), &p[ihl..total]]) == 0
    }

    struct Tcp {
        id: u16,
        seq: u32,
        flags: u8,
        ip_options: Vec<u8>,
        tcp_options: Vec<u8>,
        df: bool,
        ports: (u16, u16),
    }

    impl Default for Tcp {
        fn default() -> Tcp {
            Tcp {
                id: 0x1234,
                seq: 1000,
                flags: ACK,
                ip_options: vec![],
                tcp_options: vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
                df: true,
                ports: (40000, 5001),
            }
        }
    }

    /// A TCP/IPv4 packet with valid IP and TCP checksums.
    fn tcp_packet(t: &Tcp, payload: &[u8]) -> Vec<u8> {
        let ihl = 20 + t.ip_options.len();
        let thl = 20 + t.tcp_options.len();
        let total = ihl + thl + payload.len();
        let mut p = vec![0u8; ihl];
        p[0] = 0x40 | (ihl / 4) as u8;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&t.id.to_be_bytes());
        p[6] = if t.df { 0x40 } else { 0 };
        p[8] = 64;
        p[9] = IPPROTO_TCP;
        p[12..16].copy_from_slice(&A.octets());
        p[16..20].copy_from_slice(&B.octets());
        p[20..].copy_from_slice(&t.ip_options);
        let c = csum(&[&p]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&t.ports.0.to_be_bytes());
        tcp[2..4].copy_from_slice(&t.ports.1.to_be_bytes());
        tcp[4..8].copy_from_slice(&t.seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&77u32.to_be_bytes());
        tcp[12] = ((thl / 4) as u8) << 4;
        tcp[13] = t.flags;
        tcp[14..16].copy_from_slice(&501u16.to_be_bytes());
        tcp.extend_from_slice(&t.tcp_options);
        tcp.extend_from_slice(payload);
        p.extend_from_slice(&tcp);
        let c = csum(&[&pseudo(&p, IPPROTO_TCP), &p[ihl..]]);
        p[ihl + 16..ihl + 18].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// A UDP/IPv4 packet with valid checksums.
    fn udp_packet(payload: &[u8]) -> Vec<u8> {
        let total = 28 + payload.len();
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&7u16.to_be_bytes());
        p[8] = 64;
        p[9] = IPPROTO_UDP;
        p[12..16].copy_from_slice(&A.octets());
        p[16..20].copy_from_slice(&B.octets());
        let c = csum(&[&p]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(&4000u16.to_be_bytes());
        p.extend_from_slice(&8472u16.to_be_bytes());
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        let c = csum(&[&pseudo(&p, IPPROTO_UDP), &p[20..]]);
        let c = if c == 0 { 0xffff } else { c };
        p[26..28].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// The pseudo-header sum (not complemented) the kernel leaves in a
    /// NEEDS_CSUM packet's checksum field.
    fn set_partial(p: &mut [u8], proto: u8) {
        let ihl = usize::from(p[0] & 15) * 4;
        let off = ihl + if proto == IPPROTO_TCP { 16 } else { 6 };
        let partial = !csum(&[&pseudo(p, proto)]);
        p[off..off + 2].copy_from_slice(&partial.to_be_bytes());
    }

    /// A TUN read: NEEDS_CSUM header with `gso_type`/`gso_size` and a packet
    /// carrying the pseudo-header sum.
    fn tun_read(mut p: Vec<u8>, gso_type: u8, gso_size: u16) -> Vec<u8> {
        let proto = p[9];
        set_partial(&mut p, proto);
        let ihl = usize::from(p[0] & 15) * 4;
        let hdr = VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type,
            hdr_len: 0,
            gso_size,
            csum_start: ihl as u16,
            csum_offset: if proto == IPPROTO_TCP { 16 } else { 6 },
        };
        let mut v = hdr.to_bytes().to_vec();
        v.extend_from_slice(&p);
        v
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn segments(out: &[u8], split: &GsoSplit) -> Vec<Vec<u8>> {
        let v: Vec<Vec<u8>> = out[..split.len]
            .chunks(split.segment)
            .map(<[u8]>::to_vec)
            .collect();
        assert_eq!(v.len(), split.count);
        v
    }

    /// Runs `packets` through a coalescer; returns (vnet header, packet) writes.
    fn coalesce(packets: &[Vec<u8>]) -> Vec<(VnetHdr, Vec<u8>)> {
        let mut c = Coalescer::new();
        let mut writes = Vec::new();
        let mut emit = |h: &[u8; VNET_HDR_LEN], p: &[u8]| {
            writes.push((VnetHdr::parse(h).unwrap(), p.to_vec()));
        };
        for p in packets {
            c.push(p, &mut emit);
        }
        c.flush(&mut emit);
        assert!(!c.is_pending());
        writes
    }

    fn seq_of(p: &[u8]) -> u32 {
        let ihl = usize::from(p[0] & 15) * 4;
        u32::from_be_bytes(p[ihl + 4..ihl + 8].try_into().unwrap())
    }

    fn flags_of(p: &[u8]) -> u8 {
        p[usize::from(p[0] & 15) * 4 + 13]
    }

    fn tcp_payload(p: &[u8]) -> &[u8] {
        let ihl = usize::from(p[0] & 15) * 4;
        let thl = usize::from(p[ihl + 12] >> 4) * 4;
        let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
        &p[ihl + thl..total]
    }

    #[test]
    fn vnet_header_round_trips() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 1,
            hdr_len: 52,
            gso_size: 1448,
            csum_start: 20,
            csum_offset: 16,
        };
        assert_eq!(VnetHdr::parse(&h.to_bytes()), Some(h));
        assert_eq!(VnetHdr::parse(&[0; 9]), None);
        assert_eq!(VnetHdr::parse(&VNET_HDR_NONE), Some(VnetHdr::default()));
    }

    #[test]
    fn fast_sum_equals_reference() {
        for len in 0..64 {
            let data = pattern(len, 200);
            assert_eq!(
                !fold(sum_be(&data)),
                packet::internet_checksum(&data),
                "{len}"
            );
        }
        assert_eq!(fold(sum_be(&[0xff; 4096])), 0xffff);
        assert_eq!(fold(sum_be(&[])), 0);
    }

    #[test]
    fn splits_a_tcp_super_packet() {
        let t = Tcp {
            flags: ACK | TCP_PSH | TCP_FIN | TCP_CWR,
            seq: u32::MAX - 2000, // wraps inside the packet
            id: u16::MAX - 1,     // wraps too
            ip_options: vec![1, 1, 1, 0],
            ..Tcp::default()
        };
        let payload = pattern(10_000, 3);
        let input = tun_read(
            tcp_packet(&t, &payload),
            VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN,
            1400,
        );
        let mut out = vec![0u8; 70_000];
        let split = split_for_gso(&input, &mut out).unwrap();
        let hl = 24 + 32;
        assert_eq!(split.count, 8);
        assert_eq!(split.segment, hl + 1400);
        assert_eq!(split.len, 8 * hl + 10_000);
        let segs = segments(&out, &split);
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let info = packet::parse(s).unwrap();
            assert_eq!(info.total_len, s.len());
            assert!(ip_ok(s) && l4_ok(s, IPPROTO_TCP), "segment {i}");
            assert_eq!(
                u16::from_be_bytes([s[4], s[5]]),
                t.id.wrapping_add(i as u16)
            );
            assert_eq!(seq_of(s), t.seq.wrapping_add(1400 * i as u32));
            let f = flags_of(s);
            assert_eq!(f & TCP_CWR != 0, i == 0, "CWR on the first only");
            assert_eq!(
                f & (TCP_FIN | TCP_PSH) != 0,
                i == 7,
                "FIN/PSH on the last only"
            );
            assert_eq!(
                f & (TCP_FIN | TCP_PSH),
                if i == 7 { TCP_FIN | TCP_PSH } else { 0 }
            );
            assert_eq!(&s[20..24], &[1, 1, 1, 0], "IP options copied");
            assert_eq!(&s[24 + 20..hl], &t.tcp_options[..], "TCP options copied");
            joined.extend_from_slice(tcp_payload(s));
        }
        assert_eq!(segs[7].len(), hl + 10_000 - 7 * 1400);
        assert_eq!(joined, payload);
    }

    #[test]
    fn splits_a_udp_super_packet() {
        let payload = pattern(3000, 9);
        let input = tun_read(udp_packet(&payload), VIRTIO_NET_HDR_GSO_UDP_L4, 1200);
        let mut out = vec![0u8; 4000];
        let split = split_for_gso(&input, &mut out).unwrap();
        assert_eq!((split.count, split.segment, split.len), (3, 1228, 3084));
        let mut joined = Vec::new();
        for (i, s) in segments(&out, &split).iter().enumerate() {
            assert!(ip_ok(s) && l4_ok(s, IPPROTO_UDP), "segment {i}");
            assert_eq!(
                usize::from(u16::from_be_bytes([s[24], s[25]])),
                s.len() - 20
            );
            assert_eq!(u16::from_be_bytes([s[4], s[5]]), 7 + i as u16);
            joined.extend_from_slice(&s[28..]);
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn small_super_packet_is_one_segment() {
        let p = tcp_packet(&Tcp::default(), &pattern(100, 1));
        let input = tun_read(p.clone(), VIRTIO_NET_HDR_GSO_TCPV4, 1400);
        let mut out = vec![0u8; 2000];
        let split = split_for_gso(&input, &mut out).unwrap();
        assert_eq!(
            (split.count, split.segment, split.len),
            (1, p.len(), p.len())
        );
        assert_eq!(&out[..p.len()], &p[..]);
        let batches: Vec<_> = split.batches(64).collect();
        assert_eq!(batches, vec![(0..p.len(), None)]);
    }

    #[test]
    fn plain_packets_get_their_checksum_completed_in_place() {
        for p in [
            tcp_packet(&Tcp::default(), &pattern(333, 2)),
            udp_packet(&pattern(100, 5)),
        ] {
            let proto = p[9];
            let mut buf = tun_read(p.clone(), VIRTIO_NET_HDR_GSO_NONE, 0);
            buf.extend_from_slice(&[0xee; 3]); // padding after the packet
            let mut out = vec![0u8; 2000];
            let split = split_for_gso(&buf, &mut out).unwrap();
            assert_eq!(
                split,
                GsoSplit {
                    len: p.len(),
                    segment: p.len(),
                    count: 1
                }
            );
            assert_eq!(&out[..p.len()], &p[..]);
            let got = from_tun(&mut buf, &mut out).unwrap();
            assert_eq!(
                got,
                TunPacket::InPlace(VNET_HDR_LEN..VNET_HDR_LEN + p.len())
            );
            assert_eq!(&buf[VNET_HDR_LEN..VNET_HDR_LEN + p.len()], &p[..]);
            assert!(l4_ok(&buf[VNET_HDR_LEN..], proto));
        }
        // Without NEEDS_CSUM the packet is left as it is.
        let p = tcp_packet(&Tcp::default(), b"abc");
        let mut buf = VNET_HDR_NONE.to_vec();
        buf.extend_from_slice(&p);
        let mut out = [0u8; 0];
        assert_eq!(
            from_tun(&mut buf, &mut out),
            Ok(TunPacket::InPlace(10..10 + p.len()))
        );
        assert_eq!(&buf[10..], &p[..]);
    }

    #[test]
    fn udp_checksum_zero_is_sent_as_ffff() {
        // Find a payload whose UDP checksum comes out 0 (0xffff on the wire).
        let mut found = false;
        for x in 0..=u16::MAX {
            let p = udp_packet(&x.to_be_bytes());
            if u16::from_be_bytes([p[26], p[27]]) == 0xffff {
                let mut buf = tun_read(p.clone(), VIRTIO_NET_HDR_GSO_NONE, 0);
                let mut out = [0u8; 0];
                from_tun(&mut buf, &mut out).unwrap();
                assert_eq!(&buf[10..], &p[..]);
                found = true;
                break;
            }
        }
        assert!(found);
    }

    #[test]
    fn malformed_reads_are_errors() {
        let good = tun_read(
            tcp_packet(&Tcp::default(), &pattern(5000, 1)),
            VIRTIO_NET_HDR_GSO_TCPV4,
            1000,
        );
        let mut out = vec![0u8; 70_000];
        let split = |b: &[u8], out: &mut [u8]| split_for_gso(b, out);
        assert!(split(&good, &mut out).is_ok());
        assert_eq!(split(&good[..9], &mut out), Err(DropReason::TooShort));
        assert_eq!(split(&good[..25], &mut out), Err(DropReason::TooShort));
        assert_eq!(
            split(&good[..good.len() - 1], &mut out),
            Err(DropReason::BadTotalLength)
        );
        // gso_size 0.
        let mut b = good.clone();
        b[4..6].fill(0);
        assert_eq!(split(&b, &mut out), Err(DropReason::BadHeaderLength));
        // csum_start beyond the packet, csum_offset beyond it, csum_start in the IP header.
        for (at, v) in [(6, 60_000u16), (8, 60_000), (6, 4)] {
            let mut b = good.clone();
            b[at..at + 2].copy_from_slice(&v.to_ne_bytes());
            assert_eq!(
                split(&b, &mut out),
                Err(DropReason::BadHeaderLength),
                "{at}"
            );
            let mut b = b.clone();
            b[1] = VIRTIO_NET_HDR_GSO_NONE;
            assert_eq!(
                from_tun(&mut b, &mut out),
                Err(DropReason::BadHeaderLength),
                "{at}"
            );
        }
        // Unknown gso types, TCPv6, and a type that is not the protocol.
        for t in [3, 4, 6, 0x7f, VIRTIO_NET_HDR_GSO_UDP_L4] {
            let mut b = good.clone();
            b[1] = t;
            assert_eq!(split(&b, &mut out), Err(DropReason::BadHeaderLength), "{t}");
        }
        // A TCP data offset past the packet, and below 5.
        for doff in [0xf0u8, 0x40] {
            let mut p = tcp_packet(
                &Tcp {
                    tcp_options: vec![],
                    ..Tcp::default()
                },
                &[],
            );
            p[32] = doff;
            let b = tun_read(p, VIRTIO_NET_HDR_GSO_TCPV4, 1000);
            assert_eq!(split(&b, &mut out), Err(DropReason::BadHeaderLength));
        }
        // A fragment.
        let mut p = tcp_packet(&Tcp::default(), &pattern(3000, 1));
        p[6] |= 0x20;
        p[10..12].fill(0);
        let c = csum(&[&p[..20]]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let b = tun_read(p, VIRTIO_NET_HDR_GSO_TCPV4, 1000);
        assert_eq!(split(&b, &mut out), Err(DropReason::BadHeaderLength));
        // IPv6, a bad IP checksum.
        let mut b = good.clone();
        b[10] = 0x60;
        assert_eq!(split(&b, &mut out), Err(DropReason::NotIpv4));
        let mut b = good.clone();
        b[10 + 12] ^= 1;
        assert_eq!(split(&b, &mut out), Err(DropReason::BadChecksum));
        // Output too small, by one byte.
        let need = split(&good, &mut out).unwrap().len;
        assert_eq!(
            split(&good, &mut out[..need - 1]),
            Err(DropReason::Oversize)
        );
        assert_eq!(split(&good, &mut out[..need]).map(|s| s.len), Ok(need));
    }

    #[test]
    fn split_buffer_holds_any_mss_at_least_the_header_length() {
        for (options, gso) in [(vec![], 40u16), (vec![0u8; 40], 80), (vec![], 1)] {
            let hl = 40 + options.len();
            let t = Tcp {
                tcp_options: options,
                ..Tcp::default()
            };
            let payload = pattern(65_535 - hl, 0);
            let input = tun_read(tcp_packet(&t, &payload), VIRTIO_NET_HDR_GSO_TCPV4, gso);
            let mut out = vec![0u8; SPLIT_BUFFER];
            let got = split_for_gso(&input, &mut out);
            if usize::from(gso) >= hl {
                assert!(got.is_ok(), "{hl} {gso}");
            } else {
                assert_eq!(got, Err(DropReason::Oversize));
            }
        }
    }

    #[test]
    fn batches_respect_segment_and_byte_limits() {
        let split = GsoSplit {
            len: 100 * 1000 + 500,
            segment: 1000,
            count: 101,
        };
        let b: Vec<_> = split.batches(64).collect();
        assert_eq!(
            b,
            vec![(0..64_000, Some(1000)), (64_000..100_500, Some(1000))]
        );
        let split = GsoSplit {
            len: 45 * 1500 + 10,
            segment: 1500,
            count: 46,
        };
        let b: Vec<_> = split.batches(64).collect();
        assert_eq!(b[0], (0..43 * 1500, Some(1500)));
        assert_eq!(b[1], (43 * 1500..45 * 1500 + 10, Some(1500)));
        let b: Vec<_> = split.batches(1).collect();
        assert_eq!(b.len(), 46);
        assert!(b.iter().all(|(_, g)| g.is_none()));
    }

    fn flow(n: usize, mss: usize, t: &Tcp) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                let tt = Tcp {
                    id: t.id.wrapping_add(i as u16),
                    seq: t.seq.wrapping_add((i * mss) as u32),
                    flags: t.flags,
                    ip_options: t.ip_options.clone(),
                    tcp_options: t.tcp_options.clone(),
                    df: t.df,
                    ports: t.ports,
                };
                tcp_packet(&tt, &pattern(mss, i as u8))
            })
            .collect()
    }

    #[test]
    fn coalesces_a_run_into_one_gso_write() {
        let segs = flow(5, 1000, &Tcp::default());
        let writes = coalesce(&segs);
        assert_eq!(writes.len(), 1);
        let (h, p) = &writes[0];
        assert_eq!(
            *h,
            VnetHdr {
                flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
                gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
                hdr_len: 52,
                gso_size: 1000,
                csum_start: 20,
                csum_offset: 16
            }
        );
        assert_eq!(p.len(), 52 + 5000);
        assert!(ip_ok(p));
        // The checksum field holds the pseudo-header sum: completing it gives a valid packet.
        let mut full = p.clone();
        let mut buf = h.to_bytes().to_vec();
        buf.extend_from_slice(&full);
        buf[1] = VIRTIO_NET_HDR_GSO_NONE;
        let mut out = [0u8; 0];
        from_tun(&mut buf, &mut out).unwrap();
        full.copy_from_slice(&buf[10..]);
        assert!(l4_ok(&full, IPPROTO_TCP));
        let joined: Vec<u8> = segs.iter().flat_map(|s| tcp_payload(s).to_vec()).collect();
        assert_eq!(tcp_payload(p), &joined[..]);
    }

    #[test]
    fn lone_and_odd_packets_pass_unchanged() {
        let t = Tcp::default();
        let udp = udp_packet(b"hello");
        let mut ack_only = tcp_packet(&t, &[]);
        ack_only.extend_from_slice(&[0; 6]); // Ethernet-style padding is passed as is
        let syn = tcp_packet(
            &Tcp {
                flags: TCP_SYN,
                ..Tcp::default()
            },
            &[],
        );
        let garbage = vec![0x45u8; 7];
        let one = tcp_packet(&t, b"data");
        for p in [udp, ack_only, syn, garbage, one] {
            let w = coalesce(std::slice::from_ref(&p));
            assert_eq!(w, vec![(VnetHdr::default(), p.clone())]);
        }
    }

    /// Packets that break a run: each list must produce exactly these write sizes.
    #[test]
    fn runs_break_where_they_must() {
        let t = Tcp::default();
        let base = flow(4, 1000, &t);
        let count = |packets: &[Vec<u8>]| -> Vec<usize> {
            coalesce(packets)
                .iter()
                .map(|(h, p)| {
                    if h.gso_type == 0 {
                        1
                    } else {
                        (p.len() - 52).div_ceil(usize::from(h.gso_size))
                    }
                })
                .collect()
        };
        assert_eq!(count(&base), vec![4]);
        // A different flow in the middle.
        let other = tcp_packet(
            &Tcp {
                ports: (1, 2),
                ..Tcp::default()
            },
            &pattern(1000, 0),
        );
        let mut v = base.clone();
        v.insert(2, other);
        assert_eq!(count(&v), vec![2, 1, 2]);
        // A sequence gap, an ID gap.
        let mut v = base.clone();
        v.remove(2);
        assert_eq!(count(&v), vec![2, 1]);
        // A bad TCP checksum is passed alone.
        let mut v = base.clone();
        v[1][60] ^= 1;
        assert_eq!(count(&v), vec![1, 1, 2]);
        // PSH ends a run (and is kept), a short segment ends a run, a longer one does not join.
        let mut v = base.clone();
        let psh = tcp_packet(
            &Tcp {
                flags: ACK | TCP_PSH,
                seq: t.seq + 1000,
                id: t.id + 1,
                ..Tcp::default()
            },
            &pattern(1000, 1),
        );
        v[1] = psh;
        let w = coalesce(&v);
        assert_eq!(w.len(), 2);
        assert_eq!(flags_of(&w[0].1), ACK | TCP_PSH);
        let short = flow(3, 1000, &t);
        let mut v = short.clone();
        let last = tcp_packet(
            &Tcp {
                seq: t.seq + 3000,
                id: t.id + 3,
                ..Tcp::default()
            },
            &pattern(10, 0),
        );
        v.push(last);
        let after = tcp_packet(
            &Tcp {
                seq: t.seq + 3010,
                id: t.id + 4,
                ..Tcp::default()
            },
            &pattern(10, 0),
        );
        v.push(after);
        assert_eq!(count(&v), vec![4, 1]);
        let mut v = flow(2, 1000, &t);
        v.push(tcp_packet(
            &Tcp {
                seq: t.seq + 2000,
                id: t.id + 2,
                ..Tcp::default()
            },
            &pattern(1001, 0),
        ));
        assert_eq!(count(&v), vec![2, 1]);
        // Different TCP options, DF, TOS, FIN, CWR, IP options.
        let variants: Vec<Box<dyn Fn(&mut Tcp)>> = vec![
            Box::new(|t| t.tcp_options[11] = 9),
            Box::new(|t| t.df = false),
            Box::new(|t| t.flags |= TCP_FIN),
            Box::new(|t| t.flags |= TCP_CWR),
            Box::new(|t| t.flags |= ECE),
            Box::new(|t| t.ip_options = vec![1, 1, 1, 0]),
        ];
        for change in variants {
            let mut tt = Tcp {
                seq: t.seq + 2000,
                id: t.id + 2,
                ..Tcp::default()
            };
            change(&mut tt);
            let mut v = flow(2, 1000, &t);
            v.push(tcp_packet(&tt, &pattern(1000, 0)));
            assert_eq!(count(&v), vec![2, 1]);
        }
        // 64 KiB is the limit.
        let v = flow(70, 1000, &t);
        assert_eq!(count(&v), vec![65, 5]);
    }

    #[test]
    fn gro_datagrams_cut_messages() {
        let msg = pattern(2500, 0);
        let lens: Vec<usize> = gro_datagrams(&msg, Some(1000)).map(<[u8]>::len).collect();
        assert_eq!(lens, [1000, 1000, 500]);
        assert_eq!(gro_datagrams(&msg, None).count(), 1);
        assert_eq!(gro_datagrams(&msg, Some(0)).count(), 1);
        assert_eq!(gro_datagrams(&[], None).count(), 0);
    }

    fn arb_flags() -> impl Strategy<Value = u8> {
        prop_oneof![
            Just(ACK),
            Just(ACK | TCP_PSH),
            Just(ACK | ECE),
            Just(ACK | ECE | TCP_PSH)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Split then coalesce gives back the super-packet the kernel handed over.
        #[test]
        fn split_then_coalesce_round_trips(
            payload_len in 0usize..=65_000,
            mss in prop_oneof![1usize..64, 500usize..=9000],
            seq in any::<u32>(),
            id in any::<u16>(),
            flags in arb_flags(),
            options in prop_oneof![Just(vec![]), Just(vec![1, 1, 8, 10, 1, 2, 3, 4, 5, 6, 7, 8])],
            seed in any::<u8>(),
        ) {
            let payload_len = payload_len.min(65_535 - 40 - options.len());
            let payload = pattern(payload_len, seed);
            let t = Tcp { seq, id, flags, tcp_options: options.clone(), ..Tcp::default() };
            let original = tcp_packet(&t, &payload);
            let input = tun_read(original.clone(), VIRTIO_NET_HDR_GSO_TCPV4, mss as u16);
            let hl = 40 + options.len();
            let count = payload_len.div_ceil(mss).max(1);
            let mut out = vec![0u8; count * hl + payload_len];
            let split = split_for_gso(&input, &mut out).unwrap();
            prop_assert_eq!(split.count, count);
            prop_assert_eq!(split.len, out.len());
            let segs = segments(&out, &split);
            for (i, s) in segs.iter().enumerate() {
                prop_assert!(packet::parse(s).is_ok());
                prop_assert!(ip_ok(s) && l4_ok(s, IPPROTO_TCP));
                prop_assert_eq!(seq_of(s), seq.wrapping_add((i * mss) as u32));
                prop_assert!(s.len() <= hl + mss);
                let last = i + 1 == count;
                prop_assert_eq!(flags_of(s), if last { flags } else { flags & !TCP_PSH });
            }
            let writes = coalesce(&segs);
            let joined: Vec<u8> = writes.iter().flat_map(|(_, p)| tcp_payload(p).to_vec()).collect();
            prop_assert_eq!(&joined, &payload);
            if count >= 2 && payload_len > 0 {
                prop_assert_eq!(writes.len(), 1);
                let (h, p) = &writes[0];
                prop_assert_eq!(h.gso_size as usize, mss);
                prop_assert_eq!(h.gso_type, VIRTIO_NET_HDR_GSO_TCPV4);
                prop_assert_eq!(p, &input[VNET_HDR_LEN..]);
            } else {
                prop_assert_eq!(writes.len(), 1);
                prop_assert_eq!(writes[0].0, VnetHdr::default());
            }
        }

        #[test]
        fn random_bytes_never_panic(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..200),
            hdr in any::<[u8; 10]>(),
            force_v4 in any::<bool>(),
            out_len in 0usize..400,
        ) {
            if force_v4 && !bytes.is_empty() {
                bytes[0] = 0x45;
            }
            let mut buf = hdr.to_vec();
            buf.extend_from_slice(&bytes);
            let mut out = vec![0u8; out_len];
            if let Ok(s) = split_for_gso(&buf, &mut out) {
                prop_assert!(s.len <= out_len && s.count >= 1 && s.segment >= 1);
            }
            let _ = from_tun(&mut buf.clone(), &mut out);
            let _ = split_for_gso(&bytes, &mut out);
            let w = coalesce(&[bytes.clone(), bytes.clone()]);
            prop_assert!(!w.is_empty());
        }

        /// Valid headers with lying fields: lengths, offsets, gso sizes.
        #[test]
        fn lying_headers_never_panic(
            payload_len in 0usize..3000,
            gso_size in any::<u16>(),
            csum_start in any::<u16>(),
            csum_offset in any::<u16>(),
            flags in any::<u8>(),
            gso_type in prop_oneof![Just(0u8), Just(1), Just(5), Just(0x81), any::<u8>()],
            total in any::<u16>(),
            doff in any::<u8>(),
            cut in 0usize..3100,
            udp in any::<bool>(),
        ) {
            let mut p = if udp {
                udp_packet(&pattern(payload_len, 0))
            } else {
                tcp_packet(&Tcp::default(), &pattern(payload_len, 0))
            };
            if total % 3 == 0 {
                p[2..4].copy_from_slice(&total.to_be_bytes());
                p[10..12].fill(0);
                let c = csum(&[&p[..20]]);
                p[10..12].copy_from_slice(&c.to_be_bytes());
            }
            if doff % 2 == 0 && !udp {
                p[32] = doff;
            }
            let hdr = VnetHdr { flags, gso_type, hdr_len: 0, gso_size, csum_start, csum_offset };
            let mut buf = hdr.to_bytes().to_vec();
            buf.extend_from_slice(&p);
            buf.truncate(cut.max(1));
            let mut out = vec![0u8; 8000];
            if let Ok(s) = split_for_gso(&buf, &mut out) {
                for seg in out[..s.len].chunks(s.segment) {
                    prop_assert!(packet::parse(seg).is_ok());
                }
            }
            let _ = from_tun(&mut buf, &mut out);
            let _ = coalesce(&[p.clone(), p]);
        }
    }
}
