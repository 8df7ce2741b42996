//! The pure packet code of `backends::udp` (`packet.rs`, `peers.rs`),
//! compiled on its own: depending on the whole `backends` crate would build
//! tokio and netlink into every fuzz run (about 4 minutes instead of 30 s).

pub mod udp;
