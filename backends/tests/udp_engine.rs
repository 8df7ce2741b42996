//! Kernel test of the udp packet loop as a whole (`backends::udp::engine`):
//! under steady traffic in both directions, through every path of a worker
//! (a USO super-packet read from the TUN, split and sent with GSO; a GRO
//! batch of datagrams received and written one by one; a GRO batch of TCP
//! segments merged into one super-packet; small packets read and sent in
//! place), the process allocates nothing per packet.
//!
//! Root only: it fails, never skips, without it. It makes one namespace
//! `fue<pid>x<n>` (deleted by a guard) with the engine's TUN `fue0`
//! (10.244.1.0/32, 10.244.0.0/16 routed into it) and a "peer" UDP socket on
//! loopback that owns 10.244.2.0/24; all traffic stays in the namespace.
//! Allocations are counted process-wide (`stats_alloc`), so this file holds
//! this one test and its traffic loop allocates nothing itself.
#![allow(clippy::unwrap_used)]

mod common;

use std::alloc::System;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use backends::udp::engine::{Counters, Engine, EngineConfig};
use backends::udp::peers::PeerTable;
use backends::udp::sys::{self, SendBatch};
use common::{Ns, fold, sum16};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static ALLOCATOR: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const TUN: &str = "fue0";
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 0);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 9);
const ENGINE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8285);
const PEER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9285);
/// Local ports: the app's sender, its UDP receiver, a TCP port nobody listens on.
const APP_TX: u16 = 7000;
const APP_RX: u16 = 7001;
const TCP_PORT: u16 = 7002;
/// Datagrams (or TCP segments) per train, bytes of payload in each.
const TRAIN: usize = 10;
const SEGMENT: usize = 1200;
const WARM_UP_ROUNDS: usize = 20;
const ROUNDS: usize = 300;

/// The sockets and buffers of the traffic loop, made before counting starts.
struct Traffic {
    app_tx: UdpSocket,
    app_rx: UdpSocket,
    peer: UdpSocket,
    send: SendBatch,
    /// What the app sends: one GSO train to REMOTE.
    app_train: Vec<u8>,
    /// What the peer sends: inner UDP packets to APP_RX, inner TCP segments
    /// (one flow, consecutive) to TCP_PORT; one GSO train each.
    udp_train: Vec<u8>,
    tcp_train: Vec<u8>,
    buf: Vec<u8>,
    /// TCP resets that came back to the peer (the kernel answers each
    /// super-packet to a closed port with one).
    resets: usize,
}

impl Traffic {
    /// One round: the app's train goes out through the engine to the peer,
    /// and the peer's two trains come in through the engine; waits until
    /// every datagram arrived where it should.
    fn round(&mut self) {
        let to_remote = SocketAddrV4::new(REMOTE, 9);
        let sent = self
            .send
            .send(
                &self.app_tx,
                &[(&self.app_train[..], to_remote, Some(seg16(SEGMENT)))],
            )
            .unwrap();
        assert_eq!(sent, 1);
        let mut udp_seen = 0;
        while udp_seen < TRAIN {
            let n = self
                .peer
                .recv(&mut self.buf)
                .expect("the app's datagrams reach the peer");
            match self.buf.get(9) {
                Some(17) => {
                    assert_eq!(n, 28 + SEGMENT, "one inner UDP packet per datagram");
                    udp_seen += 1;
                }
                Some(6) => self.resets += 1,
                other => panic!("unexpected inner protocol {other:?}"),
            }
        }
        let inner_len = seg16(28 + SEGMENT);
        let tcp_len = seg16(40 + SEGMENT);
        let sent = self
            .send
            .send(
                &self.peer,
                &[
                    (&self.udp_train[..], ENGINE, Some(inner_len)),
                    (&self.tcp_train[..], ENGINE, Some(tcp_len)),
                ],
            )
            .unwrap();
        assert_eq!(sent, 2);
        for _ in 0..TRAIN {
            let n = self
                .app_rx
                .recv(&mut self.buf)
                .expect("the peer's datagrams reach the app");
            assert_eq!(n, SEGMENT);
        }
    }

    /// Collects the resets still on their way (at most `wait` for each).
    fn drain_resets(&mut self, wait: Duration) {
        self.peer.set_read_timeout(Some(wait)).unwrap();
        while let Ok(n) = self.peer.recv(&mut self.buf) {
            if n >= 20 && self.buf[9] == 6 {
                self.resets += 1;
            }
        }
        self.peer
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
    }
}

fn seg16(n: usize) -> u16 {
    u16::try_from(n).unwrap()
}

/// `count` inner IPv4 packets back to back, each `header` + `SEGMENT` bytes
/// of payload, made by `packet(i)`.
fn train(count: usize, packet: impl Fn(usize) -> Vec<u8>) -> Vec<u8> {
    (0..count).flat_map(packet).collect()
}

/// An IPv4 header (no options) from REMOTE to LOCAL with a valid checksum.
fn ipv4(protocol: u8, id: u16, payload_len: usize) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&seg16(20 + payload_len).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&[0x40, 0, 64, protocol, 0, 0]);
    h.extend_from_slice(&REMOTE.octets());
    h.extend_from_slice(&LOCAL.octets());
    let c = !fold(sum16(&h, 0));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// The L4 checksum of `l4` (checksum field zero) from REMOTE to LOCAL.
fn l4_checksum(protocol: u8, l4: &[u8]) -> u16 {
    let mut pseudo = REMOTE.octets().to_vec();
    pseudo.extend_from_slice(&LOCAL.octets());
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(&seg16(l4.len()).to_be_bytes());
    !fold(sum16(l4, sum16(&pseudo, 0)))
}

fn udp_packet(i: usize) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&9u16.to_be_bytes());
    l4.extend_from_slice(&APP_RX.to_be_bytes());
    l4.extend_from_slice(&seg16(8 + SEGMENT).to_be_bytes());
    l4.extend_from_slice(&[0, 0]);
    l4.extend(std::iter::repeat_n(u8::try_from(i).unwrap(), SEGMENT));
    let c = l4_checksum(17, &l4);
    l4[6..8].copy_from_slice(&c.to_be_bytes());
    let mut p = ipv4(17, seg16(i), l4.len());
    p.extend_from_slice(&l4);
    p
}

fn tcp_segment(i: usize) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&9u16.to_be_bytes());
    l4.extend_from_slice(&TCP_PORT.to_be_bytes());
    let seq = 1000 + u32::try_from(i * SEGMENT).unwrap();
    l4.extend_from_slice(&seq.to_be_bytes());
    l4.extend_from_slice(&1u32.to_be_bytes());
    l4.extend_from_slice(&[0x50, 0x10, 0x10, 0x00, 0, 0, 0, 0]);
    l4.extend(std::iter::repeat_n(u8::try_from(i).unwrap(), SEGMENT));
    let c = l4_checksum(6, &l4);
    l4[16..18].copy_from_slice(&c.to_be_bytes());
    let mut p = ipv4(6, seg16(100 + i), l4.len());
    p.extend_from_slice(&l4);
    p
}

#[test]
fn steady_traffic_allocates_nothing_per_packet() {
    let (_, guard) = Ns::create(
        "fue",
        "the udp engine kernel test needs root (network namespaces, TUN); run it as root",
    );
    guard.run_inside(Some(Duration::from_secs(120)), |ns| {
        let counters = Arc::new(Counters::default());
        let config = EngineConfig {
            tun_name: TUN.to_owned(),
            bind: ENGINE,
            mtu: 1472,
            workers: 1,
            batch: 64,
            offload: true,
        };
        let engine = Engine::start(&config, Arc::clone(&counters)).unwrap();
        ns.ip(&["addr", "add", &format!("{LOCAL}/32"), "dev", TUN]);
        ns.ip(&["link", "set", TUN, "mtu", "1472", "up"]);
        ns.ip(&["route", "add", "10.244.0.0/16", "dev", TUN]);
        engine.set_tun_addr(LOCAL);
        let mut peers = PeerTable::new();
        peers.upsert("10.244.2.0/24".parse().unwrap(), PEER);
        engine.set_peers(peers);

        let timeout = Some(Duration::from_secs(5));
        let app_rx = UdpSocket::bind(SocketAddrV4::new(LOCAL, APP_RX)).unwrap();
        app_rx.set_read_timeout(timeout).unwrap();
        let peer = UdpSocket::bind(PEER).unwrap();
        peer.set_read_timeout(timeout).unwrap();
        let mut traffic = Traffic {
            app_tx: sys::udp_socket(SocketAddrV4::new(LOCAL, APP_TX), false).unwrap(),
            app_rx,
            peer,
            send: SendBatch::new(2),
            app_train: vec![0x5a; TRAIN * SEGMENT],
            udp_train: train(TRAIN, udp_packet),
            tcp_train: train(TRAIN, tcp_segment),
            buf: vec![0; 65536],
            resets: 0,
        };
        for _ in 0..WARM_UP_ROUNDS {
            traffic.round();
        }
        traffic.drain_resets(Duration::from_millis(200));
        traffic.resets = 0;

        let region = Region::new(ALLOCATOR);
        for _ in 0..ROUNDS {
            traffic.round();
        }
        traffic.drain_resets(Duration::from_millis(200));
        let change = region.change();

        let packets = ROUNDS * TRAIN * 3;
        eprintln!(
            "{packets} packets: {} allocations, {} reallocations, {} TCP resets",
            change.allocations, change.reallocations, traffic.resets
        );
        assert_eq!(
            (change.allocations, change.reallocations),
            (0, 0),
            "the engine allocated while moving {packets} packets"
        );
        // Each TCP train reached the kernel as one merged super-packet, which
        // a closed port answers with one reset.
        assert_eq!(traffic.resets, ROUNDS, "one reset per merged TCP train");
        assert!(counters.received.load(std::sync::atomic::Ordering::Relaxed) > 0);
    });
}
