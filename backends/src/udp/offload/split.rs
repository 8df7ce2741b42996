//! TUN -> network: a super-packet read from the TUN cut into wire-ready
//! IPv4 packets for `UDP_SEGMENT` sends, without copying its payload (see
//! the parent module).

use std::ops::Range;

use super::{
    IP_MF_OFFSET, IPPROTO_TCP, IPPROTO_UDP, MAX_UDP_PAYLOAD, TCP_CHECKSUM_OFF, TCP_CWR,
    TCP_DATA_OFF, TCP_FIN, TCP_FLAGS, TCP_MIN_HEADER_LEN, TCP_PSH, TCP_SEQ, UDP_CHECKSUM_OFF,
    UDP_HEADER_LEN, UDP_LEN, VnetHdr, be16, be32, finish, put16, put32,
};
use crate::udp::packet::{
    self, ADDRS_RANGE, CHECKSUM_OFF, DropReason, FRAG_OFF, ID_OFF, TOTAL_LEN_OFF,
    ones_complement_sum,
};
use crate::udp::sys::{
    UDP_MAX_SEGMENTS, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_UDP_L4, VNET_HDR_LEN,
};

/// A super-packet cut into segments by [`from_tun`]. Segment `i` on the
/// wire is its headers ([`GsoSegments::header`]: IPv4 and TCP/UDP, written
/// into the caller's header buffer) followed by its payload
/// ([`GsoSegments::payload`]: a slice of the TUN read, never copied).
/// Every segment but the last is [`GsoSegments::segment_len`] bytes, so one
/// `sendmsg` with `UDP_SEGMENT` carries a run of them ([`GsoSegments::parts`]
/// lists its slices, [`GsoSegments::batches`] cuts the runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GsoSegments {
    header_len: usize,
    payload_start: usize,
    payload_end: usize,
    gso_size: usize,
    count: usize,
}

impl GsoSegments {
    /// Number of segments (at least 1).
    pub fn count(&self) -> usize {
        self.count
    }

    /// Bytes of headers each segment has.
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// Wire length of every segment but the last (which may be shorter).
    pub fn segment_len(&self) -> usize {
        self.header_len + self.gso_size.min(self.payload_end - self.payload_start)
    }

    /// Wire length of all segments together.
    pub fn wire_len(&self) -> usize {
        self.count * self.header_len + (self.payload_end - self.payload_start)
    }

    /// The headers of segment `i` in the header buffer given to [`from_tun`]
    /// (empty for `i >= count`).
    pub fn header<'a>(&self, i: usize, headers: &'a [u8]) -> &'a [u8] {
        let start = i.saturating_mul(self.header_len);
        headers.get(start..start + self.header_len).unwrap_or(&[])
    }

    /// The payload of segment `i` in the TUN read given to [`from_tun`]
    /// (empty for `i >= count`).
    pub fn payload<'a>(&self, i: usize, read: &'a [u8]) -> &'a [u8] {
        let start = self
            .payload_start
            .saturating_add(i.saturating_mul(self.gso_size))
            .min(self.payload_end);
        let end = start.saturating_add(self.gso_size).min(self.payload_end);
        read.get(start..end).unwrap_or(&[])
    }

    /// The slices of segments `segments`, in wire order (header, payload,
    /// header, payload...): one `iovec` each.
    pub fn parts<'a>(
        self,
        segments: Range<usize>,
        headers: &'a [u8],
        read: &'a [u8],
    ) -> impl Iterator<Item = &'a [u8]> + Clone + 'a {
        segments.flat_map(move |i| [self.header(i, headers), self.payload(i, read)])
    }

    /// Cuts the segments into sends that one `sendmsg` with `UDP_SEGMENT`
    /// takes: at most `max_segments` (clamped to 1..=[`UDP_MAX_SEGMENTS`])
    /// segments and [`MAX_UDP_PAYLOAD`] bytes each. Yields the segment
    /// indices and the segment size to pass (`None` when the send holds a
    /// single datagram, which needs no GSO).
    pub fn batches(&self, max_segments: usize) -> GsoBatches {
        let segment = self.segment_len().max(1);
        let per_send = if u16::try_from(segment).is_ok() {
            (MAX_UDP_PAYLOAD / segment).clamp(1, max_segments.clamp(1, UDP_MAX_SEGMENTS))
        } else {
            1
        };
        GsoBatches {
            next: 0,
            count: self.count,
            per_send,
            segment: u16::try_from(segment).unwrap_or(u16::MAX),
        }
    }
}

/// The sends of one [`GsoSegments`]; see [`GsoSegments::batches`].
#[derive(Debug, Clone)]
pub struct GsoBatches {
    next: usize,
    count: usize,
    per_send: usize,
    segment: u16,
}

impl Iterator for GsoBatches {
    type Item = (Range<usize>, Option<u16>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.count {
            return None;
        }
        let start = self.next;
        let end = start.saturating_add(self.per_send).min(self.count);
        self.next = end;
        let gso = (end - start > 1).then_some(self.segment);
        Some((start..end, gso))
    }
}

/// What to send for one TUN read, as [`from_tun`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunPacket {
    /// One plain packet, at this range of the read buffer (checksum done in
    /// place): send it from there.
    InPlace(Range<usize>),
    /// A super-packet: its segments' headers are in the header buffer, their
    /// payload in the read buffer.
    Segments(GsoSegments),
}

/// Handles one TUN read `buf` (`virtio_net_hdr` + IPv4 packet) without
/// copying its payload.
///
/// A plain packet has its checksum completed in place ([`complete_checksum`])
/// and is returned as a range of `buf`.
///
/// A super-packet (`gso_type` TCPV4, or UDP_L4 for USO) becomes
/// `ceil(payload / gso_size)` segments: their headers are written back to
/// back into `headers`, each a copy of the original headers (IPv4 and TCP
/// options included) with IPv4 total length, ID (+1 per segment, wrapping)
/// and header checksum; TCP sequence number advanced, FIN and PSH kept only
/// on the last segment and CWR only on the first; UDP length; and the L4
/// checksum computed in full over the header and its `gso_size` bytes of
/// payload (the last segment: the rest), whatever the field held. A packet
/// with no more than `gso_size` of payload is one segment. The payload
/// stays in `buf`.
///
/// Errors, with nothing meaningful in `headers`: fewer than 10 bytes
/// ([`DropReason::TooShort`]); what [`packet::parse`] rejects; a `gso_type`
/// other than TCPV4 (with or without ECN) on TCP or UDP_L4 on UDP, `gso_size`
/// 0, a fragment, an L4 header that does not fit, a `NEEDS_CSUM` field outside
/// the packet ([`DropReason::BadHeaderLength`]); `headers` too small for every
/// segment's headers ([`DropReason::Oversize`]; [`HEADER_BUFFER`](super::HEADER_BUFFER)
/// bytes hold them for any `gso_size` at least the header length).
pub fn from_tun(buf: &mut [u8], headers: &mut [u8]) -> Result<TunPacket, DropReason> {
    let hdr = VnetHdr::parse(buf).ok_or(DropReason::TooShort)?;
    if hdr.gso_type != VIRTIO_NET_HDR_GSO_NONE {
        return split_headers(buf, &hdr, headers).map(TunPacket::Segments);
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
        let sum = finish(ones_complement_sum(covered));
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
    if hdr.gso_size == 0 || be16(packet, FRAG_OFF).unwrap_or(0) & IP_MF_OFFSET != 0 {
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

/// The super-packet half of [`from_tun`]: writes every segment's headers.
fn split_headers(buf: &[u8], hdr: &VnetHdr, headers: &mut [u8]) -> Result<GsoSegments, DropReason> {
    let packet = buf.get(VNET_HDR_LEN..).ok_or(DropReason::TooShort)?;
    let sp = check_super(packet, hdr)?;
    let packet = packet.get(..sp.total).ok_or(DropReason::BadTotalLength)?;
    let (template, payload) = packet.split_at(sp.hl);
    let gso = usize::from(hdr.gso_size);
    let count = payload.len().div_ceil(gso).max(1);
    let headers = headers
        .get_mut(..count * sp.hl)
        .ok_or(DropReason::Oversize)?;
    let id = be16(template, ID_OFF).unwrap_or(0);
    let seq = be32(template, sp.ip_hl + TCP_SEQ).unwrap_or(0);
    let flags = template.get(sp.ip_hl + TCP_FLAGS).copied().unwrap_or(0);
    let (proto, checksum_at) = if sp.tcp {
        (IPPROTO_TCP, sp.ip_hl + TCP_CHECKSUM_OFF)
    } else {
        (IPPROTO_UDP, sp.ip_hl + UDP_CHECKSUM_OFF)
    };
    // The part of every L4 checksum that no segment changes.
    let addresses =
        ones_complement_sum(template.get(ADDRS_RANGE).unwrap_or(&[])) + u64::from(proto);

    for (i, (seg, chunk)) in headers
        .chunks_exact_mut(sp.hl)
        .zip(
            payload
                .chunks(gso)
                .chain(payload.is_empty().then_some(&[][..])),
        )
        .enumerate()
    {
        seg.copy_from_slice(template);
        // Both fit 16 bits: hl + chunk <= total <= 65535, i < 65535.
        let ip_len = u16::try_from(sp.hl + chunk.len()).map_err(|_| DropReason::BadTotalLength)?;
        let index = u16::try_from(i).map_err(|_| DropReason::BadTotalLength)?;
        put16(seg, TOTAL_LEN_OFF, ip_len);
        put16(seg, ID_OFF, id.wrapping_add(index));
        put16(seg, CHECKSUM_OFF, 0);
        let ip_sum = packet::internet_checksum(seg.get(..sp.ip_hl).unwrap_or(&[]));
        put16(seg, CHECKSUM_OFF, ip_sum);

        let l4_len = sp.hl - sp.ip_hl + chunk.len();
        if sp.tcp {
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
        } else {
            let udp_len = u16::try_from(l4_len).map_err(|_| DropReason::BadTotalLength)?;
            put16(seg, sp.ip_hl + UDP_LEN, udp_len);
        }
        put16(seg, checksum_at, 0);
        // The payload starts at an even offset of the L4 data (header
        // lengths are multiples of 4), so its sum adds as it is.
        let l4_header = seg.get(sp.ip_hl..).unwrap_or(&[]);
        let sum = addresses
            + u64::try_from(l4_len).unwrap_or(0)
            + ones_complement_sum(l4_header)
            + ones_complement_sum(chunk);
        put16(seg, checksum_at, finish(sum));
    }
    Ok(GsoSegments {
        header_len: sp.hl,
        payload_start: VNET_HDR_LEN + sp.hl,
        payload_end: VNET_HDR_LEN + sp.total,
        gso_size: gso,
        count,
    })
}

#[cfg(test)]
// Test fixtures build small packets with `as` casts of known-small values.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::udp::offload::fixtures::*;
    use crate::udp::offload::{HEADER_BUFFER, VNET_HDR_NONE};

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
        let (split, segs) = split(&input).unwrap();
        let hl = 24 + 32;
        assert_eq!(split.count(), 8);
        assert_eq!(split.header_len(), hl);
        assert_eq!(split.segment_len(), hl + 1400);
        assert_eq!(split.wire_len(), 8 * hl + 10_000);
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
        // What one send of segments 2..5 carries: their bytes, in order.
        let mut read = input.clone();
        let mut headers = vec![0u8; HEADER_BUFFER];
        from_tun(&mut read, &mut headers).unwrap();
        let sent: Vec<u8> = split
            .parts(2..5, &headers, &read)
            .flatten()
            .copied()
            .collect();
        assert_eq!(sent, segs[2..5].concat());
    }

    #[test]
    fn splits_a_udp_super_packet() {
        let payload = pattern(3000, 9);
        let input = tun_read(udp_packet(&payload), VIRTIO_NET_HDR_GSO_UDP_L4, 1200);
        let (split, segs) = split(&input).unwrap();
        assert_eq!(
            (split.count(), split.segment_len(), split.wire_len()),
            (3, 1228, 3084)
        );
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
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
        let (split, segs) = split(&input).unwrap();
        assert_eq!(
            (split.count(), split.segment_len(), split.wire_len()),
            (1, p.len(), p.len())
        );
        assert_eq!(segs, vec![p]);
        let batches: Vec<_> = split.batches(64).collect();
        assert_eq!(batches, vec![(0..1, None)]);
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
        let mut out = vec![0u8; HEADER_BUFFER];
        let split = |b: &[u8], out: &mut [u8]| split_into(b, out).map(|(s, _)| s);
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
        // Header buffer too small, by one byte.
        let need = split(&good, &mut out)
            .map(|s| s.count() * s.header_len())
            .unwrap();
        assert_eq!(
            split(&good, &mut out[..need - 1]),
            Err(DropReason::Oversize)
        );
        assert_eq!(split(&good, &mut out[..need]).map(|s| s.count()), Ok(5));
    }

    #[test]
    fn header_buffer_holds_any_mss_at_least_the_header_length() {
        for (options, gso) in [(vec![], 40u16), (vec![0u8; 40], 80), (vec![], 1)] {
            let hl = 40 + options.len();
            let t = Tcp {
                tcp_options: options,
                ..Tcp::default()
            };
            let payload = pattern(65_535 - hl, 0);
            let input = tun_read(tcp_packet(&t, &payload), VIRTIO_NET_HDR_GSO_TCPV4, gso);
            let got = split(&input).map(|(s, _)| s.count());
            if usize::from(gso) >= hl {
                assert!(got.is_ok(), "{hl} {gso}");
            } else {
                assert_eq!(got, Err(DropReason::Oversize));
            }
        }
    }

    #[test]
    fn batches_respect_segment_and_byte_limits() {
        let segments = |header_len, payload: usize, gso_size| GsoSegments {
            header_len,
            payload_start: 10 + header_len,
            payload_end: 10 + header_len + payload,
            gso_size,
            count: payload.div_ceil(gso_size),
        };
        let split = segments(40, 100 * 960 + 460, 960);
        assert_eq!(split.count(), 101);
        let b: Vec<_> = split.batches(64).collect();
        assert_eq!(b, vec![(0..64, Some(1000)), (64..101, Some(1000))]);
        let split = segments(52, 45 * 1448 + 10, 1448);
        let b: Vec<_> = split.batches(64).collect();
        // 43 * 1500 bytes fit in one datagram's 65507, 44 do not.
        assert_eq!(b, vec![(0..43, Some(1500)), (43..46, Some(1500))]);
        let b: Vec<_> = split.batches(1).collect();
        assert_eq!(b.len(), 46);
        assert!(b.iter().all(|(_, g)| g.is_none()));
        // A run of one at the end needs no GSO.
        let split = segments(52, 43 * 1448 + 10, 1448);
        let b: Vec<_> = split.batches(64).collect();
        assert_eq!(b, vec![(0..43, Some(1500)), (43..44, None)]);
    }
}
