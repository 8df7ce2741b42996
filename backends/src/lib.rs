//! Data-path backends of flanneld.
//!
//! A backend never sees the lease store: the daemon hands it this node's
//! lease and the peers' lease events. This crate depends on the `subnet`
//! crate's types only, never on etcd, so a backend can run from any lease
//! source.
//!
//! - [`vxlan`]: kernel VXLAN through netlink;
//! - [`udp`]: flannel's UDP encapsulation over TUN, in userspace.

use std::future::Future;
use std::net::Ipv4Addr;

use subnet::lease::Lease;
use subnet::watch::{LeaseEvent, SharedLease};

pub mod udp;
pub mod vxlan;

/// The external (underlay) interface a backend sends through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Interface MTU.
    pub mtu: u32,
    /// The address published to peers (and the tunnel's local address).
    pub public_ip: Ipv4Addr,
}

/// Why a backend could not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// A kernel request failed.
    #[error("cannot {what}: {error}")]
    Kernel {
        /// What was being done.
        what: &'static str,
        /// The kernel's (or tool's) error.
        error: String,
    },
    /// Some operations of a batch failed (the rest were applied).
    #[error("{failed} of {total} kernel operations failed; first: {first}")]
    Apply {
        /// How many failed.
        failed: usize,
        /// How many were attempted.
        total: usize,
        /// The first failure, for the log.
        first: String,
    },
    /// Input the backend cannot use.
    #[error("{0}")]
    Invalid(String),
}

/// What every data-path backend does once its device exists. Re-applying
/// the same leases changes nothing (kernel writes are replaces).
pub trait Backend: Send {
    /// Sets this node's own subnet up on the device (after a lease is held,
    /// and again if it changes).
    fn activate(&mut self, own: &Lease) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Makes the kernel match exactly `peers`: missing entries are added and
    /// entries of peers that no longer exist are removed. Returns how many
    /// kernel operations were applied.
    fn resync(
        &mut self,
        peers: Vec<SharedLease>,
    ) -> impl Future<Output = Result<usize, BackendError>> + Send;

    /// Resyncs the kernel with the peers last given (after a failed update).
    fn replay(&mut self) -> impl Future<Output = Result<usize, BackendError>> + Send;

    /// Applies peer changes. Returns how many kernel operations were applied.
    fn apply(
        &mut self,
        events: &[LeaseEvent],
    ) -> impl Future<Output = Result<usize, BackendError>> + Send;

    /// Recreates the device if someone deleted it, and replays every peer.
    /// Returns whether it had to.
    fn recover(&mut self) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// The index of the backend's device.
    fn device_index(&self) -> u32;
}
