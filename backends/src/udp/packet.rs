//! IPv4 checks and rewrites for the `udp` backend's packet loop: pure, no
//! I/O and no allocation; every function works in caller-owned buffers.
//!
//! The loop runs these on both directions, as flannel's router hop does:
//! [`parse`] validates the inner packet (flannel only checks for 20 bytes),
//! [`decrement_ttl`] is the hop itself, and [`icmp_net_unreachable`] builds
//! the answer for a destination no peer owns. Every rejection is a
//! [`DropReason`] the loop counts; no input makes any of them panic.

use std::fmt;
use std::net::Ipv4Addr;
use std::ops::Range;

/// Length of an IPv4 header without options (IHL 5).
pub const MIN_HEADER_LEN: usize = 20;
/// Length of an ICMP error message's own header (type, code, checksum, 4 unused).
pub const ICMP_HEADER_LEN: usize = 8;
/// How many bytes of the offender's data an ICMP error quotes (RFC 792).
pub const ICMP_QUOTED_DATA_LEN: usize = 8;
/// The largest packet [`icmp_net_unreachable`] writes (60-byte offender header).
pub const ICMP_ERROR_MAX_LEN: usize = MIN_HEADER_LEN + ICMP_HEADER_LEN + 60 + ICMP_QUOTED_DATA_LEN;
/// TTL of our ICMP errors: flannel's choice, enough for a few local hops.
pub const ICMP_ERROR_TTL: u8 = 8;
/// IP protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;

// IPv4 header fields, as byte offsets (the offload code uses them too).
pub(crate) const TOS_OFF: usize = 1;
pub(crate) const TOTAL_LEN_OFF: usize = 2;
pub(crate) const ID_OFF: usize = 4;
pub(crate) const FRAG_OFF: usize = 6;
pub(crate) const TTL_OFF: usize = 8;
pub(crate) const PROTOCOL_OFF: usize = 9;
pub(crate) const CHECKSUM_OFF: usize = 10;
pub(crate) const SRC_OFF: usize = 12;
pub(crate) const DST_OFF: usize = 16;
/// The source and destination addresses, together.
pub(crate) const ADDRS_RANGE: Range<usize> = SRC_OFF..DST_OFF + 4;
/// The fragment offset bits of the flags/fragment word.
const FRAG_OFFSET_MASK: u16 = 0x1fff;
/// Don't Fragment, in the flags/fragment word.
const FLAG_DF: u16 = 0x4000;
/// Precedence 6 (internetwork control), which RFC 1812 4.3.2.5 asks for on
/// ICMP errors.
const TOS_INTERNETWORK_CONTROL: u8 = 0xc0;
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_CODE_NET_UNREACHABLE: u8 = 0;

/// Why the loop dropped a packet; one counter per reason.
///
/// [`parse`] and [`decrement_ttl`] return the first five and `TtlExpired`;
/// the peer table ([`super::peers`]) returns `NoRoute`, `UnknownSender` and
/// `SpoofedSource`; the packet loop uses `Oversize` for inner packets larger
/// than the TUN MTU and `SendFailed` for what the kernel refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Fewer bytes than a minimal IPv4 header (20).
    TooShort,
    /// The version field is not 4 (IPv6, or not IP at all).
    NotIpv4,
    /// IHL below 5, or a header longer than the packet's total length.
    BadHeaderLength,
    /// The total length field claims more bytes than arrived (truncated).
    BadTotalLength,
    /// The header checksum does not verify.
    BadChecksum,
    /// TTL 0 or 1: this hop would take it to 0 (flannel drops silently too).
    TtlExpired,
    /// No peer's subnet contains the destination (answered with ICMP).
    NoRoute,
    /// The datagram's source is not any peer's public IP and port.
    UnknownSender,
    /// The inner source address is outside the sending peer's subnet.
    SpoofedSource,
    /// The inner packet is larger than the TUN device accepts.
    Oversize,
    /// The kernel would not take it: socket buffer or TUN queue full, or a
    /// send error (the engine's, counted like the others).
    SendFailed,
}

impl DropReason {
    /// Every reason, in [`DropReason::index`] order.
    pub const ALL: [DropReason; 11] = [
        DropReason::TooShort,
        DropReason::NotIpv4,
        DropReason::BadHeaderLength,
        DropReason::BadTotalLength,
        DropReason::BadChecksum,
        DropReason::TtlExpired,
        DropReason::NoRoute,
        DropReason::UnknownSender,
        DropReason::SpoofedSource,
        DropReason::Oversize,
        DropReason::SendFailed,
    ];

    /// The snake_case name used as a metric label and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::TooShort => "too_short",
            DropReason::NotIpv4 => "not_ipv4",
            DropReason::BadHeaderLength => "bad_header_length",
            DropReason::BadTotalLength => "bad_total_length",
            DropReason::BadChecksum => "bad_checksum",
            DropReason::TtlExpired => "ttl_expired",
            DropReason::NoRoute => "no_route",
            DropReason::UnknownSender => "unknown_sender",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::Oversize => "oversize",
            DropReason::SendFailed => "send_failed",
        }
    }

    /// Position in [`DropReason::ALL`] (`0..ALL.len()`), to index counter arrays.
    pub fn index(self) -> usize {
        // Fieldless enum with default discriminants, declared in ALL's order
        // (a test checks it).
        self as usize
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The fields of a validated IPv4 header that the loop needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Info {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Header length in bytes (IHL * 4, 20 to 60).
    pub header_len: usize,
    /// Total length in bytes; never more than the buffer parsed. Bytes after
    /// it are padding the caller ignores.
    pub total_len: usize,
    /// IP protocol number.
    pub protocol: u8,
    /// Time to live.
    pub ttl: u8,
    /// Whether the fragment offset is 0 (a whole packet or a first fragment).
    pub first_fragment: bool,
}

/// Validates an IPv4 packet and returns its header fields.
///
/// Checks, in order: at least 20 bytes ([`DropReason::TooShort`]), version 4
/// (`NotIpv4`), IHL at least 5 (`BadHeaderLength`), total length within the
/// buffer (`BadTotalLength`), header within the total length
/// (`BadHeaderLength`), header checksum (`BadChecksum`).
pub fn parse(packet: &[u8]) -> Result<Ipv4Info, DropReason> {
    let h = packet
        .first_chunk::<MIN_HEADER_LEN>()
        .ok_or(DropReason::TooShort)?;
    if h[0] >> 4 != 4 {
        return Err(DropReason::NotIpv4);
    }
    let header_len = usize::from(h[0] & 0x0f) * 4;
    if header_len < MIN_HEADER_LEN {
        return Err(DropReason::BadHeaderLength);
    }
    let total_len = usize::from(be16(h, TOTAL_LEN_OFF));
    if total_len > packet.len() {
        return Err(DropReason::BadTotalLength);
    }
    if header_len > total_len {
        return Err(DropReason::BadHeaderLength);
    }
    let header = packet
        .get(..header_len)
        .ok_or(DropReason::BadHeaderLength)?;
    if internet_checksum(header) != 0 {
        return Err(DropReason::BadChecksum);
    }
    Ok(Ipv4Info {
        src: addr_at(h, SRC_OFF),
        dst: addr_at(h, DST_OFF),
        header_len,
        total_len,
        protocol: h[PROTOCOL_OFF],
        ttl: h[TTL_OFF],
        first_fragment: be16(h, FRAG_OFF) & FRAG_OFFSET_MASK == 0,
    })
}

/// Does the router hop: TTL minus one, and the header checksum patched
/// incrementally (RFC 1624, eqn. 3), which gives exactly the checksum a full
/// recomputation would.
///
/// Meant for a packet [`parse`] accepted. TTL 0 or 1 is
/// [`DropReason::TtlExpired`] and leaves the packet untouched; fewer than 20
/// bytes is `TooShort`.
pub fn decrement_ttl(packet: &mut [u8]) -> Result<(), DropReason> {
    let h = packet
        .first_chunk_mut::<MIN_HEADER_LEN>()
        .ok_or(DropReason::TooShort)?;
    let ttl = h[TTL_OFF];
    if ttl <= 1 {
        return Err(DropReason::TtlExpired);
    }
    // TTL shares its 16-bit checksum word with the protocol byte.
    let old_word = be16(h, TTL_OFF);
    let new_word = u16::from_be_bytes([ttl - 1, h[PROTOCOL_OFF]]);
    let checksum = update_checksum(be16(h, CHECKSUM_OFF), old_word, new_word);
    h[TTL_OFF] = ttl - 1;
    put16(h, CHECKSUM_OFF, checksum);
    Ok(())
}

/// Writes into `out` an ICMP destination unreachable, net unreachable
/// (type 3, code 0) from `src` back to the source of `offending`, and
/// returns its length (at most [`ICMP_ERROR_MAX_LEN`]).
///
/// The packet is what flannel sends: TTL 8, payload the offender's IP
/// header and first 8 data bytes, valid IP and ICMP checksums; TOS 0xc0
/// (RFC 1812 4.3.2.5) and DF set (so the zero ID is fine, RFC 6864).
///
/// Returns `None` and writes nothing when RFC 1812 4.3.2.7 forbids an error:
/// the offender is an ICMP error message (types 3, 4, 5, 11, 12), a non-first
/// fragment, has a source that names no single host (0/8, loopback,
/// multicast, 240/4) or a multicast or broadcast destination; also when it
/// does not [`parse`] or `out` is too small. This differs from flannel on
/// purpose: flannel answers no ICMP offender at all, so a ping to a subnet no
/// node owns times out there and gets "Destination Net Unreachable" here.
pub fn icmp_net_unreachable(offending: &[u8], src: Ipv4Addr, out: &mut [u8]) -> Option<usize> {
    let info = parse(offending).ok()?;
    if !info.first_fragment || !names_one_host(info.src) || is_group(info.dst) {
        return None;
    }
    let data = offending.get(info.header_len..info.total_len)?;
    // An ICMP packet too short to carry a type may be an error: stay silent.
    if info.protocol == IPPROTO_ICMP && data.first().is_none_or(|&t| is_icmp_error(t)) {
        return None;
    }
    let quoted = offending.get(..info.header_len + data.len().min(ICMP_QUOTED_DATA_LEN))?;
    let total_len = MIN_HEADER_LEN + ICMP_HEADER_LEN + quoted.len();
    let total_len_field = u16::try_from(total_len).ok()?;
    let out = out.get_mut(..total_len)?;
    let (ip, icmp) = out.split_first_chunk_mut::<MIN_HEADER_LEN>()?;
    let (icmp_header, icmp_payload) = icmp.split_first_chunk_mut::<ICMP_HEADER_LEN>()?;

    *ip = [0; MIN_HEADER_LEN];
    ip[0] = 0x45;
    ip[TOS_OFF] = TOS_INTERNETWORK_CONTROL;
    put16(ip, TOTAL_LEN_OFF, total_len_field);
    put16(ip, FRAG_OFF, FLAG_DF);
    ip[TTL_OFF] = ICMP_ERROR_TTL;
    ip[PROTOCOL_OFF] = IPPROTO_ICMP;
    put_addr(ip, SRC_OFF, src);
    put_addr(ip, DST_OFF, info.src);
    let ip_checksum = internet_checksum(ip);
    put16(ip, CHECKSUM_OFF, ip_checksum);

    // Checksum 0 until computed; the 4 bytes after it are unused for code 0
    // (RFC 792).
    *icmp_header = [0; ICMP_HEADER_LEN];
    icmp_header[0] = ICMP_DEST_UNREACHABLE;
    icmp_header[1] = ICMP_CODE_NET_UNREACHABLE;
    // Same length by construction: total_len was sized from `quoted`.
    icmp_payload.copy_from_slice(quoted);
    let [c0, c1] = internet_checksum(icmp).to_be_bytes();
    [icmp[2], icmp[3]] = [c0, c1];
    Some(total_len)
}

/// The Internet checksum (RFC 1071) of `data`: the one's complement of the
/// one's complement sum of its 16-bit big-endian words, an odd last byte
/// padded with zero. Over a header that holds a correct checksum it is 0.
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(ones_complement_sum(data))
}

/// The value an IPv4 header's checksum field must hold: [`internet_checksum`]
/// of `header` with its checksum field (bytes 10 and 11) counted as zero.
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let before = header.get(..CHECKSUM_OFF).unwrap_or(header);
    let after = header.get(CHECKSUM_OFF + 2..).unwrap_or(&[]);
    !fold(ones_complement_sum(before) + ones_complement_sum(after))
}

/// Patches a checksum after one 16-bit word of the covered data changed from
/// `old` to `new` (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`).
pub fn update_checksum(checksum: u16, old: u16, new: u16) -> u16 {
    !fold(u64::from(!checksum) + u64::from(!old) + u64::from(new))
}

/// One's complement sum of `data` as big-endian 16-bit words (an odd last
/// byte padded with zero), as a value to add to other such sums and
/// [`fold`].
///
/// The offload code sums whole 64 KiB super-packets with it, so it is built
/// for speed: it adds little-endian 32-bit words into eight 64-bit lanes
/// (no carries to handle before 2^32 additions; the compiler vectorizes the
/// loop), folds, and swaps the two bytes of the result. A sum of
/// byte-swapped words is the byte-swapped sum (swapping is multiplying by
/// 256 modulo 0xffff), so that equals the big-endian sum modulo 0xffff, and
/// it is 0 only for all-zero data, as the big-endian sum is.
pub(crate) fn ones_complement_sum(data: &[u8]) -> u64 {
    let mut blocks = data.chunks_exact(32);
    let mut lanes = [0u64; 8];
    for block in blocks.by_ref() {
        for (lane, word) in lanes.iter_mut().zip(block.chunks_exact(4)) {
            *lane += u64::from(u32::from_le_bytes([word[0], word[1], word[2], word[3]]));
        }
    }
    let mut sum: u64 = lanes.iter().map(|&l| (l >> 32) + (l & 0xffff_ffff)).sum();
    let mut words = blocks.remainder().chunks_exact(2);
    for w in words.by_ref() {
        sum += u64::from(u16::from_le_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(*last);
    }
    u64::from(fold(sum).swap_bytes())
}

/// Folds the carries of a one's complement sum back into 16 bits.
pub(crate) fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let [.., hi, lo] = sum.to_be_bytes();
    u16::from_be_bytes([hi, lo])
}

fn be16(h: &[u8; MIN_HEADER_LEN], off: usize) -> u16 {
    u16::from_be_bytes([h[off], h[off + 1]])
}

fn addr_at(h: &[u8; MIN_HEADER_LEN], off: usize) -> Ipv4Addr {
    Ipv4Addr::new(h[off], h[off + 1], h[off + 2], h[off + 3])
}

fn put16(h: &mut [u8; MIN_HEADER_LEN], off: usize, value: u16) {
    [h[off], h[off + 1]] = value.to_be_bytes();
}

fn put_addr(h: &mut [u8; MIN_HEADER_LEN], off: usize, addr: Ipv4Addr) {
    [h[off], h[off + 1], h[off + 2], h[off + 3]] = addr.octets();
}

/// ICMP types that are error messages (RFC 1122 3.2.2): never answered.
fn is_icmp_error(icmp_type: u8) -> bool {
    matches!(icmp_type, 3 | 4 | 5 | 11 | 12)
}

/// Whether `addr` can be a source that identifies one host (RFC 1812 4.3.2.7).
fn names_one_host(addr: Ipv4Addr) -> bool {
    let first = addr.octets()[0];
    first != 0 && !addr.is_loopback() && !addr.is_multicast() && first < 240
}

/// Multicast or limited broadcast: nobody in particular to answer for.
fn is_group(addr: Ipv4Addr) -> bool {
    addr.is_multicast() || addr.is_broadcast()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The vectorizable sum folds to what a word-by-word sum folds to.
    #[test]
    fn fast_sum_equals_word_by_word() {
        let reference = |data: &[u8]| {
            let mut sum: u64 = data
                .chunks(2)
                .map(|w| u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
                .sum();
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            sum
        };
        // Lengths around every block and word boundary, and a 64 KiB one.
        for len in (0u32..200).chain([1448, 1449, 65535, 65536]) {
            let data: Vec<u8> = (0..len)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
                .collect();
            assert_eq!(
                u64::from(fold(ones_complement_sum(&data))),
                reference(&data),
                "{len}"
            );
        }
        assert_eq!(fold(ones_complement_sum(&[0xff; 4096])), 0xffff);
        assert_eq!(fold(ones_complement_sum(&[])), 0);
    }

    const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
    const B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);
    const TUN: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 0);

    /// A valid IPv4 packet with `options` (a multiple of 4 bytes) and `data`.
    fn packet(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        protocol: u8,
        ttl: u8,
        options: &[u8],
        data: &[u8],
    ) -> Vec<u8> {
        let header_len = MIN_HEADER_LEN + options.len();
        let total = u16::try_from(header_len + data.len()).unwrap();
        let mut p = vec![0u8; MIN_HEADER_LEN];
        p[0] = 0x40 | u8::try_from(header_len / 4).unwrap();
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[TTL_OFF] = ttl;
        p[PROTOCOL_OFF] = protocol;
        p[SRC_OFF..SRC_OFF + 4].copy_from_slice(&src.octets());
        p[DST_OFF..DST_OFF + 4].copy_from_slice(&dst.octets());
        p.extend_from_slice(options);
        let sum = ipv4_checksum(&p);
        p[CHECKSUM_OFF..CHECKSUM_OFF + 2].copy_from_slice(&sum.to_be_bytes());
        p.extend_from_slice(data);
        p
    }

    fn udp_packet() -> Vec<u8> {
        packet(A, B, 17, 64, &[], b"0123456789abcdef")
    }

    fn set_checksum(p: &mut [u8]) {
        p[CHECKSUM_OFF..CHECKSUM_OFF + 2].fill(0);
        let hl = usize::from(p[0] & 0x0f) * 4;
        let sum = ipv4_checksum(&p[..hl]);
        p[CHECKSUM_OFF..CHECKSUM_OFF + 2].copy_from_slice(&sum.to_be_bytes());
    }

    #[test]
    fn drop_reasons_are_indexed_in_order_with_distinct_names() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert_eq!(r.to_string(), r.as_str());
            assert!(
                r.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            );
        }
        let names: std::collections::HashSet<_> =
            DropReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), DropReason::ALL.len());
    }

    #[test]
    fn parses_a_valid_packet() {
        let p = packet(A, B, 6, 64, &[1, 1, 1, 0], b"xyz");
        let info = parse(&p).unwrap();
        assert_eq!(
            info,
            Ipv4Info {
                src: A,
                dst: B,
                header_len: 24,
                total_len: 27,
                protocol: 6,
                ttl: 64,
                first_fragment: true
            }
        );
    }

    #[test]
    fn trailing_bytes_after_total_length_are_ignored() {
        let mut p = udp_packet();
        let total = p.len();
        p.extend_from_slice(&[0xee; 7]);
        assert_eq!(parse(&p).unwrap().total_len, total);
    }

    #[test]
    fn too_short() {
        let p = udp_packet();
        assert_eq!(parse(&p[..19]), Err(DropReason::TooShort));
        assert_eq!(parse(&[]), Err(DropReason::TooShort));
        assert_eq!(
            decrement_ttl(&mut p.clone()[..19]),
            Err(DropReason::TooShort)
        );
    }

    #[test]
    fn not_ipv4() {
        let mut p = udp_packet();
        p[0] = 0x65;
        assert_eq!(parse(&p), Err(DropReason::NotIpv4));
    }

    #[test]
    fn bad_header_length() {
        let mut p = udp_packet();
        p[0] = 0x44; // IHL 4
        set_checksum(&mut p[..MIN_HEADER_LEN]);
        assert_eq!(parse(&p), Err(DropReason::BadHeaderLength));
        // IHL 15 (60 bytes) in a packet whose total length is 36.
        let mut p = udp_packet();
        p.resize(80, 0);
        p[0] = 0x4f;
        assert_eq!(parse(&p), Err(DropReason::BadHeaderLength));
    }

    #[test]
    fn bad_total_length() {
        let p = udp_packet();
        assert_eq!(parse(&p[..p.len() - 1]), Err(DropReason::BadTotalLength));
        let mut p = udp_packet();
        p[2..4].copy_from_slice(&0xffffu16.to_be_bytes());
        set_checksum(&mut p);
        assert_eq!(parse(&p), Err(DropReason::BadTotalLength));
    }

    #[test]
    fn bad_checksum() {
        let mut p = udp_packet();
        p[SRC_OFF] ^= 0x01;
        assert_eq!(parse(&p), Err(DropReason::BadChecksum));
        let mut p = packet(A, B, 6, 64, &[7, 7, 7, 7], b"");
        p[MIN_HEADER_LEN] = 8; // an option byte is covered too
        assert_eq!(parse(&p), Err(DropReason::BadChecksum));
    }

    #[test]
    fn fragments() {
        let mut p = udp_packet();
        p[FRAG_OFF] = 0x20; // MF only: first fragment
        set_checksum(&mut p);
        assert!(parse(&p).unwrap().first_fragment);
        p[FRAG_OFF + 1] = 1; // offset 8 bytes
        set_checksum(&mut p);
        assert!(!parse(&p).unwrap().first_fragment);
    }

    #[test]
    fn ttl_is_decremented_and_checksum_patched() {
        let mut p = udp_packet();
        decrement_ttl(&mut p).unwrap();
        let info = parse(&p).unwrap();
        assert_eq!(info.ttl, 63);
    }

    #[test]
    fn ttl_expired_leaves_the_packet_untouched() {
        for ttl in [0, 1] {
            let mut p = packet(A, B, 17, ttl, &[], b"data");
            let before = p.clone();
            assert_eq!(decrement_ttl(&mut p), Err(DropReason::TtlExpired));
            assert_eq!(p, before);
        }
        let mut p = packet(A, B, 17, 2, &[], b"data");
        decrement_ttl(&mut p).unwrap();
        assert_eq!(decrement_ttl(&mut p), Err(DropReason::TtlExpired));
    }

    /// Every residue of the checksum, including the ones whose result is
    /// 0x0000 or 0xffff, where a sloppy incremental update goes wrong.
    #[test]
    fn incremental_checksum_matches_full_for_every_checksum_value() {
        let mut p = udp_packet();
        for ttl in [2, 255] {
            for id in 0..=u16::MAX {
                p[TTL_OFF] = ttl;
                p[4..6].copy_from_slice(&id.to_be_bytes());
                set_checksum(&mut p);
                decrement_ttl(&mut p).unwrap();
                assert_eq!(
                    be16(p.first_chunk().unwrap(), CHECKSUM_OFF),
                    ipv4_checksum(&p[..MIN_HEADER_LEN])
                );
            }
        }
    }

    #[test]
    fn checksum_of_odd_length_pads_with_zero() {
        assert_eq!(internet_checksum(&[0x12, 0x34, 0x56]), !0x6834);
        assert_eq!(internet_checksum(&[]), 0xffff);
        assert_eq!(update_checksum(!0x1234, 0x1234, 0x1334), !0x1334);
    }

    fn icmp_reply(offending: &[u8]) -> Option<Vec<u8>> {
        let mut out = [0u8; ICMP_ERROR_MAX_LEN];
        icmp_net_unreachable(offending, TUN, &mut out).map(|n| out[..n].to_vec())
    }

    #[test]
    fn icmp_net_unreachable_quotes_header_and_8_bytes() {
        let offending = packet(A, B, 17, 64, &[1, 1, 1, 1], b"0123456789abcdef");
        let reply = icmp_reply(&offending).unwrap();
        let info = parse(&reply).unwrap();
        assert_eq!(
            (info.src, info.dst, info.protocol, info.ttl),
            (TUN, A, IPPROTO_ICMP, ICMP_ERROR_TTL)
        );
        assert_eq!(info.total_len, reply.len());
        assert_eq!(reply.len(), 20 + 8 + 24 + 8);
        let icmp = &reply[info.header_len..];
        assert_eq!(&icmp[..2], &[3, 0]);
        assert_eq!(&icmp[4..8], &[0; 4]);
        assert_eq!(internet_checksum(icmp), 0);
        assert_eq!(&icmp[8..], &offending[..32]);
    }

    #[test]
    fn icmp_quotes_less_than_8_bytes_of_short_data() {
        let offending = packet(A, B, 17, 64, &[], b"abc");
        let reply = icmp_reply(&offending).unwrap();
        assert_eq!(reply.len(), 20 + 8 + 23);
        assert_eq!(internet_checksum(&reply[20..]), 0);
        assert_eq!(&reply[28..], &offending[..]);
    }

    #[test]
    fn icmp_answers_echo_but_not_icmp_errors() {
        let echo = packet(A, B, IPPROTO_ICMP, 64, &[], &[8, 0, 0, 0, 0, 1, 0, 1]);
        assert!(icmp_reply(&echo).is_some());
        for t in [3, 4, 5, 11, 12] {
            let error = packet(A, B, IPPROTO_ICMP, 64, &[], &[t, 0, 0, 0, 0, 0, 0, 0]);
            assert_eq!(icmp_reply(&error), None, "type {t}");
        }
        let empty_icmp = packet(A, B, IPPROTO_ICMP, 64, &[], &[]);
        assert_eq!(icmp_reply(&empty_icmp), None);
    }

    #[test]
    fn icmp_suppressed_for_fragments_odd_addresses_and_garbage() {
        let mut frag = udp_packet();
        frag[FRAG_OFF + 1] = 1;
        set_checksum(&mut frag);
        assert_eq!(icmp_reply(&frag), None);
        for src in [
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::new(224, 0, 0, 1),
            Ipv4Addr::BROADCAST,
        ] {
            assert_eq!(
                icmp_reply(&packet(src, B, 17, 64, &[], b"x")),
                None,
                "{src}"
            );
        }
        for dst in [Ipv4Addr::new(239, 1, 2, 3), Ipv4Addr::BROADCAST] {
            assert_eq!(
                icmp_reply(&packet(A, dst, 17, 64, &[], b"x")),
                None,
                "{dst}"
            );
        }
        assert_eq!(icmp_reply(&udp_packet()[..10]), None);
    }

    #[test]
    fn icmp_needs_room_and_writes_nothing_without_it() {
        let offending = udp_packet();
        let mut out = [0xaau8; 55];
        assert_eq!(icmp_net_unreachable(&offending, TUN, &mut out), None);
        assert!(out.iter().all(|&b| b == 0xaa));
        let mut out = [0u8; 56];
        assert_eq!(icmp_net_unreachable(&offending, TUN, &mut out), Some(56));
    }

    /// A header with random fields, options and TTL, and a correct checksum.
    fn arb_packet() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<[u8; 20]>(),
            0usize..=10,
            proptest::collection::vec(any::<u8>(), 40),
            proptest::collection::vec(any::<u8>(), 0..32),
        )
            .prop_map(|(mut h, option_words, options, data)| {
                let header_len = MIN_HEADER_LEN + 4 * option_words;
                h[0] = 0x40 | u8::try_from(header_len / 4).unwrap();
                let total = u16::try_from(header_len + data.len()).unwrap();
                h[2..4].copy_from_slice(&total.to_be_bytes());
                let mut p = h.to_vec();
                p.extend_from_slice(&options[..4 * option_words]);
                set_checksum(&mut p);
                p.extend_from_slice(&data);
                p
            })
    }

    proptest! {
        #[test]
        fn decrement_ttl_equals_full_recomputation(mut p in arb_packet()) {
            let before = parse(&p).unwrap();
            match decrement_ttl(&mut p) {
                Ok(()) => {
                    let after = parse(&p).unwrap();
                    prop_assert_eq!(after.ttl, before.ttl - 1);
                    let header = &p[..after.header_len];
                    prop_assert_eq!(be16(p.first_chunk().unwrap(), CHECKSUM_OFF), ipv4_checksum(header));
                }
                Err(e) => {
                    prop_assert_eq!(e, DropReason::TtlExpired);
                    prop_assert!(before.ttl <= 1);
                }
            }
        }

        #[test]
        fn icmp_output_is_valid_for_valid_offenders(p in arb_packet()) {
            let info = parse(&p).unwrap();
            if let Some(reply) = icmp_reply(&p) {
                let r = parse(&reply).unwrap();
                prop_assert_eq!((r.src, r.dst, r.protocol), (TUN, info.src, IPPROTO_ICMP));
                prop_assert_eq!(r.total_len, reply.len());
                prop_assert_eq!(internet_checksum(&reply[20..]), 0);
                let quoted = info.header_len + (info.total_len - info.header_len).min(8);
                prop_assert_eq!(&reply[28..], &p[..quoted]);
            } else {
                prop_assert!(
                    !info.first_fragment
                        || info.protocol == IPPROTO_ICMP
                        || !names_one_host(info.src)
                        || is_group(info.dst)
                );
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let parsed = parse(&bytes);
            if let Ok(info) = parsed {
                prop_assert!(info.header_len <= info.total_len && info.total_len <= bytes.len());
            }
            let mut out = [0u8; ICMP_ERROR_MAX_LEN];
            if let Some(n) = icmp_net_unreachable(&bytes, TUN, &mut out) {
                prop_assert!(parsed.is_ok());
                prop_assert!(parse(&out[..n]).is_ok());
            }
            let _ = icmp_net_unreachable(&bytes, TUN, &mut out[..30]);
            let _ = decrement_ttl(&mut bytes);
        }

        #[test]
        fn small_version_4_headers_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            // Random bytes rarely start with 0x4_; force it to reach the later checks.
            if let Some(b) = bytes.first_mut() {
                *b = 0x40 | (*b & 0x0f);
            }
            let _ = parse(&bytes);
            let mut out = [0u8; ICMP_ERROR_MAX_LEN];
            let _ = icmp_net_unreachable(&bytes, TUN, &mut out);
            let _ = decrement_ttl(&mut bytes);
        }
    }
}
