//! The netlink layer's error type.

use std::io;
use std::time::Duration;

use subnet::lease::MacAddr;

/// A failed netlink (or ethtool, or sysctl) operation, with enough context to
/// act on it from the log alone: the operation in iproute2 terms (which names
/// the device and the addresses), and the kernel's own words when it gave any.
///
/// "Not found" when deleting is never an error: deletes are idempotent.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// [`Netlink::connect`](super::Netlink::connect) was called outside a tokio runtime.
    #[error("no tokio runtime: the netlink connection task needs one")]
    NoRuntime,
    /// The netlink socket could not be opened or configured.
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] io::Error),
    /// The kernel refused the request.
    #[error("{op}: {}", kernel_text(.errno, .detail))]
    Kernel {
        /// The operation, as the iproute2 command that does the same.
        op: String,
        /// The (positive) errno, e.g. 101 for ENETUNREACH.
        errno: i32,
        /// The kernel's extended ACK message, e.g. "Nexthop has invalid gateway".
        detail: Option<String>,
    },
    /// The netlink connection task ended (the socket failed or the
    /// [`Netlink`](super::Netlink) is being dropped).
    #[error("{op}: the netlink connection is closed")]
    ConnectionClosed {
        /// The operation.
        op: String,
    },
    /// The kernel did not answer in time (its reply may have been lost to a
    /// receive-buffer overrun); the operation may or may not have happened.
    #[error("{op}: no reply from the kernel within {timeout:?}")]
    Timeout {
        /// The operation.
        op: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The kernel's answer did not make sense (lost or unexpected replies, a
    /// dump that kept being interrupted by concurrent changes).
    #[error("{op}: {detail}")]
    Protocol {
        /// The operation.
        op: String,
        /// What went wrong.
        detail: String,
    },
    /// The link disappeared between creating (or finding) it and using it.
    #[error("{op}: link {device} not found")]
    LinkNotFound {
        /// The operation.
        op: String,
        /// The link's name or index.
        device: String,
    },
    /// The kernel's MAC on a freshly created device is not the one we set:
    /// something (usually udev/systemd-networkd `MACAddressPolicy=persistent`)
    /// rewrote it, and peers would program the wrong MAC (flannel#1795).
    #[error(
        "{device}: the kernel reports MAC {}, not the {wanted} we set; something rewrote it \
         (udev/systemd MACAddressPolicy? add a .link file with MACAddressPolicy=none for {device})",
        .actual.map_or_else(|| "none".to_owned(), |m| m.to_string())
    )]
    MacMismatch {
        /// The device.
        device: String,
        /// The MAC we set.
        wanted: MacAddr,
        /// The MAC the kernel reports.
        actual: Option<MacAddr>,
    },
    /// A local I/O operation failed (e.g. writing a sysctl).
    #[error("{op}: {source}")]
    Io {
        /// The operation.
        op: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `ethtool` is not installed.
    #[error(
        "cannot change TX checksum offload on {device}: ethtool is not installed \
         (install the ethtool package, or set TxChecksumOffload back to true)"
    )]
    EthtoolMissing {
        /// The device.
        device: String,
    },
    /// `ethtool` failed.
    #[error("ethtool -K {device} tx-checksum-ip-generic {state}: {detail}")]
    Ethtool {
        /// The device.
        device: String,
        /// `on` or `off`.
        state: &'static str,
        /// Exit status and stderr, or the reason it could not run.
        detail: String,
    },
}

impl NetlinkError {
    /// The kernel's errno, if the kernel refused the operation.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

fn kernel_text(errno: &i32, detail: &Option<String>) -> String {
    let base = io::Error::from_raw_os_error(*errno);
    match detail {
        Some(detail) => format!("{base}: {detail}"),
        None => base.to_string(),
    }
}
