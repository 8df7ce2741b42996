//! A test cluster: an underlay switch, etcd, and nodes, all in namespaces of
//! their own, torn down by a drop guard.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use ipnetwork::Ipv4Network;

use crate::cmd::ip;
use crate::container::Container;
use crate::error::{HarnessError, Result};
use crate::etcd::{ETCD_START_TIMEOUT, EtcdCluster};
use crate::names::{TEMP_DIR_PREFIX, UnderlayLease, require_root, sweep_once, unique_prefix};
use crate::netns::{NetnsSet, sysctl};
use crate::node::{Node, NodeConfig, attach_to_switch};
use crate::ping::wait_for;

/// The network config written to etcd unless the spec says otherwise.
pub const DEFAULT_NETWORK_CONFIG: &str =
    r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
/// How long [`Cluster::wait_reachable`] waits for the overlay to converge.
const REACH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Cluster::start`] waits for every node's subnet.env.
pub const SUBNET_ENV_TIMEOUT: Duration = Duration::from_secs(30);
/// Set this environment variable to keep a failed test's cluster directory
/// (logs, data dirs) instead of deleting it.
pub const KEEP_ENV: &str = "NETNS_TESTS_KEEP";
/// The first node's host number on the underlay (`198.18.<k>.10`).
const FIRST_NODE_HOST: u8 = 10;
/// Log lines shown per process when a test fails.
const DIAG_LINES: usize = 40;

/// What [`Cluster::start`] builds.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Number of nodes (at most 245).
    pub nodes: usize,
    /// etcd members: 1 or 3.
    pub etcd_members: usize,
    /// The network config JSON written to `/coreos.com/network/config`
    /// (nothing is written if empty).
    pub config: String,
    /// Start flanneld on every node and wait for every subnet.env.
    pub start_flanneld: bool,
    /// Extra arguments for every flanneld of the cluster.
    pub flanneld_args: Vec<String>,
    /// The flanneld binary; `None` means [`crate::flanneld_binary`]
    /// (`$FLANNELD`, else `target/debug/flanneld`).
    pub flanneld_bin: Option<PathBuf>,
}

impl Default for ClusterSpec {
    /// Two nodes, one etcd member, the default vxlan config, flanneld
    /// started.
    fn default() -> Self {
        Self {
            nodes: 2,
            etcd_members: 1,
            config: DEFAULT_NETWORK_CONFIG.to_owned(),
            start_flanneld: true,
            flanneld_args: Vec::new(),
            flanneld_bin: None,
        }
    }
}

/// A running test cluster. Dropping it (also while a test panics) kills
/// every process it started (by PID, and waits for them), deletes every
/// namespace it created and removes its temporary directory. When dropped
/// during a panic it first prints every log tail and every node's kernel
/// state to stderr.
///
/// Layout, for prefix `p = ft<pid>x<n>` and underlay `198.18.<k>.0/24`:
/// switch `p-sw` with bridge `br0`; etcd `p-etcd` at `.2` (or `p-etcd1..3`
/// at `.2`..`.4`); node `i` in `p-n<i>` at `.<10+i>` on `eth0`; container
/// `j` of node `i` in `p-n<i>c<j>`.
#[derive(Debug)]
pub struct Cluster {
    /// The name prefix of everything this cluster creates.
    prefix: String,
    /// What it was started with.
    spec: ClusterSpec,
    /// Its underlay /24 (locked while the cluster lives).
    underlay: UnderlayLease,
    /// Logs, data dirs, subnet.env files; `None` once kept or removed.
    dir: Option<tempfile::TempDir>,
    /// The path of `dir`.
    dir_path: PathBuf,
    /// Every namespace created, for the drop guard.
    netns: Arc<NetnsSet>,
    /// The switch namespace.
    switch: String,
    /// etcd.
    etcd: EtcdCluster,
    /// The nodes, by index.
    nodes: Vec<Node>,
}

impl Cluster {
    /// Builds the switch, etcd (waits until healthy, 30 s), the nodes, writes
    /// the network config and, if `spec.start_flanneld`, starts flanneld on
    /// every node and waits for every subnet.env (30 s). On error everything
    /// built so far is torn down again.
    pub fn start(spec: ClusterSpec) -> Result<Self> {
        require_root()?;
        if spec.etcd_members != 1 && spec.etcd_members != 3 {
            return Err(HarnessError::Invalid(format!(
                "etcd_members must be 1 or 3, not {}",
                spec.etcd_members
            )));
        }
        if spec.nodes > usize::from(u8::MAX - FIRST_NODE_HOST) {
            return Err(HarnessError::Invalid(format!(
                "at most {} nodes fit on the underlay /24",
                u8::MAX - FIRST_NODE_HOST
            )));
        }
        sweep_once();
        let prefix = unique_prefix();
        let seed = prefix.bytes().map(u32::from).sum();
        let underlay = UnderlayLease::acquire(seed)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{TEMP_DIR_PREFIX}{prefix}-"))
            .tempdir()
            .map_err(|e| HarnessError::io("cannot create the cluster directory", e))?;
        let dir_path = dir.path().to_path_buf();
        let members: Vec<(String, Ipv4Addr)> = if spec.etcd_members == 1 {
            vec![(format!("{prefix}-etcd"), underlay.addr(2))]
        } else {
            (0..3u8)
                .map(|i| (format!("{prefix}-etcd{}", i + 1), underlay.addr(2 + i)))
                .collect()
        };
        let etcd = EtcdCluster::new(&members, &dir_path, &prefix);
        let mut cluster = Self {
            switch: format!("{prefix}-sw"),
            prefix,
            spec,
            underlay,
            dir: Some(dir),
            dir_path,
            netns: Arc::new(NetnsSet::default()),
            etcd,
            nodes: Vec::new(),
        };
        // From here on, an error drops `cluster`, which cleans up.
        cluster.build(&members)?;
        Ok(cluster)
    }

    /// Everything after the bookkeeping of [`Cluster::start`].
    fn build(&mut self, members: &[(String, Ipv4Addr)]) -> Result<()> {
        let sw = self.switch.clone();
        self.netns.create(&sw)?;
        ip([
            "-n",
            &sw,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        ip(["-n", &sw, "link", "set", "br0", "up"])?;
        // With br_netfilter loaded, bridged frames would traverse the switch
        // namespace's (empty) iptables; keep the switch a plain switch. The
        // keys only exist when br_netfilter is loaded, hence best effort.
        for key in ["iptables", "ip6tables", "arptables"] {
            let _ = sysctl(&sw, &format!("net.bridge.bridge-nf-call-{key}"), "0");
        }
        for (i, (ns, addr)) in members.iter().enumerate() {
            self.netns.create(ns)?;
            attach_to_switch(ns, &sw, &format!("e{i}"), *addr)?;
        }
        // etcd takes a moment; plumb the nodes meanwhile.
        self.etcd.spawn_all()?;
        for _ in 0..self.spec.nodes {
            self.add_node_without_flanneld()?;
        }
        self.etcd.wait_healthy(ETCD_START_TIMEOUT)?;
        if !self.spec.config.is_empty() {
            self.etcd.put_config(&self.spec.config)?;
        }
        if self.spec.start_flanneld {
            for node in &self.nodes {
                node.start_flanneld(&[])?;
            }
            for node in &self.nodes {
                node.wait_subnet_env(SUBNET_ENV_TIMEOUT)?;
            }
        }
        Ok(())
    }

    /// Adds one more node (index [`Cluster::nodes`]`.len()`); starts its
    /// flanneld and waits for its subnet.env if the spec says so.
    pub fn add_node(&mut self) -> Result<&Node> {
        let i = self.add_node_without_flanneld()?;
        let node = &self.nodes[i];
        if self.spec.start_flanneld {
            node.start_flanneld(&[])?;
            node.wait_subnet_env(SUBNET_ENV_TIMEOUT)?;
        }
        Ok(node)
    }

    /// Adds one more node without starting flanneld on it, whatever the
    /// spec says (for nodes configured by hand, e.g. as a flannel (Go) node).
    pub fn add_node_plain(&mut self) -> Result<&Node> {
        let i = self.add_node_without_flanneld()?;
        Ok(&self.nodes[i])
    }

    /// Creates and plumbs node namespace number `nodes.len()`; returns its
    /// index.
    fn add_node_without_flanneld(&mut self) -> Result<usize> {
        let i = self.nodes.len();
        let host = u8::try_from(i)
            .ok()
            .and_then(|i| i.checked_add(FIRST_NODE_HOST))
            .filter(|h| *h < u8::MAX)
            .ok_or_else(|| HarnessError::Invalid(format!("node {i} does not fit the /24")))?;
        let netns = format!("{}-n{i}", self.prefix);
        let addr = self.underlay.addr(host);
        self.netns.create(&netns)?;
        attach_to_switch(&netns, &self.switch, &format!("n{i}"), addr)?;
        sysctl(&netns, "net.ipv4.ip_forward", "1")?;
        let dir = self.dir_path.join(format!("n{i}"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| HarnessError::io(format!("cannot create {}", dir.display()), e))?;
        self.nodes.push(Node::new(NodeConfig {
            index: i,
            netns,
            underlay_ip: addr,
            dir,
            endpoints: self.etcd.endpoints(),
            flanneld_bin: self.spec.flanneld_bin.clone(),
            flanneld_args: self.spec.flanneld_args.clone(),
            netns_set: Arc::clone(&self.netns),
        }));
        Ok(i)
    }

    /// The prefix of every name this cluster creates (`ft<pid>x<n>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The spec the cluster was started with.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// The cluster's temporary directory (logs, data dirs, subnet.env files).
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// The underlay network, `198.18.<k>.0/24`.
    pub fn underlay_net(&self) -> Ipv4Network {
        self.underlay.network()
    }

    /// The switch namespace (bridge `br0`).
    pub fn switch_netns(&self) -> &str {
        &self.switch
    }

    /// The etcd cluster.
    pub fn etcd(&self) -> &EtcdCluster {
        &self.etcd
    }

    /// All nodes, by index.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `i`.
    ///
    /// # Panics
    /// If there is no node `i` (a bug in the test).
    pub fn node(&self, i: usize) -> &Node {
        self.nodes.get(i).unwrap_or_else(|| {
            panic!(
                "node index {i} out of range: the cluster has {} nodes",
                self.nodes.len()
            )
        })
    }

    /// Waits (up to 10 s, a ping every 100 ms) until container `a` reaches
    /// `b`; the error carries [`Cluster::diagnostics`].
    pub fn wait_reachable(&self, a: &Container, b: &Container) -> Result<()> {
        wait_for(
            &format!("{} -> {}", a.ip(), b.ip()),
            REACH_TIMEOUT,
            Duration::from_millis(100),
            || a.ping(b.ip(), 1).is_ok_and(|s| s.all_received()),
        )
        .map_err(|e| {
            HarnessError::Invalid(format!(
                "{} cannot reach {}: {e}\n{}",
                a.ip(),
                b.ip(),
                self.diagnostics()
            ))
        })
    }

    /// Every log tail (etcd, flanneld) and every node's kernel state, as
    /// printed when a test panics.
    pub fn diagnostics(&self) -> String {
        let mut text = format!(
            "######## netns-tests cluster {} (underlay {}, dir {}) ########\n",
            self.prefix,
            self.underlay.network(),
            self.dir_path.display()
        );
        text.push_str(&self.etcd.diagnostics(DIAG_LINES));
        for node in &self.nodes {
            text.push_str(&node.diagnostics(DIAG_LINES));
        }
        text
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = thread::panicking();
        if panicking {
            eprintln!("{}", self.diagnostics());
        }
        for node in &self.nodes {
            node.kill_flanneld();
        }
        self.etcd.kill_all();
        for e in self.netns.delete_all() {
            eprintln!("netns-tests: cleanup of cluster {}: {e}", self.prefix);
        }
        if let Some(dir) = self.dir.take() {
            if panicking && std::env::var_os(KEEP_ENV).is_some() {
                eprintln!(
                    "netns-tests: kept {} ({KEEP_ENV} is set)",
                    dir.keep().display()
                );
            } else if let Err(e) = dir.close() {
                eprintln!(
                    "netns-tests: cannot remove {}: {e}",
                    self.dir_path.display()
                );
            }
        }
    }
}
