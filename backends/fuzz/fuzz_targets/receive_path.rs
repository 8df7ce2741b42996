//! Fuzzes the `udp` backend's packet checks on arbitrary datagrams, in the
//! receive path's order: `parse`, `check_sender` against a fixed table,
//! `decrement_ttl`, then `icmp_net_unreachable`. Besides "no panic" it
//! asserts what the packet loop relies on (see the asserts).
//!
//! Input: one selector byte, then the datagram. The selector's low bits pick
//! the sender (two peers or a stranger). Random bytes almost never carry a
//! valid checksum or a source in the sender's subnet, so two bits steer the
//! input past those checks to the later steps: bit 6 rewrites the inner
//! source into the sender's first subnet, bit 7 fixes the header checksum.

#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::LazyLock;

use backends_fuzz::udp::packet::{self, DropReason, ICMP_ERROR_MAX_LEN, IPPROTO_ICMP, Ipv4Info};
use backends_fuzz::udp::peers::PeerTable;
use ipnetwork::Ipv4Network;
use libfuzzer_sys::fuzz_target;

/// Two peers, the second with two leases on one address, and a stranger.
const SENDERS: [SocketAddrV4; 3] = [
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 8285),
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 3), 8285),
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 8285),
];
/// Our TUN address, the source of ICMP errors.
const TUN: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 0);

static PEERS: LazyLock<PeerTable> = LazyLock::new(|| {
    let mut t = PeerTable::new();
    for (net, prefix, addr) in [
        (Ipv4Addr::new(10, 244, 1, 0), 24, SENDERS[0]),
        (Ipv4Addr::new(10, 244, 2, 0), 24, SENDERS[1]),
        (Ipv4Addr::new(10, 244, 3, 0), 24, SENDERS[1]),
        (Ipv4Addr::new(10, 244, 4, 128), 25, SENDERS[0]),
    ] {
        t.upsert(Ipv4Network::new(net, prefix).expect("prefix <= 32"), addr);
    }
    t
});

fuzz_target!(|data: &[u8]| {
    let Some((&selector, datagram)) = data.split_first() else {
        return;
    };
    let from = SENDERS[usize::from(selector & 0x3f) % SENDERS.len()];
    let mut steered = datagram.to_vec();
    steer(selector, &mut steered);
    let datagram = steered.as_slice();
    let mut buf = datagram.to_vec();
    let peers = &*PEERS;

    let step = match packet::parse(&buf) {
        Ok(info) => receive(peers, from, &mut buf, info),
        Err(reason) => Err(reason),
    };
    // The composed receive path takes the same decisions.
    let mut again = datagram.to_vec();
    let composed = peers.inbound(from, &mut again, usize::MAX);
    assert_eq!(composed.map(|_| ()), step.map(|_| ()));

    // ICMP net unreachable, as the send path would answer this packet.
    let mut out = [0u8; ICMP_ERROR_MAX_LEN];
    if let Some(n) = packet::icmp_net_unreachable(datagram, TUN, &mut out) {
        let offender = packet::parse(datagram).expect("ICMP only answers parsable packets");
        let reply = packet::parse(&out[..n]).expect("our ICMP error parses");
        assert_eq!((reply.src, reply.dst), (TUN, offender.src));
        assert_eq!((reply.protocol, reply.total_len), (IPPROTO_ICMP, n));
        assert_eq!(packet::internet_checksum(&out[reply.header_len..n]), 0);
        let quoted = offender.header_len + (offender.total_len - offender.header_len).min(8);
        assert_eq!(&out[reply.header_len + 8..n], &datagram[..quoted]);
    }
    // Raw input through the rewriting steps: no panic is the only claim.
    let _ = packet::decrement_ttl(&mut again);
    let _ = packet::icmp_net_unreachable(datagram, TUN, &mut out[..40]);
});

/// The receive steps after a successful parse, asserting each one's contract.
fn receive(
    peers: &PeerTable,
    from: SocketAddrV4,
    buf: &mut [u8],
    info: Ipv4Info,
) -> Result<(), DropReason> {
    assert!(info.header_len >= 20 && info.header_len % 4 == 0);
    assert!(info.header_len <= info.total_len && info.total_len <= buf.len());

    let owns = |p: &backends_fuzz::udp::peers::Peer| p.addr == from && p.subnet.contains(info.src);
    match peers.check_sender(from, info.src) {
        Ok(()) => assert!(peers.iter().any(|p| owns(&p))),
        Err(DropReason::UnknownSender) => assert!(!peers.iter().any(|p| p.addr == from)),
        Err(DropReason::SpoofedSource) => {
            assert!(peers.iter().any(|p| p.addr == from) && !peers.iter().any(|p| owns(&p)));
        }
        Err(other) => panic!("check_sender returned {other:?}"),
    }
    peers.check_sender(from, info.src)?;

    let before = buf.to_vec();
    let packet = &mut buf[..info.total_len];
    match packet::decrement_ttl(packet) {
        Ok(()) => {
            let after = packet::parse(packet).expect("a decremented packet still parses");
            assert_eq!(
                after,
                Ipv4Info {
                    ttl: info.ttl - 1,
                    ..info
                }
            );
            for (i, (a, b)) in before.iter().zip(buf.iter()).enumerate() {
                assert!(a == b || matches!(i, 8 | 10 | 11), "byte {i} changed");
            }
            Ok(())
        }
        Err(reason) => {
            assert_eq!(reason, DropReason::TtlExpired);
            assert!(info.ttl <= 1);
            assert_eq!(before, buf);
            Err(reason)
        }
    }
}

/// Applies the selector's steering bits (see the module doc).
fn steer(selector: u8, buf: &mut [u8]) {
    if selector & 0x40 != 0 {
        if let Some(src) = buf.get_mut(12..15) {
            // 10.244.1.x is the first subnet of peer 0 and of the stranger's
            // guess; 10.244.2.x is peer 1's.
            let third = if (selector & 0x3f) % 3 == 1 { 2 } else { 1 };
            src.copy_from_slice(&[10, 244, third]);
        }
    }
    if selector & 0x80 != 0 {
        let Some(&first) = buf.first() else {
            return;
        };
        let header_len = usize::from(first & 0x0f) * 4;
        if header_len < 20 || header_len > buf.len() {
            return;
        }
        buf[10..12].fill(0);
        let sum = packet::ipv4_checksum(&buf[..header_len]);
        buf[10..12].copy_from_slice(&sum.to_be_bytes());
    }
}
