//! The `udp` backend's peer table: which peer (public IP and port) owns the
//! subnet of an inner destination, and whether a datagram's sender may use
//! the inner source address it carries. Pure: fed by lease events, read by
//! the packet loop without allocating.
//!
//! flannel scans a list per packet; here a lookup masks the destination once
//! per prefix length present and probes a hash map. Every lease of a flannel
//! network has the same length (`SubnetLen`), so that is one mask and one
//! probe; mixed lengths (reservations made by hand) still work, longest
//! prefix first.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{Ipv4Addr, SocketAddrV4};

use ipnetwork::Ipv4Network;

use super::packet::{self, DropReason};

/// One peer node: its leased subnet and where its datagrams come from and go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The peer's subnet (host bits cleared).
    pub subnet: Ipv4Network,
    /// The peer's public IP and UDP port.
    pub addr: SocketAddrV4,
}

/// Peers by subnet (for sending) and by address (for checking senders).
///
/// Cloning gives the loop an immutable snapshot it can swap in per batch.
#[derive(Debug, Clone, Default)]
pub struct PeerTable {
    /// One map per prefix length present, longest prefix first, so the
    /// first hit is the longest-prefix match. Usually exactly one.
    by_prefix: Vec<PrefixMap>,
    /// The subnets each public address serves, for [`PeerTable::check_sender`].
    /// Usually one; several only if leases share a public IP and port.
    by_addr: FastMap<SocketAddrV4, Vec<Ipv4Network>>,
}

/// The peers whose subnets have one prefix length, keyed by network address.
#[derive(Debug, Clone)]
struct PrefixMap {
    prefix: u8,
    /// The netmask of `prefix`, as a u32.
    mask: u32,
    peers: FastMap<u32, Peer>,
}

impl PeerTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the peer for `subnet`, or moves it to `addr` (a lease renewed
    /// with a new public IP). Host bits of `subnet` are ignored.
    pub fn upsert(&mut self, subnet: Ipv4Network, addr: SocketAddrV4) {
        let subnet = normalize(subnet);
        let prefix = subnet.prefix();
        let i = match self.position(prefix) {
            Ok(i) => i,
            Err(i) => {
                let map = PrefixMap {
                    prefix,
                    mask: mask(prefix),
                    peers: FastMap::default(),
                };
                self.by_prefix.insert(i, map);
                i
            }
        };
        let Some(map) = self.by_prefix.get_mut(i) else {
            return; // unreachable: `i` was found or inserted just above
        };
        let old = map
            .peers
            .insert(u32::from(subnet.network()), Peer { subnet, addr });
        match old {
            Some(old) if old.addr == addr => {}
            Some(old) => {
                self.unlink(old);
                self.by_addr.entry(addr).or_default().push(subnet);
            }
            None => self.by_addr.entry(addr).or_default().push(subnet),
        }
    }

    /// Removes the peer for `subnet` (host bits ignored); whether there was one.
    pub fn remove(&mut self, subnet: Ipv4Network) -> bool {
        let subnet = normalize(subnet);
        let Ok(i) = self.position(subnet.prefix()) else {
            return false;
        };
        let Some(map) = self.by_prefix.get_mut(i) else {
            return false;
        };
        let Some(old) = map.peers.remove(&u32::from(subnet.network())) else {
            return false;
        };
        if map.peers.is_empty() {
            self.by_prefix.remove(i);
        }
        self.unlink(old);
        true
    }

    /// Where to send a packet for `dst`: the address of the peer with the
    /// longest subnet containing it.
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<SocketAddrV4> {
        let dst = u32::from(dst);
        self.by_prefix
            .iter()
            .find_map(|m| m.peers.get(&(dst & m.mask)))
            .map(|p| p.addr)
    }

    /// Whether a datagram from `from` may carry a packet from `inner_src`:
    /// [`DropReason::UnknownSender`] if `from` is no peer's public IP and
    /// port, [`DropReason::SpoofedSource`] if `inner_src` is in none of the
    /// subnets leased with that address.
    pub fn check_sender(&self, from: SocketAddrV4, inner_src: Ipv4Addr) -> Result<(), DropReason> {
        let subnets = self.by_addr.get(&from).ok_or(DropReason::UnknownSender)?;
        if subnets.iter().any(|s| s.contains(inner_src)) {
            Ok(())
        } else {
            Err(DropReason::SpoofedSource)
        }
    }

    /// The receive path for one datagram from `from`, in place: size, header,
    /// sender, TTL. Returns how many bytes of `datagram` to write to the TUN
    /// (its IP total length), or why to drop it. `max_len` is the largest
    /// inner packet the TUN takes (its MTU); a longer datagram is
    /// [`DropReason::Oversize`].
    pub fn inbound(
        &self,
        from: SocketAddrV4,
        datagram: &mut [u8],
        max_len: usize,
    ) -> Result<usize, DropReason> {
        if datagram.len() > max_len {
            return Err(DropReason::Oversize);
        }
        let info = packet::parse(datagram)?;
        self.check_sender(from, info.src)?;
        packet::decrement_ttl(datagram)?;
        Ok(info.total_len)
    }

    /// The send path for one packet read from the TUN, in place: header,
    /// route, TTL (flannel's order: an unroutable packet is answered with
    /// ICMP whatever its TTL). Returns the peer to send to and how many bytes
    /// of `packet` to send, or why to drop it; on [`DropReason::NoRoute`] the
    /// caller may answer with [`packet::icmp_net_unreachable`].
    pub fn outbound(&self, packet: &mut [u8]) -> Result<(SocketAddrV4, usize), DropReason> {
        let info = packet::parse(packet)?;
        let peer = self.lookup(info.dst).ok_or(DropReason::NoRoute)?;
        packet::decrement_ttl(packet)?;
        Ok((peer, info.total_len))
    }

    /// How many peers there are.
    pub fn len(&self) -> usize {
        self.by_prefix.iter().map(|m| m.peers.len()).sum()
    }

    /// Whether there are no peers.
    pub fn is_empty(&self) -> bool {
        self.by_prefix.is_empty()
    }

    /// Every peer, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = Peer> + '_ {
        self.by_prefix
            .iter()
            .flat_map(|m| m.peers.values().copied())
    }

    /// Where the map for `prefix` is (`Ok`) or belongs (`Err`) in
    /// `by_prefix`, which is sorted longest first: hence the reversed compare.
    fn position(&self, prefix: u8) -> Result<usize, usize> {
        self.by_prefix.binary_search_by(|m| prefix.cmp(&m.prefix))
    }

    /// Forgets that `old.addr` serves `old.subnet`.
    fn unlink(&mut self, old: Peer) {
        if let Some(subnets) = self.by_addr.get_mut(&old.addr) {
            subnets.retain(|s| *s != old.subnet);
            if subnets.is_empty() {
                self.by_addr.remove(&old.addr);
            }
        }
    }
}

impl FromIterator<Peer> for PeerTable {
    fn from_iter<I: IntoIterator<Item = Peer>>(peers: I) -> Self {
        let mut table = Self::new();
        for p in peers {
            table.upsert(p.subnet, p.addr);
        }
        table
    }
}

/// `subnet` with its host bits cleared, so `10.0.0.5/24` and `10.0.0.0/24`
/// are one key.
fn normalize(subnet: Ipv4Network) -> Ipv4Network {
    Ipv4Network::new(subnet.network(), subnet.prefix()).unwrap_or(subnet)
}

/// The netmask of a prefix length as a u32 (`/0` is 0, not a shift overflow).
fn mask(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

/// A hash map with [`FastHasher`].
type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// A multiply-rotate hasher for the small integer keys here (addresses and
/// ports), several times cheaper per packet than std's SipHash. No flooding
/// defence is needed: keys come from leases, never from packets, and a
/// lookup never inserts.
#[derive(Debug, Clone, Copy, Default)]
struct FastHasher(u64);

impl FastHasher {
    /// An odd constant with well-spread bits (2^64 / golden ratio).
    const K: u64 = 0x9e37_79b9_7f4a_7c15;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::K);
    }
}

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.add(u64::from(b));
        }
    }

    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn finish(&self) -> u64 {
        // The product's low bits depend only on the key's low bits, which are
        // all zero for subnet addresses; hashbrown picks buckets from the low
        // bits, so bring the well-mixed high bits down.
        self.0.rotate_left(26)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashSet};

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn sa(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn table() -> PeerTable {
        let mut t = PeerTable::new();
        t.upsert(net("10.244.1.0/24"), sa("198.18.0.2:8285"));
        t.upsert(net("10.244.2.0/24"), sa("198.18.0.3:8285"));
        t
    }

    #[test]
    fn lookup_by_subnet() {
        let t = table();
        assert_eq!(t.lookup(ip("10.244.1.77")), Some(sa("198.18.0.2:8285")));
        assert_eq!(t.lookup(ip("10.244.2.0")), Some(sa("198.18.0.3:8285")));
        assert_eq!(t.lookup(ip("10.244.3.1")), None);
        assert_eq!(t.len(), 2);
        assert!(!t.is_empty());
    }

    #[test]
    fn longest_prefix_wins_and_zero_prefix_matches_all() {
        let mut t = table();
        t.upsert(net("10.244.1.128/25"), sa("198.18.0.9:8285"));
        t.upsert(net("0.0.0.0/0"), sa("198.18.0.1:8285"));
        assert_eq!(t.lookup(ip("10.244.1.200")), Some(sa("198.18.0.9:8285")));
        assert_eq!(t.lookup(ip("10.244.1.100")), Some(sa("198.18.0.2:8285")));
        assert_eq!(t.lookup(ip("192.0.2.1")), Some(sa("198.18.0.1:8285")));
    }

    #[test]
    fn upsert_moves_and_remove_forgets() {
        let mut t = table();
        t.upsert(net("10.244.1.9/24"), sa("198.18.0.7:8285")); // host bits ignored
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(ip("10.244.1.1")), Some(sa("198.18.0.7:8285")));
        assert_eq!(
            t.check_sender(sa("198.18.0.2:8285"), ip("10.244.1.1")),
            Err(DropReason::UnknownSender)
        );
        assert_eq!(
            t.check_sender(sa("198.18.0.7:8285"), ip("10.244.1.1")),
            Ok(())
        );
        assert!(t.remove(net("10.244.1.0/24")));
        assert!(!t.remove(net("10.244.1.0/24")));
        assert!(!t.remove(net("10.244.1.0/25")));
        assert_eq!(t.lookup(ip("10.244.1.1")), None);
        assert_eq!(
            t.check_sender(sa("198.18.0.7:8285"), ip("10.244.1.1")),
            Err(DropReason::UnknownSender)
        );
        assert!(t.remove(net("10.244.2.0/24")));
        assert!(t.is_empty());
        assert_eq!(t.iter().count(), 0);
    }

    #[test]
    fn check_sender_needs_ip_and_port_and_own_subnet() {
        let t = table();
        assert_eq!(
            t.check_sender(sa("198.18.0.2:8285"), ip("10.244.1.3")),
            Ok(())
        );
        assert_eq!(
            t.check_sender(sa("198.18.0.2:8285"), ip("10.244.2.3")),
            Err(DropReason::SpoofedSource)
        );
        assert_eq!(
            t.check_sender(sa("198.18.0.2:9999"), ip("10.244.1.3")),
            Err(DropReason::UnknownSender)
        );
        assert_eq!(
            t.check_sender(sa("198.18.0.99:8285"), ip("10.244.1.3")),
            Err(DropReason::UnknownSender)
        );
    }

    #[test]
    fn shared_address_accepts_any_of_its_subnets() {
        let mut t = table();
        t.upsert(net("10.244.5.0/24"), sa("198.18.0.2:8285"));
        assert_eq!(
            t.check_sender(sa("198.18.0.2:8285"), ip("10.244.5.3")),
            Ok(())
        );
        assert_eq!(
            t.check_sender(sa("198.18.0.2:8285"), ip("10.244.1.3")),
            Ok(())
        );
        t.remove(net("10.244.1.0/24"));
        assert_eq!(
            t.check_sender(sa("198.18.0.2:8285"), ip("10.244.1.3")),
            Err(DropReason::SpoofedSource)
        );
        let peers: HashSet<Peer> = t.iter().collect();
        let expected: HashSet<Peer> = [
            Peer {
                subnet: net("10.244.2.0/24"),
                addr: sa("198.18.0.3:8285"),
            },
            Peer {
                subnet: net("10.244.5.0/24"),
                addr: sa("198.18.0.2:8285"),
            },
        ]
        .into();
        assert_eq!(peers, expected);
        assert_eq!(t.iter().collect::<PeerTable>().len(), 2);
    }

    /// An IPv4 packet from `src` to `dst` with a correct header checksum.
    fn ipv4(src: &str, dst: &str, ttl: u8) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 24, 0, 0, 0, 0, ttl, 17, 0, 0];
        p.extend_from_slice(&ip(src).octets());
        p.extend_from_slice(&ip(dst).octets());
        let sum = packet::ipv4_checksum(&p);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p.extend_from_slice(b"data");
        p
    }

    #[test]
    fn inbound_checks_size_sender_source_and_ttl() {
        let t = table();
        let peer = sa("198.18.0.3:8285");
        let mut p = ipv4("10.244.2.5", "10.244.1.5", 64);
        p.extend_from_slice(&[0; 3]); // padding after total length
        assert_eq!(t.inbound(peer, &mut p, 1472), Ok(24));
        assert_eq!(packet::parse(&p).unwrap().ttl, 63);
        assert_eq!(t.inbound(peer, &mut p, 26), Err(DropReason::Oversize));
        assert_eq!(
            t.inbound(peer, &mut p[..10], 1472),
            Err(DropReason::TooShort)
        );
        let mut spoofed = ipv4("10.244.1.9", "10.244.1.5", 64);
        assert_eq!(
            t.inbound(peer, &mut spoofed, 1472),
            Err(DropReason::SpoofedSource)
        );
        let mut stranger = ipv4("10.244.2.5", "10.244.1.5", 64);
        assert_eq!(
            t.inbound(sa("192.0.2.1:8285"), &mut stranger, 1472),
            Err(DropReason::UnknownSender)
        );
        let mut expiring = ipv4("10.244.2.5", "10.244.1.5", 1);
        assert_eq!(
            t.inbound(peer, &mut expiring, 1472),
            Err(DropReason::TtlExpired)
        );
    }

    #[test]
    fn outbound_routes_or_says_no_route() {
        let t = table();
        let mut p = ipv4("10.244.1.5", "10.244.2.5", 64);
        assert_eq!(t.outbound(&mut p), Ok((sa("198.18.0.3:8285"), 24)));
        assert_eq!(packet::parse(&p).unwrap().ttl, 63);
        let mut lost = ipv4("10.244.1.5", "10.244.9.5", 1);
        assert_eq!(t.outbound(&mut lost), Err(DropReason::NoRoute));
        let mut expiring = ipv4("10.244.1.5", "10.244.2.5", 1);
        assert_eq!(t.outbound(&mut expiring), Err(DropReason::TtlExpired));
        p[12] ^= 1;
        assert_eq!(t.outbound(&mut p), Err(DropReason::BadChecksum));
    }

    #[test]
    fn hasher_spreads_subnet_addresses_over_low_bits() {
        use std::hash::BuildHasher;
        let build = BuildHasherDefault::<FastHasher>::default();
        let buckets: HashSet<u64> = (0u32..256)
            .map(|i| build.hash_one(u32::from(Ipv4Addr::new(10, 244, 0, 0)) | (i << 8)) & 0xff)
            .collect();
        assert!(buckets.len() > 128, "{} of 256 buckets", buckets.len());
    }

    /// The model: subnets (normalized) to addresses, scanned linearly.
    type Model = BTreeMap<(u32, u8), SocketAddrV4>;

    fn model_lookup(model: &Model, dst: Ipv4Addr) -> Option<SocketAddrV4> {
        model
            .iter()
            .filter(|((n, p), _)| {
                Ipv4Network::new(Ipv4Addr::from(*n), *p)
                    .unwrap()
                    .contains(dst)
            })
            .max_by_key(|((_, p), _)| *p)
            .map(|(_, a)| *a)
    }

    fn model_check(model: &Model, from: SocketAddrV4, src: Ipv4Addr) -> Result<(), DropReason> {
        let mut own = model.iter().filter(|(_, a)| **a == from).peekable();
        own.peek().ok_or(DropReason::UnknownSender)?;
        if own.any(|((n, p), _)| {
            Ipv4Network::new(Ipv4Addr::from(*n), *p)
                .unwrap()
                .contains(src)
        }) {
            Ok(())
        } else {
            Err(DropReason::SpoofedSource)
        }
    }

    /// Subnets of 10.0.0.0/16 with mixed lengths (so they overlap), plus
    /// the odd /0 and /32, to get hits and longest-prefix ties.
    fn arb_subnet() -> impl Strategy<Value = Ipv4Network> {
        (
            any::<u16>(),
            prop_oneof![8 => 14u8..=28, 1 => Just(0u8), 1 => Just(32u8)],
        )
            .prop_map(|(host, prefix)| {
                Ipv4Network::new(Ipv4Addr::from(0x0a00_0000 | u32::from(host)), prefix).unwrap()
            })
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddrV4> {
        (1u8..=4, prop_oneof![Just(8285u16), Just(9000u16)])
            .prop_map(|(n, port)| SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, n), port))
    }

    fn arb_dst() -> impl Strategy<Value = Ipv4Addr> {
        prop_oneof![
            9 => any::<u16>().prop_map(|h| Ipv4Addr::from(0x0a00_0000 | u32::from(h))),
            1 => any::<u32>().prop_map(Ipv4Addr::from),
        ]
    }

    #[derive(Debug, Clone)]
    enum Op {
        Upsert(Ipv4Network, SocketAddrV4),
        Remove(Ipv4Network),
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (arb_subnet(), arb_addr()).prop_map(|(s, a)| Op::Upsert(s, a)),
            1 => arb_subnet().prop_map(Op::Remove),
        ]
    }

    fn assert_agrees(t: &PeerTable, model: &Model, dsts: &[Ipv4Addr]) -> Result<(), TestCaseError> {
        prop_assert_eq!(t.len(), model.len());
        prop_assert_eq!(t.is_empty(), model.is_empty());
        let peers: BTreeMap<(u32, u8), SocketAddrV4> = t
            .iter()
            .map(|p| ((u32::from(p.subnet.ip()), p.subnet.prefix()), p.addr))
            .collect();
        prop_assert_eq!(&peers, model);
        for &dst in dsts {
            prop_assert_eq!(t.lookup(dst), model_lookup(model, dst), "lookup {}", dst);
            for n in 1..=4 {
                let from = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, n), 8285);
                prop_assert_eq!(t.check_sender(from, dst), model_check(model, from, dst));
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn lookup_agrees_with_a_linear_scan(
            peers in proptest::collection::vec((arb_subnet(), arb_addr()), 0..40),
            dsts in proptest::collection::vec(arb_dst(), 1..40),
        ) {
            let mut t = PeerTable::new();
            let mut model = Model::new();
            for (s, a) in peers {
                t.upsert(s, a);
                model.insert((u32::from(s.network()), s.prefix()), a);
            }
            // Also probe every subnet's own first and last address.
            let mut probes = dsts;
            probes.extend(model.keys().flat_map(|&(n, p)| {
                let s = Ipv4Network::new(Ipv4Addr::from(n), p).unwrap();
                [s.network(), s.broadcast()]
            }));
            assert_agrees(&t, &model, &probes)?;
            assert_agrees(&t.clone(), &model, &probes)?;
        }

        #[test]
        fn upsert_and_remove_keep_lookup_consistent(
            ops in proptest::collection::vec(arb_op(), 0..60),
            dsts in proptest::collection::vec(arb_dst(), 1..16),
        ) {
            let mut t = PeerTable::new();
            let mut model = Model::new();
            for op in ops {
                match op {
                    Op::Upsert(s, a) => {
                        t.upsert(s, a);
                        model.insert((u32::from(s.network()), s.prefix()), a);
                    }
                    Op::Remove(s) => {
                        let had = model.remove(&(u32::from(s.network()), s.prefix())).is_some();
                        prop_assert_eq!(t.remove(s), had);
                    }
                }
                assert_agrees(&t, &model, &dsts)?;
            }
        }
    }
}
