//! A node: one network namespace on the underlay (`eth0`, `198.18.<k>.<10+i>`)
//! that runs one flanneld and hosts containers.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Output};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use subnet::subnet_env::{SubnetEnv, SubnetEnvError};

use crate::cmd::{self, EXEC_TIMEOUT, describe, ip, log_tail, netns_daemon_command, spawn_daemon};
use crate::cni::{CniCall, HARNESS_NETWORK, cni_exec, cni_plugin_binary, flannel_config};
use crate::container::{self, Bridge, Container};
use crate::error::{HarnessError, Result};
use crate::netns::{NetnsSet, netns_exec};
use crate::ping::{PingStats, ping};

/// The underlay interface name inside every node namespace.
pub const UNDERLAY_IFACE: &str = "eth0";
/// flanneld's `--healthz-port` (each node has its own namespace, so all
/// nodes can use the same port).
pub const FLANNELD_HEALTHZ_PORT: u16 = 8471;
/// Environment variable whose value, if set, replaces flanneld's default
/// `RUST_LOG=info` (e.g. `FLANNELD_RUST_LOG=debug`).
pub const FLANNELD_RUST_LOG_ENV: &str = "FLANNELD_RUST_LOG";
/// How long [`Node::stop_flanneld`] waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Pause between two looks at subnet.env or the flanneld process.
const POLL: Duration = Duration::from_millis(50);
/// Log lines shown in errors.
const TAIL_LINES: usize = 40;

/// Where the flanneld binary is: `$FLANNELD` if set, else
/// `$CARGO_TARGET_DIR/debug/flanneld` (relative to the workspace if
/// relative), else `<workspace>/target/debug/flanneld`. It may not exist.
pub fn flanneld_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("FLANNELD") {
        return PathBuf::from(path);
    }
    target_dir().join("debug").join("flanneld")
}

/// The workspace's cargo target directory: `$CARGO_TARGET_DIR` (relative to
/// the workspace if relative), else `<workspace>/target`.
pub(crate) fn target_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().unwrap_or(manifest);
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    }
}

/// What a node knows when it is created.
#[derive(Debug)]
pub(crate) struct NodeConfig {
    /// 0-based index in the cluster.
    pub(crate) index: usize,
    /// Its namespace, `<prefix>-n<index>`.
    pub(crate) netns: String,
    /// Its `eth0` address.
    pub(crate) underlay_ip: Ipv4Addr,
    /// Its own directory under the cluster's temporary directory.
    pub(crate) dir: PathBuf,
    /// etcd's client URLs, comma-separated.
    pub(crate) endpoints: String,
    /// An explicit flanneld binary (else [`flanneld_binary`]).
    pub(crate) flanneld_bin: Option<PathBuf>,
    /// Arguments every flanneld of the cluster gets.
    pub(crate) flanneld_args: Vec<String>,
    /// The cluster's namespaces (containers are added to it).
    pub(crate) netns_set: Arc<NetnsSet>,
}

/// The mutable part of a node.
#[derive(Debug, Default)]
struct NodeState {
    /// The latest flanneld process (kept after it exits, for its status).
    flanneld: Option<Child>,
    /// The extra arguments of the latest start, reused by restarts.
    extra: Vec<String>,
    /// The `cni0` bridge, once a container was added.
    bridge: Option<Bridge>,
    /// The number of containers ever added (names are never reused).
    containers_added: usize,
    /// Live containers.
    containers: Vec<Container>,
}

/// One node of a [`crate::Cluster`]. All methods take `&self`, so several
/// nodes (or one node and etcd) can be driven at once, also from threads.
#[derive(Debug)]
pub struct Node {
    /// What the node was created with.
    cfg: NodeConfig,
    /// flanneld and containers.
    state: Mutex<NodeState>,
}

impl Node {
    /// Wraps an already plumbed node namespace.
    pub(crate) fn new(cfg: NodeConfig) -> Self {
        Self {
            cfg,
            state: Mutex::new(NodeState::default()),
        }
    }

    /// Locks the state, tolerating a poisoned mutex (a test thread panicked).
    fn state(&self) -> MutexGuard<'_, NodeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The node's 0-based index in its cluster.
    pub fn index(&self) -> usize {
        self.cfg.index
    }

    /// The node's network namespace, `<prefix>-n<index>`.
    pub fn netns(&self) -> &str {
        &self.cfg.netns
    }

    /// The node's underlay address (on `eth0`), `198.18.<k>.<10+index>`.
    pub fn underlay_ip(&self) -> Ipv4Addr {
        self.cfg.underlay_ip
    }

    /// The node's private directory (subnet.env, flanneld log).
    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// The subnet.env flanneld writes on this node (`--subnet-file`).
    pub fn subnet_file(&self) -> PathBuf {
        self.cfg.dir.join("subnet.env")
    }

    /// The file that receives flanneld's stdout and stderr (appended across
    /// restarts, each start preceded by a `=== netns-tests: starting` line).
    pub fn log_path(&self) -> PathBuf {
        self.cfg.dir.join("flanneld.log")
    }

    /// The last `lines` lines of the flanneld log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path(), lines)
    }

    /// Starts flanneld in the node namespace:
    /// `<flanneld> --etcd-endpoints=<etcd> --iface=eth0 --subnet-file=<path>
    /// --healthz-port=8471 <cluster flanneld_args> <extra>` with
    /// `RUST_LOG=info` (or `$FLANNELD_RUST_LOG`), output appended to
    /// [`Node::log_path`]. Does not wait for anything; see
    /// [`Node::wait_subnet_env`]. Errors if flanneld runs already on this
    /// node or the binary is missing.
    pub fn start_flanneld(&self, extra: &[&str]) -> Result<()> {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let mut state = self.state();
        self.spawn_flanneld(&mut state, extra)
    }

    /// Spawns flanneld with `extra`, remembering them for restarts.
    fn spawn_flanneld(&self, state: &mut NodeState, extra: Vec<String>) -> Result<()> {
        if let Some(child) = state.flanneld.as_mut()
            && matches!(child.try_wait(), Ok(None))
        {
            return Err(HarnessError::Invalid(format!(
                "flanneld runs already on {} (pid {})",
                self.cfg.netns,
                child.id()
            )));
        }
        let bin = self
            .cfg
            .flanneld_bin
            .clone()
            .unwrap_or_else(flanneld_binary);
        if !bin.is_file() {
            return Err(HarnessError::FlanneldMissing { path: bin });
        }
        let mut cmd = netns_daemon_command(&self.cfg.netns, bin.as_os_str());
        cmd.arg(format!("--etcd-endpoints={}", self.cfg.endpoints))
            .arg(format!("--iface={UNDERLAY_IFACE}"))
            .arg(concat_os("--subnet-file=", self.subnet_file().as_os_str()))
            .arg(format!("--healthz-port={FLANNELD_HEALTHZ_PORT}"))
            .args(&self.cfg.flanneld_args)
            .args(&extra)
            .env(
                "RUST_LOG",
                std::env::var_os(FLANNELD_RUST_LOG_ENV).unwrap_or_else(|| "info".into()),
            );
        let log = self.log_path();
        append_line(
            &log,
            &format!("=== netns-tests: starting {}", describe(&cmd)),
        )?;
        state.flanneld = Some(spawn_daemon(cmd, &log)?);
        state.extra = extra;
        Ok(())
    }

    /// The PID of flanneld while it runs.
    pub fn flanneld_pid(&self) -> Option<u32> {
        let mut state = self.state();
        let child = state.flanneld.as_mut()?;
        matches!(child.try_wait(), Ok(None)).then(|| child.id())
    }

    /// Sends a signal (`"TERM"`, `"KILL"`, `"HUP"`, ...) to flanneld by its
    /// PID. Errors if flanneld is not running.
    pub fn signal_flanneld(&self, signal: &str) -> Result<()> {
        let mut state = self.state();
        let child = state.flanneld.as_mut().ok_or_else(|| {
            HarnessError::Invalid(format!("no flanneld was started on {}", self.cfg.netns))
        })?;
        cmd::signal_child(child, signal)
    }

    /// Waits up to `timeout` for flanneld to exit and returns its status;
    /// `None` if it still runs (or none was started).
    pub fn wait_flanneld_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            // Short lock holds: other threads may use the node meanwhile.
            let status = {
                let mut state = self.state();
                state.flanneld.as_mut()?.try_wait().ok().flatten()
            };
            if status.is_some() {
                return status;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            thread::sleep(POLL.min(deadline - now));
        }
    }

    /// Stops flanneld: SIGTERM, up to 10 s, then SIGKILL. Returns its exit
    /// status (`None` if none was started).
    pub fn stop_flanneld(&self) -> Option<ExitStatus> {
        let mut state = self.state();
        state
            .flanneld
            .as_mut()
            .and_then(|c| cmd::terminate(c, STOP_GRACE))
    }

    /// Stops flanneld (as [`Node::stop_flanneld`]) if it runs and starts it
    /// again with the extra arguments of the previous start. The old
    /// subnet.env is left in place (flanneld reads it to find its previous
    /// subnet); delete [`Node::subnet_file`] first to wait for a fresh one.
    pub fn restart_flanneld(&self) -> Result<()> {
        let mut state = self.state();
        if let Some(child) = state.flanneld.as_mut() {
            cmd::terminate(child, STOP_GRACE);
        }
        let extra = state.extra.clone();
        self.spawn_flanneld(&mut state, extra)
    }

    /// SIGKILLs and reaps flanneld (cleanup).
    pub(crate) fn kill_flanneld(&self) {
        if let Some(mut child) = self.state().flanneld.take() {
            cmd::kill_and_reap(&mut child);
        }
    }

    /// Waits up to `timeout` until [`Node::subnet_file`] exists and is
    /// complete, and returns it. Fails early (with the log tail) if flanneld
    /// exits meanwhile.
    pub fn wait_subnet_env(&self, timeout: Duration) -> Result<SubnetEnv> {
        let path = self.subnet_file();
        let deadline = Instant::now() + timeout;
        loop {
            let last = match SubnetEnv::read_complete(&path) {
                Ok(env) => return Ok(env),
                Err(e @ (SubnetEnvError::NotFound { .. } | SubnetEnvError::Missing { .. })) => e,
                // A half-written file cannot happen (flanneld renames it into
                // place), so a bad value is a real failure.
                Err(e) => return Err(HarnessError::Invalid(format!("bad subnet.env: {e}"))),
            };
            let exited = {
                let mut state = self.state();
                state
                    .flanneld
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
            };
            if let Some(status) = exited {
                return Err(HarnessError::ProcessExited {
                    what: format!("flanneld on {}", self.cfg.netns),
                    status,
                    log: self.log_path(),
                    tail: self.log_tail(TAIL_LINES),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(HarnessError::WaitTimeout {
                    what: format!(
                        "{} on {} ({last}); flanneld log tail ({}):\n{}",
                        path.display(),
                        self.cfg.netns,
                        self.log_path().display(),
                        self.log_tail(TAIL_LINES)
                    ),
                    timeout,
                });
            }
            thread::sleep(POLL.min(deadline - now));
        }
    }

    /// Runs `ip netns exec <node> <args...>` (60 s timeout); the exit status
    /// is not checked.
    pub fn exec<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        netns_exec(&self.cfg.netns, args, EXEC_TIMEOUT)
    }

    /// Like [`Node::exec`], but an unsuccessful exit is an error; returns
    /// stdout.
    pub fn exec_ok<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.exec(&args)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            let line: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
            Err(cmd::failed(
                &format!("ip netns exec {} {}", self.cfg.netns, line.join(" ")),
                &out,
            ))
        }
    }

    /// Pings `to` from the node namespace (`count` packets, 0.1 s apart).
    pub fn ping(&self, to: Ipv4Addr, count: u32) -> Result<PingStats> {
        ping(&self.cfg.netns, to, count, Duration::from_millis(100))
    }

    /// The directory the CNI plugin keeps its state in on this node
    /// (`dataDir`).
    pub fn cni_data_dir(&self) -> PathBuf {
        self.cfg.dir.join("cni-data")
    }

    /// The network config the harness passes to the CNI plugin on this node
    /// (CNI 1.1.0, network [`HARNESS_NETWORK`], this node's subnet file and
    /// [`Node::cni_data_dir`]).
    pub fn cni_config(&self) -> serde_json::Value {
        flannel_config(
            HARNESS_NETWORK,
            "1.1.0",
            &self.subnet_file(),
            &self.cni_data_dir(),
        )
    }

    /// Creates an empty container namespace `<node netns>c<j>` (deleted with
    /// the cluster) for tests that drive the CNI plugin themselves.
    pub fn add_container_netns(&self) -> Result<String> {
        let netns = {
            let mut state = self.state();
            let j = state.containers_added;
            state.containers_added += 1;
            format!("{}c{j}", self.cfg.netns)
        };
        self.cfg.netns_set.create(&netns)?;
        Ok(netns)
    }

    /// Deletes a namespace made by [`Node::add_container_netns`] (a runtime
    /// deleting a dead container's namespace).
    pub fn delete_container_netns(&self, netns: &str) -> Result<()> {
        self.cfg.netns_set.delete(netns)
    }

    /// Adds a container namespace `<node netns>c<j>` and attaches it with
    /// the real CNI plugin ([`cni_plugin_binary`]): `ADD` with
    /// [`Node::cni_config`], interface `eth0`, called from the node
    /// namespace. The container's address, gateway, MTU and host veth come
    /// from the plugin's result.
    pub fn add_container(&self) -> Result<Container> {
        let netns = self.add_container_netns()?;
        let call = CniCall::new("ADD", &netns, &netns);
        let out = cni_exec(
            Some(&self.cfg.netns),
            &cni_plugin_binary(),
            &call,
            &self.cni_config(),
        )?;
        let c = container::from_cni_result(netns, &out.result()?)?;
        self.state().containers.push(c.clone());
        Ok(c)
    }

    /// Adds a container namespace `<node netns>c<j>` attached to this node's
    /// bridge `cni0`, like the CNI bridge plugin would: `cni0` (created on
    /// first use) gets the first address of `subnet` (`.1`) and `mtu`; the
    /// container gets `eth0` with the next free address, `mtu`, and a default
    /// route via `.1`. All containers of a node must use the same subnet and
    /// MTU.
    pub fn add_container_in(&self, subnet: Ipv4Network, mtu: u32) -> Result<Container> {
        let mut state = self.state();
        let bridge = match state.bridge {
            Some(bridge) => {
                bridge.check_same(subnet, mtu)?;
                bridge
            }
            None => {
                let bridge = Bridge::new(subnet, mtu)?;
                bridge.create(&self.cfg.netns)?;
                state.bridge = Some(bridge);
                bridge
            }
        };
        let j = state.containers_added;
        let host = bridge.host(state.containers_added + 2)?;
        state.containers_added += 1;
        let c = container::create(&self.cfg, &bridge, j, host)?;
        state.containers.push(c.clone());
        Ok(c)
    }

    /// The containers added to this node and not removed.
    pub fn containers(&self) -> Vec<Container> {
        self.state().containers.clone()
    }

    /// Detaches a container (CNI `DEL` if the plugin attached it) and
    /// deletes its namespace. Its address is not handed out again by the
    /// hand-made path; the plugin may reuse it later.
    pub fn remove_container(&self, c: &Container) -> Result<()> {
        self.state().containers.retain(|x| x != c);
        if c.attached_by_plugin() {
            let call = CniCall::new("DEL", c.netns(), c.netns());
            cni_exec(
                Some(&self.cfg.netns),
                &cni_plugin_binary(),
                &call,
                &self.cni_config(),
            )?
            .succeeded()?;
        }
        self.cfg.netns_set.delete(c.netns())
    }

    /// The flanneld log tail and the node's kernel state (`ip -d addr`,
    /// routes, neighbours, bridge FDB), for failure diagnostics.
    pub fn diagnostics(&self, lines: usize) -> String {
        let ns = &self.cfg.netns;
        let mut text = format!(
            "===== node {} ({ns}, {}) flanneld log tail, {}:\n{}\n",
            self.cfg.index,
            self.cfg.underlay_ip,
            self.log_path().display(),
            self.log_tail(lines)
        );
        let commands: [(&str, &[&str]); 4] = [
            ("ip", &["-n", ns, "-d", "addr"]),
            ("ip", &["-n", ns, "route"]),
            ("ip", &["-n", ns, "neigh"]),
            ("bridge", &["-n", ns, "fdb"]),
        ];
        for (program, args) in commands {
            let result = cmd::run(
                std::process::Command::new(program).args(args),
                cmd::IP_TIMEOUT,
            );
            let shown = match result {
                Ok(out) => format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) => format!("<{e}>\n"),
            };
            text.push_str(&format!("----- {program} {}:\n{shown}", args.join(" ")));
        }
        text
    }
}

/// `prefix` followed by `value`, without a UTF-8 round trip.
fn concat_os(prefix: &str, value: &OsStr) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(value);
    s
}

/// Appends one line to the file at `path`.
fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| HarnessError::io(format!("cannot open {}", path.display()), e))?;
    writeln!(file, "{line}")
        .map_err(|e| HarnessError::io(format!("cannot write {}", path.display()), e))
}

/// Attaches namespace `netns` to the switch: a veth with `eth0` (MTU 1500,
/// `addr`/24, up) in `netns` and `switch_if` in `switch`, enslaved to `br0`.
/// Both ends are created directly in their namespaces.
pub(crate) fn attach_to_switch(
    netns: &str,
    switch: &str,
    switch_if: &str,
    addr: Ipv4Addr,
) -> Result<()> {
    ip([
        "link",
        "add",
        UNDERLAY_IFACE,
        "netns",
        netns,
        "type",
        "veth",
        "peer",
        "name",
        switch_if,
        "netns",
        switch,
    ])?;
    ip([
        "-n", switch, "link", "set", switch_if, "master", "br0", "up",
    ])?;
    ip([
        "-n",
        netns,
        "link",
        "set",
        UNDERLAY_IFACE,
        "mtu",
        "1500",
        "up",
    ])?;
    ip([
        "-n",
        netns,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        UNDERLAY_IFACE,
    ])
    .map(drop)
}
