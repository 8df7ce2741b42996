//! The same module layout as in `backends`, so `super::packet` resolves.

#[path = "../../src/udp/packet.rs"]
pub mod packet;
#[path = "../../src/udp/peers.rs"]
pub mod peers;
