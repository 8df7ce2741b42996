//! TUN offloads for the `udp` backend: pure, no I/O, no allocation per packet.
//!
//! With `IFF_VNET_HDR` and `TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4)` (and
//! optionally `TUN_F_USO4`) the kernel hands the TUN reader TCP (UDP)
//! super-packets of up to 64 KiB with a `virtio_net_hdr` in front, and
//! accepts super-packets on write. The wire between nodes still carries one
//! plain IPv4 packet per UDP datagram (flannel's format), so:
//!
//! - **TUN -> network** ([`from_tun`]): a super-packet is cut into
//!   wire-ready IPv4 packets, each with its own IPv4 header (total length,
//!   ID + i, header checksum) and TCP header (sequence number advanced,
//!   FIN/PSH only on the last segment, CWR only on the first) or UDP header
//!   (length), and a complete L4 checksum. Only the headers are written (to
//!   a small buffer of their own); each segment goes out as two `iovec`s,
//!   its headers and its payload where the TUN read left it, and every
//!   segment but the last is [`GsoSegments::segment_len`] bytes, so one
//!   `sendmsg` with `UDP_SEGMENT` carries a run of them to the peer
//!   ([`GsoSegments::batches`] cuts the runs). A plain packet only gets its
//!   checksum completed when the header says `NEEDS_CSUM`, in place.
//! - **network -> TUN** ([`Coalescer`]): consecutive TCP segments of one
//!   flow (e.g. the datagrams of one UDP GRO message) are merged back into
//!   one super-packet behind a `virtio_net_hdr` with `gso_type` TCPV4, which
//!   the kernel takes in one `writev` (the merged headers, then every
//!   segment's payload where it was received) and re-segments (or delivers
//!   whole to a local socket) as it would a packet from its own GRO.
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

mod coalesce;
mod split;

use crate::udp::packet::{ADDRS_RANGE, fold, ones_complement_sum};
use crate::udp::sys::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VNET_HDR_LEN};

pub use self::coalesce::{Coalescer, MAX_MERGED_SEGMENTS, PacketAt};
pub use self::split::{GsoBatches, GsoSegments, TunPacket, complete_checksum, from_tun};

/// The largest IPv4 packet (the total length field is 16 bits).
pub const MAX_PACKET: usize = 65535;
/// The largest UDP payload one IPv4 datagram (or one `UDP_SEGMENT` send)
/// carries: 65535 - 20 (IPv4) - 8 (UDP).
pub const MAX_UDP_PAYLOAD: usize = 65507;
/// Room a reader needs for one TUN read with TSO/USO: header + 64 KiB.
pub const TUN_READ_BUFFER: usize = VNET_HDR_LEN + MAX_PACKET;
/// A header buffer for [`from_tun`] that holds the segment headers of every
/// super-packet whose `gso_size` is at least its header length (IPv4 +
/// TCP/UDP), which every real MSS is: the headers then add up to less than
/// the packet. A smaller `gso_size` can need more (up to ~4 MiB for
/// `gso_size` 1), and is
/// [`DropReason::Oversize`](crate::udp::packet::DropReason::Oversize) with
/// this buffer.
pub const HEADER_BUFFER: usize = MAX_PACKET;
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
// Checksums and fields.

/// The checksum field's value for a transport checksum whose covered sum is
/// `sum`: complemented, and 0 sent as 0xffff (as the kernel does; for UDP
/// 0 would mean "no checksum").
fn finish(sum: u64) -> u16 {
    match !fold(sum) {
        0 => 0xffff,
        c => c,
    }
}

/// The one's complement sum, unfolded, of the L4 part of `packet` (from
/// `ip_hl` to its end) with the IPv4 pseudo-header. With the checksum field
/// zeroed, [`finish`] of it is the value to store; over a packet with a
/// valid checksum it folds to 0xffff ([`l4_valid`]).
fn l4_sum(packet: &[u8], ip_hl: usize, proto: u8) -> u64 {
    let l4 = packet.get(ip_hl..).unwrap_or(&[]);
    ones_complement_sum(packet.get(ADDRS_RANGE).unwrap_or(&[]))
        + u64::from(proto)
        + u64::try_from(l4.len()).unwrap_or(0)
        + ones_complement_sum(l4)
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

/// Packet builders and checks shared by the tests of both directions.
#[cfg(test)]
// Test fixtures build small packets with `as` casts of known-small values.
#[allow(clippy::cast_possible_truncation)]
mod fixtures {
    use super::*;
    use crate::udp::packet::DropReason;
    use std::net::Ipv4Addr;

    const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
    const B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);
    pub(super) const ACK: u8 = 0x10;
    pub(super) const ECE: u8 = 0x40;

    // An independent checksum: 16 bits at a time, no tricks.
    pub(super) fn csum(parts: &[&[u8]]) -> u16 {
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

    pub(super) fn pseudo(p: &[u8], proto: u8) -> Vec<u8> {
        let ihl = usize::from(p[0] & 15) * 4;
        let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
        let l4 = (total - ihl) as u16;
        let mut v = p[12..20].to_vec();
        v.extend_from_slice(&[0, proto]);
        v.extend_from_slice(&l4.to_be_bytes());
        v
    }

    pub(super) fn ip_ok(p: &[u8]) -> bool {
        let ihl = usize::from(p[0] & 15) * 4;
        csum(&[&p[..ihl]]) == 0
    }

    pub(super) fn l4_ok(p: &[u8], proto: u8) -> bool {
        let ihl = usize::from(p[0] & 15) * 4;
        let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
        csum(&[&pseudo(p, proto), &p[ihl..total]]) == 0
    }

    pub(super) struct Tcp {
        pub(super) id: u16,
        pub(super) seq: u32,
        pub(super) flags: u8,
        pub(super) ip_options: Vec<u8>,
        pub(super) tcp_options: Vec<u8>,
        pub(super) df: bool,
        pub(super) ports: (u16, u16),
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
    pub(super) fn tcp_packet(t: &Tcp, payload: &[u8]) -> Vec<u8> {
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
    pub(super) fn udp_packet(payload: &[u8]) -> Vec<u8> {
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
    pub(super) fn set_partial(p: &mut [u8], proto: u8) {
        let ihl = usize::from(p[0] & 15) * 4;
        let off = ihl + if proto == IPPROTO_TCP { 16 } else { 6 };
        let partial = !csum(&[&pseudo(p, proto)]);
        p[off..off + 2].copy_from_slice(&partial.to_be_bytes());
    }

    /// A TUN read: NEEDS_CSUM header with `gso_type`/`gso_size` and a packet
    /// carrying the pseudo-header sum.
    pub(super) fn tun_read(mut p: Vec<u8>, gso_type: u8, gso_size: u16) -> Vec<u8> {
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

    pub(super) fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Runs a TUN read (a super-packet) through [`from_tun`], on a copy,
    /// with a header buffer of [`HEADER_BUFFER`]; returns the segments as
    /// they go on the wire.
    pub(super) fn split(input: &[u8]) -> Result<(GsoSegments, Vec<Vec<u8>>), DropReason> {
        split_into(input, &mut vec![0; HEADER_BUFFER])
    }

    /// [`split`] with the given header buffer.
    pub(super) fn split_into(
        input: &[u8],
        headers: &mut [u8],
    ) -> Result<(GsoSegments, Vec<Vec<u8>>), DropReason> {
        let mut read = input.to_vec();
        let TunPacket::Segments(s) = from_tun(&mut read, headers)? else {
            panic!("not a super-packet");
        };
        let segments = (0..s.count())
            .map(|i| [s.header(i, headers), s.payload(i, &read)].concat())
            .collect();
        Ok((s, segments))
    }

    /// Runs `packets` (each its own buffer of the batch) through a
    /// coalescer; returns the (vnet header, packet) writes.
    pub(super) fn coalesce(packets: &[Vec<u8>]) -> Vec<(VnetHdr, Vec<u8>)> {
        let mut c = Coalescer::new();
        let mut writes = Vec::new();
        let mut emit = |slices: &[std::io::IoSlice<'_>]| {
            let bytes: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
            let (h, p) = bytes.split_at(VNET_HDR_LEN);
            writes.push((VnetHdr::parse(h).unwrap(), p.to_vec()));
        };
        for (i, p) in packets.iter().enumerate() {
            let at = PacketAt {
                buffer: i,
                range: 0..p.len(),
            };
            c.push(packets, at, &mut emit);
        }
        c.flush(packets, &mut emit);
        assert!(!c.is_pending());
        writes
    }

    pub(super) fn seq_of(p: &[u8]) -> u32 {
        let ihl = usize::from(p[0] & 15) * 4;
        u32::from_be_bytes(p[ihl + 4..ihl + 8].try_into().unwrap())
    }

    pub(super) fn flags_of(p: &[u8]) -> u8 {
        p[usize::from(p[0] & 15) * 4 + 13]
    }

    pub(super) fn tcp_payload(p: &[u8]) -> &[u8] {
        let ihl = usize::from(p[0] & 15) * 4;
        let thl = usize::from(p[ihl + 12] >> 4) * 4;
        let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
        &p[ihl + thl..total]
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use crate::udp::packet;
    use proptest::prelude::*;

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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

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
            let mut headers = vec![0u8; out_len];
            if let Ok(TunPacket::Segments(s)) = from_tun(&mut buf.clone(), &mut headers) {
                prop_assert!(s.count() * s.header_len() <= out_len && s.count() >= 1);
                prop_assert!(s.segment_len() >= 1);
            }
            let _ = from_tun(&mut bytes.clone(), &mut headers);
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
            if buf.get(1).is_some_and(|&t| t != 0)
                && let Ok((s, segments)) = split(&buf)
            {
                prop_assert_eq!(segments.len(), s.count());
                for seg in &segments {
                    prop_assert!(packet::parse(seg).is_ok());
                }
            }
            let _ = from_tun(&mut buf, &mut [0u8; 8000]);
            let _ = coalesce(&[p.clone(), p]);
        }
    }
}
