//! The `udp` backend: flannel's wire format (the UDP payload is the inner
//! IPv4 packet) over a TUN device, moved by a batched userspace loop.
//!
//! - [`backend`]: [`backend::UdpBackend`], the device and the peer table;
//! - [`engine`]: the packet loop (worker threads, batches, counters);
//! - [`offload`]: TUN offloads: super-packets read from the TUN split into
//!   wire packets for UDP GSO, received segments merged for the TUN (pure);
//! - [`options`]: the `Backend` keys (`Port`);
//! - [`packet`]: IPv4 checks, TTL, ICMP unreachable (pure);
//! - [`peers`]: the peer table, O(1) lookup by destination (pure);
//! - [`sys`]: the TUN device and batched UDP system calls (all of the
//!   project's `unsafe`).

pub mod backend;
pub mod engine;
pub mod offload;
pub mod options;
pub mod packet;
pub mod peers;
#[allow(unsafe_code)]
pub mod sys;
mod worker;
