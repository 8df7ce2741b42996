//! Subnet leases for a flannel-compatible overlay network.
//!
//! Everything here reads and writes what flannel (Go) reads and writes, so a
//! node running this code and a node running flannel can share one etcd:
//!
//! - [`config`]: the network config JSON at `<prefix>/config`, with flannel's
//!   defaults and validation.
//! - [`lease`]: the lease key (`10.244.1.0-24`) and value JSON codec.
//! - [`alloc`]: choosing a free subnet (pure).
//! - [`watch`]: turning store events and snapshots into peer events (pure).
//! - [`subnet_env`]: `/run/flannel/subnet.env`, written atomically and read
//!   tolerantly (shared with the CNI plugin).
//! - with feature `manager`: [`store`] (the [`store::LeaseStore`] trait and an
//!   in-memory store) and [`manager`] (acquire, renew, re-acquire, watch peers);
//! - with feature `etcd`: [`etcd`], the store on a real etcd (v3 API).

pub mod alloc;
pub mod config;
pub mod json;
pub mod lease;
pub mod subnet_env;
pub mod watch;

#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "manager")]
pub mod manager;
#[cfg(feature = "manager")]
pub mod store;

pub use config::{BackendKind, NetworkConfig};
pub use lease::{Lease, LeaseAttrs};
