//! Network -> TUN: consecutive TCP segments merged back into super-packets
//! for one TUN write each, without copying their payload (see the parent
//! module).

use std::io::IoSlice;
use std::ops::Range;

use super::{
    IP_DF_BYTE, IP_MF_OFFSET, IPPROTO_TCP, MAX_PACKET, TCP_CHECKSUM_OFF, TCP_CWR, TCP_DATA_OFF,
    TCP_FIN, TCP_FLAGS, TCP_MIN_HEADER_LEN, TCP_PSH, TCP_RST, TCP_SEQ, TCP_SYN, TCP_URG,
    VNET_HDR_NONE, VnetHdr, be16, be32, l4_valid, put16,
};
use crate::udp::packet::{
    self, ADDRS_RANGE, CHECKSUM_OFF, FRAG_OFF, ID_OFF, MIN_HEADER_LEN, TOS_OFF, TOTAL_LEN_OFF,
    TTL_OFF, fold, ones_complement_sum,
};
use crate::udp::sys::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, VNET_HDR_LEN};

/// The most segments one super-packet merges (one `iovec` each, on the
/// stack): as many as one UDP GRO message carries.
pub const MAX_MERGED_SEGMENTS: usize = 64;

/// The longest TCP header (data offset 15).
const TCP_MAX_HEADER_LEN: usize = 60;

/// Where an inner packet is in a receive batch: bytes `range` of buffer
/// `buffer`. The range is the whole IPv4 packet (its total length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketAt {
    /// Index of the buffer in the batch.
    pub buffer: usize,
    /// The packet's bytes in that buffer.
    pub range: Range<usize>,
}

impl PacketAt {
    /// The packet's bytes in `batch` (`None` if it is not there).
    fn resolve<'a, B: AsRef<[u8]>>(&self, batch: &'a [B]) -> Option<&'a [u8]> {
        batch.get(self.buffer)?.as_ref().get(self.range.clone())
    }
}

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
    /// A short or PSH segment, or the segment limit, ended it: nothing more
    /// may follow.
    closed: bool,
}

/// Merges runs of consecutive TCP segments of one flow into TCPv4
/// super-packets for one TUN write each (the receive side of the offload,
/// what the kernel's GRO does for a NIC).
///
/// Feed it the inner IPv4 packets of a receive batch in order with
/// [`Coalescer::push`] and end the batch with [`Coalescer::flush`], passing
/// the same batch of buffers to every call in between (a pending
/// super-packet refers to its segments' payloads where they are). Both call
/// `emit(slices)` for every TUN write that is ready: write the slices with
/// one `writev`; the first begins with the `virtio_net_hdr`.
///
/// A segment joins the pending super-packet when it is the same flow
/// (addresses, ports), the IPv4 header has no options, the same TOS, TTL and
/// DF, and the next ID; the TCP header has the next sequence number, the
/// same length, acknowledgment number, window, urgent pointer, options and
/// flags (PSH may come on the last segment, which ends the super-packet);
/// it carries data, no more than the first segment (a shorter one ends the
/// super-packet); its IPv4 and TCP checksums verify; and the result stays
/// within 65535 bytes and [`MAX_MERGED_SEGMENTS`]. SYN, FIN, RST, URG or CWR
/// segments, fragments, other protocols and anything that does not parse
/// are passed on alone, unchanged, behind [`VNET_HDR_NONE`], as is a run of
/// one.
///
/// Nothing is copied but the first segment's headers (up to 80 bytes); no
/// allocation after [`Coalescer::new`]. Limits: only *consecutive* segments
/// merge (flows interleaved packet by packet are not); TCP over IPv4 only.
pub struct Coalescer {
    /// `virtio_net_hdr` + the first segment's IPv4 and TCP headers, which
    /// become the super-packet's.
    head: [u8; VNET_HDR_LEN + MIN_HEADER_LEN + TCP_MAX_HEADER_LEN],
    /// The whole first segment: written as it is if nothing joins it.
    first: PacketAt,
    /// The payload of every segment, in order.
    payloads: Vec<PacketAt>,
    pending: Option<Pending>,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("pending", &self.pending)
            .finish()
    }
}

impl Default for Coalescer {
    fn default() -> Self {
        Self::new()
    }
}

impl Coalescer {
    /// An empty coalescer.
    pub fn new() -> Coalescer {
        Coalescer {
            head: [0; VNET_HDR_LEN + MIN_HEADER_LEN + TCP_MAX_HEADER_LEN],
            first: PacketAt {
                buffer: 0,
                range: 0..0,
            },
            payloads: Vec::with_capacity(MAX_MERGED_SEGMENTS),
            pending: None,
        }
    }

    /// Whether a super-packet (or a lone TCP segment) is waiting for
    /// [`Coalescer::flush`].
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Takes the next inner packet, at `at` in `batch`; calls `emit` for
    /// what becomes ready (the pending super-packet when this packet does
    /// not continue it, and this packet itself when it cannot be merged at
    /// all). A location outside `batch` is ignored.
    pub fn push<B, F>(&mut self, batch: &[B], at: PacketAt, emit: &mut F)
    where
        B: AsRef<[u8]>,
        F: FnMut(&[IoSlice<'_>]),
    {
        let Some(packet) = at.resolve(batch) else {
            return;
        };
        let Some(seg) = candidate(packet) else {
            self.flush(batch, emit);
            emit(&[IoSlice::new(&VNET_HDR_NONE), IoSlice::new(packet)]);
            return;
        };
        if let Some(p) = self.pending
            && self.can_append(&p, packet, &seg)
        {
            self.append(p, &at, &seg);
        } else {
            self.flush(batch, emit);
            self.start(packet, at, &seg);
        }
        if self.pending.is_some_and(|p| p.closed) {
            self.flush(batch, emit);
        }
    }

    /// Emits the pending super-packet, if any.
    pub fn flush<B, F>(&mut self, batch: &[B], emit: &mut F)
    where
        B: AsRef<[u8]>,
        F: FnMut(&[IoSlice<'_>]),
    {
        let Some(p) = self.pending.take() else {
            return;
        };
        if p.segments == 1 {
            // Untouched: its own checksums are still right.
            if let Some(packet) = self.first.resolve(batch) {
                emit(&[IoSlice::new(&VNET_HDR_NONE), IoSlice::new(packet)]);
            }
            return;
        }
        let mut slices = [IoSlice::new(&[]); 1 + MAX_MERGED_SEGMENTS];
        for (slice, at) in slices[1..].iter_mut().zip(&self.payloads) {
            // Only a caller passing another batch than before could miss.
            let Some(payload) = at.resolve(batch) else {
                return;
            };
            *slice = IoSlice::new(payload);
        }
        let head_len = VNET_HDR_LEN + MIN_HEADER_LEN + p.tcp_hl;
        let Some((vnet, headers)) = self
            .head
            .get_mut(..head_len)
            .and_then(|h| h.split_first_chunk_mut::<VNET_HDR_LEN>())
        else {
            return;
        };
        // p.total <= MAX_PACKET, checked on every append.
        let total = u16::try_from(p.total).unwrap_or(u16::MAX);
        put16(headers, TOTAL_LEN_OFF, total);
        put16(headers, CHECKSUM_OFF, 0);
        let ip_sum = packet::internet_checksum(headers.get(..MIN_HEADER_LEN).unwrap_or(&[]));
        put16(headers, CHECKSUM_OFF, ip_sum);
        // The pseudo-header sum, not complemented: the kernel adds the rest.
        let tcp_len = u64::from(total) - 20;
        let pseudo = fold(
            ones_complement_sum(headers.get(ADDRS_RANGE).unwrap_or(&[]))
                + u64::from(IPPROTO_TCP)
                + tcp_len,
        );
        put16(headers, MIN_HEADER_LEN + TCP_CHECKSUM_OFF, pseudo);
        *vnet = VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: u16::try_from(MIN_HEADER_LEN + p.tcp_hl).unwrap_or(0),
            gso_size: u16::try_from(p.gso_size).unwrap_or(0),
            csum_start: 20,
            csum_offset: 16,
        }
        .to_bytes();
        slices[0] = IoSlice::new(&self.head[..head_len]);
        emit(&slices[..1 + self.payloads.len()]);
    }

    fn start(&mut self, packet: &[u8], at: PacketAt, seg: &Segment) {
        let hl = MIN_HEADER_LEN + seg.tcp_hl;
        let (Some(dst), Some(src)) = (
            self.head.get_mut(VNET_HDR_LEN..VNET_HDR_LEN + hl),
            packet.get(..hl),
        ) else {
            return;
        };
        dst.copy_from_slice(src);
        let start = at.range.start;
        self.payloads.clear();
        self.payloads.push(PacketAt {
            buffer: at.buffer,
            range: start + hl..start + seg.total,
        });
        self.first = PacketAt {
            buffer: at.buffer,
            range: start..start + seg.total,
        };
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
            .head
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
        fi[TOS_OFF] == ti[TOS_OFF]
            && fi[FRAG_OFF] & IP_DF_BYTE == ti[FRAG_OFF] & IP_DF_BYTE
            && fi[TTL_OFF..TTL_OFF + 2] == ti[TTL_OFF..TTL_OFF + 2]
            && fi[ADDRS_RANGE] == ti[ADDRS_RANGE]
            // TCP: ports; ack; data offset; flags but PSH; window; urgent
            // pointer; options (sequence number and checksum differ).
            && ft[..TCP_SEQ] == tt[..TCP_SEQ]
            && ft[8..TCP_FLAGS] == tt[8..TCP_FLAGS]
            && ft[TCP_FLAGS] & !TCP_PSH == tt[TCP_FLAGS] & !TCP_PSH
            && ft[14..TCP_CHECKSUM_OFF] == tt[14..TCP_CHECKSUM_OFF]
            && ft[18..] == tt[18..]
    }

    fn append(&mut self, mut p: Pending, at: &PacketAt, seg: &Segment) {
        let hl = MIN_HEADER_LEN + p.tcp_hl;
        let start = at.range.start;
        self.payloads.push(PacketAt {
            buffer: at.buffer,
            range: start + hl..start + hl + seg.payload,
        });
        if seg.psh
            && let Some(flags) = self.head.get_mut(VNET_HDR_LEN + MIN_HEADER_LEN + TCP_FLAGS)
        {
            *flags |= TCP_PSH;
        }
        p.total += seg.payload;
        p.segments += 1;
        p.next_seq = seg
            .seq
            .wrapping_add(u32::try_from(seg.payload).unwrap_or(0));
        p.next_id = seg.id.wrapping_add(1);
        p.closed = seg.psh || seg.payload < p.gso_size || p.segments == MAX_MERGED_SEGMENTS;
        self.pending = Some(p);
    }
}

/// The TCP segment in `packet` if it may take part in a super-packet:
/// IPv4 without options, not a fragment, TCP with data, no SYN, FIN, RST,
/// URG or CWR, and valid IPv4 and TCP checksums.
fn candidate(packet: &[u8]) -> Option<Segment> {
    let info = packet::parse(packet).ok()?;
    if info.header_len != MIN_HEADER_LEN
        || info.protocol != IPPROTO_TCP
        || be16(packet, FRAG_OFF)? & IP_MF_OFFSET != 0
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
        id: be16(packet, ID_OFF)?,
        psh: flags & TCP_PSH != 0,
    })
}

#[cfg(test)]
// Test fixtures build small packets with `as` casts of known-small values.
#[allow(clippy::cast_possible_truncation, clippy::type_complexity)]
mod tests {
    use super::*;
    use crate::udp::offload::fixtures::*;
    use crate::udp::offload::from_tun;
    use crate::udp::sys::VIRTIO_NET_HDR_GSO_NONE;
    use proptest::prelude::*;

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
        from_tun(&mut buf, &mut []).unwrap();
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
        // 64 KiB is the limit, and so are MAX_MERGED_SEGMENTS.
        let v = flow(70, 1000, &t);
        assert_eq!(count(&v), vec![64, 6]);
        let v = flow(70, 1020, &t);
        assert_eq!(count(&v), vec![64, 6]);
        let v = flow(70, 1100, &t);
        assert_eq!(count(&v), vec![59, 11]);
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
            let (split, segs) = split_into(&input, &mut vec![0u8; count * hl]).unwrap();
            prop_assert_eq!(split.count(), count);
            prop_assert_eq!(split.wire_len(), count * hl + payload_len);
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
            if count > MAX_MERGED_SEGMENTS {
                // The first writes take MAX_MERGED_SEGMENTS segments each.
                prop_assert_eq!(writes.len(), count.div_ceil(MAX_MERGED_SEGMENTS));
                let (h, p) = &writes[0];
                prop_assert_eq!(h.gso_size as usize, mss);
                prop_assert_eq!(p.len(), hl + MAX_MERGED_SEGMENTS * mss);
            } else if count >= 2 && payload_len > 0 {
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
    }
}
