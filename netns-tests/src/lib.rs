//! Cluster tests on `ip netns` nodes with a real etcd.
//!
//! The harness builds, per test, a small cluster that lives entirely in
//! network namespaces it creates itself (see `/work/shared/docs/TESTBED.md`
//! for the rules it follows):
//!
//! - a switch namespace `<p>-sw` with a bridge `br0`, the underlay
//!   `198.18.<k>.0/24` (each cluster locks its own `k`);
//! - etcd 3.4 (one member in `<p>-etcd` at `.2`, or three in `<p>-etcd1..3`
//!   at `.2`..`.4`), see [`EtcdCluster`];
//! - nodes `<p>-n<i>` at `.<10+i>` on `eth0`, each running one flanneld
//!   when asked, see [`Node`];
//! - containers `<p>-n<i>c<j>` on the node's `cni0` bridge, attached by the
//!   real CNI plugin (`target/debug/flannel`), see [`Container`] and
//!   [`cni_exec`].
//!
//! `p` is a prefix `ft<pid>x<n>` unique among live processes. Dropping the
//! [`Cluster`] kills what it started (by PID) and deletes what it created;
//! the first cluster of a process sweeps namespaces left behind by dead
//! processes. Every external command runs with a timeout ([`run`]), and the
//! daemons die with the test process even if it is killed outright.
//!
//! Everything needs root.
//!
//! ```no_run
//! use netns_tests::{Cluster, ClusterSpec};
//! use std::time::Duration;
//!
//! let cluster = Cluster::start(ClusterSpec { nodes: 2, ..ClusterSpec::default() })?;
//! let a = cluster.node(0).add_container()?;
//! let b = cluster.node(1).add_container()?;
//! assert!(a.ping(b.ip(), 3)?.all_received());
//! # Ok::<(), netns_tests::HarnessError>(())
//! ```

mod cluster;
mod cmd;
mod cni;
mod container;
mod error;
mod etcd;
mod names;
mod netns;
mod node;
mod ping;

pub use cluster::{Cluster, ClusterSpec, DEFAULT_NETWORK_CONFIG, KEEP_ENV, SUBNET_ENV_TIMEOUT};
pub use cmd::{EXEC_TIMEOUT, IP_TIMEOUT, describe, ip, log_tail, run, run_ok, run_with_input};
pub use cni::{
    CNI_PLUGIN_ENV, CNI_TIMEOUT, CniCall, CniOutput, HARNESS_NETWORK, cni_exec, cni_plugin_binary,
    flannel_config,
};
pub use container::{BRIDGE, Container};
pub use error::{HarnessError, Result};
pub use etcd::{CLIENT_PORT, DEFAULT_ETCD_PREFIX, ETCD_START_TIMEOUT, EtcdCluster, PEER_PORT};
pub use names::{NAME_PREFIX, is_root, owner_pid, require_root, sweep_stale, unique_prefix};
pub use netns::{list_netns, netns_exec, sysctl};
pub use node::{
    FLANNELD_HEALTHZ_PORT, FLANNELD_RUST_LOG_ENV, Node, UNDERLAY_IFACE, flanneld_binary,
};
pub use ping::{PingStats, parse_ping_summary, ping, wait_for, wait_until};
