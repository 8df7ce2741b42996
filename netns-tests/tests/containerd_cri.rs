//! containerd 1.6 through its CRI service (the kubelet's path) drives the
//! `flannel` CNI plugin for two pods on a node with a real flanneld.
//!
//! A private containerd runs inside the node's network namespace with its
//! own root, state and socket under the cluster directory; its CNI `bin_dir`
//! holds our `flannel` (behind a wrapper script that records every call:
//! environment, stdin, stdout, stderr, exit status) plus Debian's `loopback`
//! and `portmap`. The sandbox image is made offline from busybox-static
//! (`cri/oci_image.py`) and imported with `ctr`; CRI calls go through
//! `cri/cri_client.py` (Debian's python3 and python3-grpcio, stubs generated
//! from `cri/api.proto` at test time).
//!
//! Set `NETNS_TESTS_CRI_REFERENCE_CNI=1` to run the same test with Debian's
//! reference `bridge` + `host-local` instead of our plugin (to tell a
//! containerd or environment problem from a plugin bug); without it the test
//! always uses `target/debug/flannel` (build it first: `cargo build -p
//! cni-plugin`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use netns_tests::{
    Cluster, ClusterSpec, Node, describe, log_tail, parse_ping_summary, require_root, run, run_ok,
    wait_for,
};
use serde_json::{Value, json};
use subnet::subnet_env::SubnetEnv;

/// Debian's python3 (with python3-grpcio and python3-grpc-tools), not
/// whatever `python3` is first on `PATH`.
const PYTHON: &str = "/usr/bin/python3";
/// The containerd daemon of the Debian package.
const CONTAINERD: &str = "/usr/bin/containerd";
/// containerd's command line client, for the image import.
const CTR: &str = "/usr/bin/ctr";
/// Debian's reference CNI plugins.
const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";
/// busybox-static: the whole sandbox image.
const BUSYBOX: &str = "/bin/busybox";
/// `PATH` for containerd, its shims, runc and the CNI plugins (iptables).
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The sandbox ("pause") image name, set as the CRI `sandbox_image`.
const SANDBOX_IMAGE: &str = "localhost/netns-tests/pause:1";
/// What the sandbox image runs (see `cri/oci_image.py`), to recognise it.
const SANDBOX_SLEEP: &str = "/bin/busybox sleep 2147483647";
/// Set to run the test with Debian's `bridge` + `host-local` instead.
const REFERENCE_ENV: &str = "NETNS_TESTS_CRI_REFERENCE_CNI";
/// The Kubernetes namespace of the pods.
const POD_NAMESPACE: &str = "netns-tests";
/// The port mapping of pod A: node port 8080 to pod port 80 (TCP).
const HOST_PORT: u16 = 8080;
/// See [`HOST_PORT`].
const CONTAINER_PORT: u16 = 80;

/// Deadline of one CRI RPC (inside the client).
const RPC_DEADLINE: Duration = Duration::from_secs(30);
/// Timeout of one CRI client process (python start-up plus the RPC).
const CRI_CALL_TIMEOUT: Duration = Duration::from_secs(45);
/// Timeout of the stub generation, the image build and the image import.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long containerd may take until its CRI service answers.
const CONTAINERD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long containerd may take to exit after SIGTERM before SIGKILL.
const CONTAINERD_STOP_GRACE: Duration = Duration::from_secs(10);
/// Timeout of `ip`, `bridge`, `iptables`, `kill`, `umount`.
const TOOL_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of one `ping -c 3`.
const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a process we stopped may take to disappear.
const GONE_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval of the waits.
const POLL: Duration = Duration::from_millis(100);
/// containerd log lines shown when the test fails.
const LOG_LINES: usize = 80;

/// Which plugin is first in the chain (`portmap` always follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plugin {
    /// Ours: `target/debug/flannel`, `type: flannel`.
    Flannel,
    /// Debian's `bridge` with `host-local`, configured the way flannel's
    /// plugin configures them (see [`REFERENCE_ENV`]).
    Reference,
}

impl Plugin {
    /// [`Plugin::Reference`] if [`REFERENCE_ENV`] is set to anything but
    /// `0` or empty, else [`Plugin::Flannel`].
    fn from_env() -> Self {
        match std::env::var(REFERENCE_ENV) {
            Ok(v) if !v.is_empty() && v != "0" => Self::Reference,
            _ => Self::Flannel,
        }
    }

    /// The plugin's `type` in the conflist (the wrapped binary's name).
    fn type_name(self) -> &'static str {
        match self {
            Self::Flannel => "flannel",
            Self::Reference => "bridge",
        }
    }

    /// The binary to wrap.
    fn binary(self) -> PathBuf {
        match self {
            Self::Flannel => flannel_plugin_binary(),
            Self::Reference => Path::new(DEBIAN_CNI_DIR).join("bridge"),
        }
    }
}

/// `$CARGO_TARGET_DIR/debug/flannel` (relative to the workspace if
/// relative), else `<workspace>/target/debug/flannel`.
fn flannel_plugin_binary() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().unwrap_or(manifest);
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace.join("target"), |dir| workspace.join(dir));
    target.join("debug").join("flannel")
}

/// This crate's `cri/` directory (the proto, the client, the image builder).
fn cri_source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cri")
}

/// `text` with `"`, `\` escaped, in double quotes: a TOML basic string (the
/// paths here are plain ASCII).
fn toml_str(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Path as (lossy) text.
fn show(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Writes `text` to `path`, panicking with the path on failure.
fn write_file(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Copies `from` to `to`, keeping the mode.
fn copy_file(from: &Path, to: &Path) {
    fs::copy(from, to)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", from.display(), to.display()));
}

/// Runs `cmd` with `timeout`; panics with its output unless it succeeds;
/// returns stdout.
fn must(cmd: &mut Command, timeout: Duration) -> String {
    run_ok(cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// `nsenter --net=<netns> <args...>`: a command in a network namespace
/// given by path (a pod's namespace is a bind mount under containerd's state
/// directory, not a name in `/run/netns`).
fn in_netns(netns: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display())).args(args);
    cmd
}

/// The CRI client: `cri/cri_client.py` on Debian's python3.
#[derive(Debug, Clone)]
struct Cri {
    /// Where the generated `api_pb2*.py` are.
    stubs: PathBuf,
    /// containerd's gRPC socket.
    socket: PathBuf,
}

impl Cri {
    /// Runs the client with `args`; its JSON output, or the error text
    /// (gRPC status, timeout, ...).
    fn call(&self, args: &[&str]) -> Result<Value, String> {
        let mut cmd = Command::new(PYTHON);
        cmd.arg(cri_source_dir().join("cri_client.py"))
            .arg("--stubs")
            .arg(&self.stubs)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--timeout")
            .arg(RPC_DEADLINE.as_secs().to_string())
            .args(args)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env_remove("PYTHONPATH")
            .env_remove("PYTHONHOME");
        let out = run(&mut cmd, CRI_CALL_TIMEOUT).map_err(|e| e.to_string())?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "CRI {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                stdout.trim()
            ));
        }
        serde_json::from_str(&stdout).map_err(|e| {
            format!(
                "CRI {}: bad JSON from `{}`: {e}: {stdout}",
                args.join(" "),
                describe(&cmd)
            )
        })
    }

    /// `Version`.
    fn version(&self) -> Result<Value, String> {
        self.call(&["version"])
    }

    /// `RunPodSandbox`; the sandbox ID.
    fn run_pod(&self, spec: &Value) -> Result<String, String> {
        let out = self.call(&["run", &spec.to_string()])?;
        out["id"]
            .as_str()
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| format!("RunPodSandbox returned no id: {out}"))
    }

    /// Verbose `PodSandboxStatus`, as the client summarises it.
    fn status(&self, id: &str) -> Result<Value, String> {
        self.call(&["status", id])
    }

    /// `StopPodSandbox`.
    fn stop(&self, id: &str) -> Result<(), String> {
        self.call(&["stop", id]).map(drop)
    }

    /// `RemovePodSandbox`.
    fn remove(&self, id: &str) -> Result<(), String> {
        self.call(&["remove", id]).map(drop)
    }

    /// `ListPodSandbox`: the sandbox IDs.
    fn list(&self) -> Result<Vec<String>, String> {
        let out = self.call(&["list"])?;
        let items = out
            .as_array()
            .ok_or_else(|| format!("ListPodSandbox: not a list: {out}"))?;
        Ok(items
            .iter()
            .filter_map(|p| p["id"].as_str().map(str::to_owned))
            .collect())
    }
}

/// One recorded call of the wrapped plugin.
#[derive(Debug, Clone)]
struct CniCall {
    /// The record's name (`<ns since epoch>-<pid>`, so sorting is by time).
    name: String,
    /// The `CNI_*` environment.
    env: BTreeMap<String, String>,
    /// The network config on stdin.
    stdin: String,
    /// The result or error JSON on stdout.
    stdout: String,
    /// Whatever it logged.
    stderr: String,
    /// Its exit status (`None` if the record is incomplete).
    rc: Option<i32>,
}

impl CniCall {
    /// A `CNI_*` variable, empty if unset.
    fn var(&self, key: &str) -> &str {
        self.env.get(key).map_or("", String::as_str)
    }

    /// `CNI_COMMAND`.
    fn command(&self) -> &str {
        self.var("CNI_COMMAND")
    }

    /// `CNI_CONTAINERID`.
    fn container_id(&self) -> &str {
        self.var("CNI_CONTAINERID")
    }

    /// One `KEY=value` of `CNI_ARGS`.
    fn arg(&self, key: &str) -> Option<&str> {
        self.var("CNI_ARGS")
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// The stdin config as JSON (`Null` if it does not parse).
    fn config(&self) -> Value {
        serde_json::from_str(&self.stdin).unwrap_or(Value::Null)
    }

    /// Whether it exited 0.
    fn succeeded(&self) -> bool {
        self.rc == Some(0)
    }

    /// Everything recorded, for failure messages.
    fn render(&self) -> String {
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(
            "--- CNI call {} {} (exit {:?})\nenv: {}\nstdin: {}\nstdout: {}\nstderr: {}\n",
            self.name,
            self.command(),
            self.rc,
            env.join(" "),
            self.stdin.trim(),
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

/// The recorded calls in `dir`, oldest first.
fn read_calls(dir: &Path) -> Vec<CniCall> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let names: BTreeSet<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".env").map(str::to_owned)
        })
        .collect();
    let read = |name: &str, ext: &str| fs::read_to_string(dir.join(format!("{name}.{ext}")));
    names
        .into_iter()
        .map(|name| CniCall {
            env: read(&name, "env")
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            stdin: read(&name, "stdin").unwrap_or_default(),
            stdout: read(&name, "stdout").unwrap_or_default(),
            stderr: read(&name, "stderr").unwrap_or_default(),
            rc: read(&name, "rc").ok().and_then(|t| t.trim().parse().ok()),
            name,
        })
        .collect()
}

/// All recorded calls, rendered.
fn render_calls(calls: &[CniCall]) -> String {
    calls.iter().map(CniCall::render).collect()
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => todo.push(entry.path()),
                Ok(t) if t.is_file() => out.push(entry.path()),
                _ => {}
            }
        }
    }
    out.sort();
    out
}

/// `dir` and every directory under it.
fn dirs_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        if let Ok(entries) = fs::read_dir(&d) {
            todo.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        out.push(d);
    }
    out
}

/// The files under `dir` whose path or content mentions `needle` (a
/// container ID).
fn files_mentioning(dir: &Path, needle: &str) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| {
            p.to_string_lossy().contains(needle)
                || fs::read(p).is_ok_and(|b| String::from_utf8_lossy(&b).contains(needle))
        })
        .collect()
}

/// The address reservations in `dir`: one file per address, named after
/// it, holding its owner (both our plugin's and host-local's layout).
fn reservations(dir: &Path) -> BTreeMap<Ipv4Addr, String> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let ip = e.file_name().to_str()?.parse().ok()?;
            Some((ip, fs::read_to_string(e.path()).unwrap_or_default()))
        })
        .collect()
}

/// A listing of the files under `dir` with their content, for failure
/// messages.
fn dump_dir(dir: &Path) -> String {
    let mut text = format!("files under {}:\n", dir.display());
    for p in files_under(dir) {
        let mut content = fs::read(&p).map_or_else(
            |e| format!("<{e}>"),
            |b| String::from_utf8_lossy(&b).into_owned(),
        );
        if content.len() > 400 {
            content = format!("{}...", content.chars().take(400).collect::<String>());
        }
        let _ = writeln!(text, "  {}: {}", p.display(), content.trim());
    }
    text
}

/// Whether process `pid` exists and its command line contains `needle`
/// (guards against a reused PID).
fn process_alive_with(pid: u32, needle: &str) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|b| {
        String::from_utf8_lossy(&b)
            .replace('\0', " ")
            .contains(needle)
    })
}

/// The parent PID of `pid` (from `/proc/<pid>/stat`).
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// A private containerd in the node's network namespace.
///
/// The drop guard (also on failure) removes every pod through CRI (which
/// stops their shims), stops containerd (SIGTERM, then SIGKILL, by its PID),
/// and only if something survived that: kills (by PID) the processes left
/// in the pods' cgroups (`/netns-tests-<prefix>/...`) and the shims whose
/// `-address` is our socket, removes their sockets, unmounts what is still
/// mounted under our directory and removes the pods' (empty) cgroups.
#[derive(Debug)]
struct Containerd {
    /// The daemon (`None` once stopped and reaped).
    child: Option<Child>,
    /// Its directory (under the cluster directory).
    dir: PathBuf,
    /// The CRI client.
    cri: Cri,
    /// Its log.
    log: PathBuf,
    /// Where the wrapper records plugin calls.
    calls: PathBuf,
    /// The plugin's `dataDir` (IPAM state).
    data_dir: PathBuf,
    /// Which plugin runs.
    plugin: Plugin,
    /// The network's name (in the conflist).
    network_name: String,
    /// The directory of the address reservations under `data_dir`.
    reservations_dir: PathBuf,
    /// `--address` of the shims (our socket), to recognise them.
    socket: PathBuf,
    /// The pods' parent cgroup (relative to each hierarchy).
    cgroup_parent: String,
}

impl Containerd {
    /// Prepares the directory (stubs, image, CNI bin and conf dirs, config),
    /// starts containerd in `node`'s namespace, waits until CRI answers and
    /// imports the sandbox image.
    fn start(cluster: &Cluster, node: &Node, plugin: Plugin, env: &SubnetEnv) -> Self {
        let dir = cluster.dir().join("cri");
        let sub = |name: &str| {
            let p = dir.join(name);
            fs::create_dir_all(&p).unwrap_or_else(|e| panic!("cannot create {}: {e}", p.display()));
            p
        };
        let (stubs, bin, conf, real, calls, data_dir) = (
            sub("stubs"),
            sub("cni-bin"),
            sub("cni-conf"),
            sub("plugin"),
            sub("cni-calls"),
            dir.join("cni-data"),
        );
        let (root, state, opt, runc_root) = (sub("root"), sub("state"), sub("opt"), sub("runc"));
        let socket = dir.join("containerd.sock");
        let log = dir.join("containerd.log");
        let network_name = format!("{}-cri", cluster.prefix());
        let network = env.subnet_network().expect("an IPv4 FLANNEL_SUBNET");
        let cgroup_parent = format!("/netns-tests-{}", cluster.prefix());

        // The gRPC stubs, generated from our api.proto.
        must(
            Command::new(PYTHON)
                .args(["-m", "grpc_tools.protoc", "-I"])
                .arg(cri_source_dir())
                .arg(format!("--python_out={}", stubs.display()))
                .arg(format!("--grpc_python_out={}", stubs.display()))
                .arg("api.proto")
                .env("PYTHONDONTWRITEBYTECODE", "1"),
            PREPARE_TIMEOUT,
        );
        // The sandbox image.
        let image = dir.join("pause.tar");
        must(
            Command::new(PYTHON)
                .arg(cri_source_dir().join("oci_image.py"))
                .args(["--busybox", BUSYBOX, "--name", SANDBOX_IMAGE, "--out"])
                .arg(&image)
                .env("PYTHONDONTWRITEBYTECODE", "1"),
            PREPARE_TIMEOUT,
        );

        // The CNI bin dir: the wrapped plugin, loopback and portmap (and for
        // the reference setup host-local, which bridge finds in CNI_PATH).
        let wrapped = plugin.binary();
        assert!(
            wrapped.is_file(),
            "CNI plugin {} not found; build it first: cargo build -p cni-plugin",
            wrapped.display()
        );
        let real_plugin = real.join(plugin.type_name());
        copy_file(&wrapped, &real_plugin);
        let mut extra = vec!["loopback", "portmap"];
        if plugin == Plugin::Reference {
            extra.push("host-local");
        }
        for name in extra {
            copy_file(&Path::new(DEBIAN_CNI_DIR).join(name), &bin.join(name));
        }
        let wrapper = bin.join(plugin.type_name());
        write_file(&wrapper, &wrapper_script(&real_plugin, &calls));
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();

        // The conflist: the first plugin as flannel's users write it, then
        // portmap.
        let first = match plugin {
            Plugin::Flannel => json!({
                "type": "flannel",
                "subnetFile": show(&node.subnet_file()),
                "dataDir": show(&data_dir),
                "delegate": {"hairpinMode": true, "isDefaultGateway": true},
            }),
            Plugin::Reference => json!({
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "isDefaultGateway": true,
                "hairpinMode": true,
                "ipMasq": false,
                "mtu": env.mtu.expect("FLANNEL_MTU"),
                "ipam": {
                    "type": "host-local",
                    "subnet": network.to_string(),
                    "dataDir": show(&data_dir),
                },
            }),
        };
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": &network_name,
            "plugins": [first, {"type": "portmap", "capabilities": {"portMappings": true}}],
        });
        write_file(
            &conf.join("10-flannel.conflist"),
            &serde_json::to_string_pretty(&conflist).unwrap(),
        );

        let config = dir.join("config.toml");
        write_file(
            &config,
            &containerd_config(&ContainerdPaths {
                root: &root,
                state: &state,
                opt: &opt,
                runc_root: &runc_root,
                socket: &socket,
                cni_bin: &bin,
                cni_conf: &conf,
            }),
        );

        let out = fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let err = out.try_clone().unwrap();
        // setpriv: if the test process dies without its drop guards,
        // containerd dies too. nsenter execs, so the PID is containerd's.
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--", "nsenter"])
            .arg(format!("--net=/run/netns/{}", node.netns()))
            .arg(CONTAINERD)
            .arg("--config")
            .arg(&config)
            .env("PATH", SYSTEM_PATH)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", describe(&cmd)));
        let mut containerd = Self {
            child: Some(child),
            dir,
            cri: Cri {
                stubs,
                socket: socket.clone(),
            },
            log,
            calls,
            reservations_dir: match plugin {
                // `ipam.rs`: `<dataDir>/ipam/<subnet as in lease keys>/<ip>`.
                Plugin::Flannel => data_dir.join("ipam").join(format!(
                    "{}-{}",
                    network.network(),
                    network.prefix()
                )),
                // host-local: `<dataDir>/<network name>/<ip>`.
                Plugin::Reference => data_dir.join(&network_name),
            },
            data_dir,
            plugin,
            network_name,
            socket,
            cgroup_parent,
        };
        // From here on a panic drops `containerd`, which cleans up.
        containerd.wait_ready();
        must(
            Command::new(CTR)
                .arg("--address")
                .arg(&containerd.socket)
                .args(["--namespace", "k8s.io", "images", "import"])
                .arg(&image),
            PREPARE_TIMEOUT,
        );
        containerd
    }

    /// Waits until the CRI service answers `Version`; checks what it says.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + CONTAINERD_START_TIMEOUT;
        let version = loop {
            if let Some(status) = self.exited() {
                panic!(
                    "containerd exited with {status}; log tail:\n{}",
                    log_tail(&self.log, LOG_LINES)
                );
            }
            match self.cri.version() {
                Ok(v) => break v,
                Err(e) if Instant::now() >= deadline => panic!(
                    "containerd's CRI service did not answer within \
                     {CONTAINERD_START_TIMEOUT:?}: {e}\nlog tail:\n{}",
                    log_tail(&self.log, LOG_LINES)
                ),
                Err(_) => thread::sleep(POLL),
            }
        };
        assert_eq!(version["runtime_name"], "containerd", "{version}");
        assert_eq!(version["runtime_api_version"], "v1", "{version}");
        let runtime = version["runtime_version"].as_str().unwrap_or_default();
        assert!(runtime.starts_with("1.6."), "not containerd 1.6: {version}");
    }

    /// containerd's exit status if it has exited (and was reaped).
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// The recorded plugin calls, oldest first.
    fn calls(&self) -> Vec<CniCall> {
        read_calls(&self.calls)
    }

    /// Whether `pid` is a `containerd-shim-runc-v2` of our containerd
    /// (its command line has `-address <our socket>`).
    fn is_our_shim(&self, pid: u32) -> bool {
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let socket = self.socket.as_os_str().as_encoded_bytes();
        args.first()
            .is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"))
            && args
                .windows(2)
                .any(|w| w[0] == b"-address" && w[1] == socket)
    }

    /// SIGTERM (by PID), up to [`CONTAINERD_STOP_GRACE`], then SIGKILL;
    /// reaps it. The exit status, `None` if it had to be killed (or was
    /// stopped already).
    fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        let pid = child.id().to_string();
        // If `kill` fails the SIGKILL below still ends it.
        let _ = run(
            Command::new("kill").args(["-s", "TERM", &pid]),
            TOOL_TIMEOUT,
        );
        let deadline = Instant::now() + CONTAINERD_STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            thread::sleep(POLL);
        }
        eprintln!("containerd (pid {pid}) ignored SIGTERM for {CONTAINERD_STOP_GRACE:?}; SIGKILL");
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Removes every pod through CRI (stop, then remove); errors are
    /// printed, not fatal (this is cleanup).
    fn remove_all_pods(&self) {
        let pods = match self.cri.list() {
            Ok(pods) => pods,
            Err(e) => {
                eprintln!("containerd_cri cleanup: {e}");
                return;
            }
        };
        for id in pods {
            if let Err(e) = self.cri.stop(&id) {
                eprintln!("containerd_cri cleanup: {e}");
            }
            if let Err(e) = self.cri.remove(&id) {
                eprintln!("containerd_cri cleanup: {e}");
            }
        }
    }

    /// The pods' parent cgroup in every cgroup hierarchy that has it.
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .map(|h| h.path().join(self.cgroup_parent.trim_start_matches('/')))
            .filter(|p| p.is_dir())
            .collect()
    }

    /// The processes in the pods' cgroups (ours: the parent cgroup's name
    /// has the cluster's unique prefix).
    fn pod_processes(&self) -> BTreeSet<u32> {
        self.cgroup_dirs()
            .iter()
            .flat_map(|d| dirs_under(d))
            .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect()
    }

    /// Kills (by PID) what is left of our pods after containerd is gone:
    /// the processes in the pods' cgroups, then the shims started with
    /// `-address <our socket>`.
    fn kill_leftover_tasks(&self) {
        let kill = |what: &str, pid: u32| {
            eprintln!("containerd_cri cleanup: killing leftover {what} {pid}");
            let _ = run(
                Command::new("kill").args(["-s", "KILL", &pid.to_string()]),
                TOOL_TIMEOUT,
            );
        };
        for pid in self.pod_processes() {
            kill("pod process", pid);
        }
        for pid in fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        {
            if self.is_our_shim(pid) {
                kill("shim", pid);
            }
        }
        let emptied = wait_for("the pods' cgroups to empty", GONE_TIMEOUT, POLL, || {
            self.pod_processes().is_empty()
        });
        if let Err(e) = emptied {
            eprintln!("containerd_cri cleanup: {e}");
        }
        // A killed shim leaves its socket (containerd 1.6 puts them in
        // /run/containerd/s whatever its state dir); each task's `address`
        // file names it.
        let tasks = self.dir.join("state/io.containerd.runtime.v2.task/k8s.io");
        for bundle in fs::read_dir(&tasks).into_iter().flatten().flatten() {
            let Ok(address) = fs::read_to_string(bundle.path().join("address")) else {
                continue;
            };
            if let Some(socket) = address.trim().strip_prefix("unix://")
                && fs::remove_file(socket).is_ok()
            {
                eprintln!("containerd_cri cleanup: removed shim socket {socket}");
            }
        }
    }

    /// Lazily unmounts whatever is still mounted under our directory (pod
    /// network namespaces, rootfs), deepest first.
    fn unmount_leftovers(&self) {
        let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let mut points: Vec<PathBuf> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(PathBuf::from)
            .filter(|p| p.starts_with(&self.dir))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in points {
            eprintln!("containerd_cri cleanup: unmounting {}", p.display());
            if let Err(e) = run(Command::new("umount").arg("-l").arg(&p), TOOL_TIMEOUT) {
                eprintln!("containerd_cri cleanup: {e}");
            }
        }
    }

    /// Removes the pods' (empty) cgroups in every hierarchy, deepest first.
    fn remove_cgroups(&self) {
        for parent in self.cgroup_dirs() {
            let mut dirs = dirs_under(&parent);
            dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for dir in dirs {
                // rmdir only succeeds on an empty cgroup.
                if let Err(e) = fs::remove_dir(&dir) {
                    eprintln!(
                        "containerd_cri cleanup: cannot remove cgroup {}: {e}",
                        dir.display()
                    );
                }
            }
        }
    }

    /// The log tail and every plugin call, for a failed test.
    fn diagnostics(&self) -> String {
        format!(
            "######## containerd ({}) log tail:\n{}\n######## plugin calls:\n{}{}",
            self.log.display(),
            log_tail(&self.log, LOG_LINES),
            render_calls(&self.calls()),
            dump_dir(&self.data_dir),
        )
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
        if self.exited().is_none() && self.child.is_some() {
            self.remove_all_pods();
        }
        self.stop();
        self.kill_leftover_tasks();
        self.unmount_leftovers();
        self.remove_cgroups();
    }
}

/// The paths in containerd's config.
#[derive(Debug)]
struct ContainerdPaths<'a> {
    /// `root`.
    root: &'a Path,
    /// `state`.
    state: &'a Path,
    /// The `opt` plugin's directory (instead of `/opt/containerd`).
    opt: &'a Path,
    /// runc's state (instead of `/run/containerd/runc`).
    runc_root: &'a Path,
    /// The gRPC socket (the ttrpc one is next to it).
    socket: &'a Path,
    /// CNI `bin_dir`.
    cni_bin: &'a Path,
    /// CNI `conf_dir`.
    cni_conf: &'a Path,
}

/// containerd's config: everything private, CRI with runc (cgroupfs), our
/// sandbox image, the CNI dirs, and pod network namespaces under the state
/// directory (not in the host's `/run/netns`).
fn containerd_config(p: &ContainerdPaths<'_>) -> String {
    let s = |path: &Path| toml_str(&show(path));
    let mut ttrpc = p.socket.as_os_str().to_owned();
    ttrpc.push(".ttrpc");
    format!(
        r#"version = 2
root = {root}
state = {state}
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs",
]

[grpc]
  address = {socket}

[ttrpc]
  address = {ttrpc}

[plugins."io.containerd.internal.v1.opt"]
  path = {opt}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = {image}
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = {runc_root}

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = {bin}
  conf_dir = {conf}
  max_conf_num = 1
"#,
        root = s(p.root),
        state = s(p.state),
        socket = s(p.socket),
        ttrpc = s(Path::new(&ttrpc)),
        opt = s(p.opt),
        runc_root = s(p.runc_root),
        image = toml_str(SANDBOX_IMAGE),
        bin = s(p.cni_bin),
        conf = s(p.cni_conf),
    )
}

/// A `/bin/sh` script that records each call (`CNI_*` environment, stdin,
/// stdout, stderr, exit status) under `calls` and passes everything through
/// to `real` unchanged.
fn wrapper_script(real: &Path, calls: &Path) -> String {
    format!(
        r#"#!/bin/sh
# netns-tests containerd_cri: records the call, then runs the real plugin.
n={calls}/$(date +%s%N)-$$
env | grep '^CNI_' | sort > "$n.env"
cat > "$n.stdin"
{real} < "$n.stdin" > "$n.stdout" 2> "$n.stderr"
rc=$?
echo "$rc" > "$n.rc"
cat "$n.stdout"
cat "$n.stderr" >&2
exit "$rc"
"#,
        calls = shell_quote(&show(calls)),
        real = shell_quote(&show(real)),
    )
}

/// `text` in single quotes for `/bin/sh`.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// A pod as PodSandboxStatus (verbose) shows it.
#[derive(Debug, Clone)]
struct Pod {
    /// Its name (metadata).
    name: String,
    /// The sandbox ID.
    id: String,
    /// `network.ip`.
    ip: Ipv4Addr,
    /// Its network namespace (from the runtime spec in the verbose info).
    netns: PathBuf,
    /// The sandbox process.
    pid: u32,
}

/// Runs pod `name` (with a port mapping if `port_mapping`) and reads its
/// status.
fn run_pod(cd: &Containerd, prefix: &str, name: &str, port_mapping: bool) -> Pod {
    let mut spec = json!({
        "name": name,
        "namespace": POD_NAMESPACE,
        "uid": format!("{prefix}-{name}-uid"),
        "hostname": name,
        "cgroup_parent": cd.cgroup_parent,
        "labels": {"app": name},
    });
    if port_mapping {
        spec["port_mappings"] = json!([{
            "protocol": "TCP",
            "container_port": CONTAINER_PORT,
            "host_port": HOST_PORT,
        }]);
    }
    let started = Instant::now();
    let id = cd
        .cri
        .run_pod(&spec)
        .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}"));
    eprintln!("RunPodSandbox {name}: {:?}", started.elapsed());
    let status = cd
        .cri
        .status(&id)
        .unwrap_or_else(|e| panic!("PodSandboxStatus {name}: {e}"));
    assert_eq!(status["state"], "SANDBOX_READY", "{status}");
    assert_eq!(status["metadata"]["name"], name, "{status}");
    assert_eq!(status["metadata"]["namespace"], POD_NAMESPACE, "{status}");
    let ip = status["ip"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("pod {name} has no IPv4 network.ip: {status}"));
    assert_eq!(status["additional_ips"], json!([]), "IPv4 only: {status}");
    let netns = PathBuf::from(
        status["netns"]
            .as_str()
            .unwrap_or_else(|| panic!("no network namespace in the verbose status: {status}")),
    );
    let pid = status["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or_else(|| panic!("no sandbox pid in the verbose status: {status}"));
    Pod {
        name: name.to_owned(),
        id,
        ip,
        netns,
        pid,
    }
}

/// The host ends of the veths on the node's `cni0`.
fn bridge_ports(node: &Node) -> BTreeSet<String> {
    let out = must(
        Command::new("ip").args(["-n", node.netns(), "-o", "link", "show", "master", "cni0"]),
        TOOL_TIMEOUT,
    );
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .collect()
}

/// Whether link `name` exists in the node namespace.
fn link_exists(node: &Node, name: &str) -> bool {
    run(
        Command::new("ip").args(["-n", node.netns(), "link", "show", "dev", name]),
        TOOL_TIMEOUT,
    )
    .is_ok_and(|o| o.status.success())
}

/// The node's NAT table (`iptables -t nat -S`).
fn nat_rules(node: &Node) -> String {
    node.exec_ok(["iptables", "-w", "5", "-t", "nat", "-S"])
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Pings `to` from `from`'s namespace: 3 packets, all must come back.
fn assert_ping(from: &Pod, to: &Pod) {
    let out = run(
        &mut in_netns(
            &from.netns,
            &[
                "ping",
                "-n",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "2",
                &to.ip.to_string(),
            ],
        ),
        PING_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    let stats = parse_ping_summary(&text).unwrap_or_else(|e| {
        panic!(
            "ping {} -> {}: {e}\nstderr: {}",
            from.name,
            to.name,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        stats.all_received(),
        "pod {} ({}) cannot reach pod {} ({}): {stats:?}\n{text}",
        from.name,
        from.ip,
        to.name,
        to.ip
    );
}

/// A TCP server in a pod's namespace (`busybox nc -ll -p <port> -e echo
/// <reply>`), killed (by PID) on drop.
#[derive(Debug)]
struct PodServer {
    /// busybox itself (setpriv and nsenter exec it).
    child: Child,
}

impl PodServer {
    /// Starts it.
    fn start(pod: &Pod, port: u16, reply: &str) -> Self {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--", "nsenter"])
            .arg(format!("--net={}", pod.netns.display()))
            .args([BUSYBOX, "nc", "-ll", "-p", &port.to_string(), "-e"])
            .args([BUSYBOX, "echo", reply])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", describe(&cmd)));
        Self { child }
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every CNI call of this pod with `command`.
fn calls_of<'a>(calls: &'a [CniCall], pod: &Pod, command: &str) -> Vec<&'a CniCall> {
    calls
        .iter()
        .filter(|c| c.container_id() == pod.id && c.command() == command)
        .collect()
}

/// The ADD that containerd made for `pod`: exactly one, successful, with
/// the Kubernetes arguments; its result holds the pod's address.
fn check_add(calls: &[CniCall], pod: &Pod, prefix_len: u8) {
    let adds = calls_of(calls, pod, "ADD");
    assert_eq!(
        adds.len(),
        1,
        "expected one ADD for pod {}:\n{}",
        pod.name,
        render_calls(calls)
    );
    let add = adds[0];
    assert!(add.succeeded(), "ADD failed:\n{}", add.render());
    assert_eq!(add.var("CNI_IFNAME"), "eth0", "{}", add.render());
    assert_eq!(
        Path::new(add.var("CNI_NETNS")),
        pod.netns,
        "{}",
        add.render()
    );
    assert_eq!(
        add.arg("K8S_POD_NAME"),
        Some(pod.name.as_str()),
        "{}",
        add.render()
    );
    assert_eq!(
        add.arg("K8S_POD_NAMESPACE"),
        Some(POD_NAMESPACE),
        "{}",
        add.render()
    );
    assert_eq!(
        add.arg("K8S_POD_INFRA_CONTAINER_ID"),
        Some(pod.id.as_str()),
        "{}",
        add.render()
    );
    assert!(add.arg("K8S_POD_UID").is_some(), "{}", add.render());
    let result: Value = serde_json::from_str(&add.stdout)
        .unwrap_or_else(|e| panic!("ADD result is not JSON ({e}):\n{}", add.render()));
    assert_eq!(result["cniVersion"], "1.0.0", "{}", add.render());
    let want = format!("{}/{prefix_len}", pod.ip);
    let ips = result["ips"].as_array().cloned().unwrap_or_default();
    assert!(
        ips.iter().any(|ip| ip["address"] == want.as_str()),
        "ADD result lacks {want}:\n{}",
        add.render()
    );
}

/// The DELs that containerd made for `pod` on stop and remove: at least
/// two, all successful, one of them (RemovePodSandbox's) with an empty
/// `CNI_NETNS` and no `prevResult`.
fn check_dels(calls: &[CniCall], pod: &Pod) {
    let dels = calls_of(calls, pod, "DEL");
    assert!(
        dels.len() >= 2,
        "expected two DELs for pod {} (stop and remove):\n{}",
        pod.name,
        render_calls(calls)
    );
    for del in &dels {
        assert!(
            del.succeeded(),
            "DEL of pod {} failed:\n{}",
            pod.name,
            del.render()
        );
    }
    assert!(
        dels.iter()
            .any(|d| d.var("CNI_NETNS").is_empty() && d.config().get("prevResult").is_none()),
        "no DEL with an empty CNI_NETNS and without prevResult for pod {}:\n{}",
        pod.name,
        render_calls(calls)
    );
    assert!(
        dels.iter()
            .any(|d| !d.var("CNI_NETNS").is_empty() && d.config().get("prevResult").is_some()),
        "no DEL with the namespace and prevResult for pod {}:\n{}",
        pod.name,
        render_calls(calls)
    );
}

/// Two pods through containerd's CRI service with our plugin (then
/// portmap): addresses from the node's flannel subnet, both reachable from
/// each other, the port mapping works, and after StopPodSandbox and
/// RemovePodSandbox (two DELs per pod, the second without a namespace or
/// prevResult) the addresses, veths, NAT rules, namespaces and shims are
/// gone.
#[test]
fn containerd_cri_runs_two_pods_with_the_plugin() {
    require_root().unwrap();
    let started = Instant::now();
    let plugin = Plugin::from_env();
    eprintln!(
        "containerd_cri: plugin {:?} ({})",
        plugin,
        plugin.binary().display()
    );
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        ..ClusterSpec::default()
    })
    .unwrap();
    let node = cluster.node(0);
    let env = node.wait_subnet_env(Duration::from_secs(30)).unwrap();
    let network: Ipv4Network = env.subnet_network().expect("an IPv4 FLANNEL_SUBNET");
    let mtu = env.mtu.expect("FLANNEL_MTU");
    let gateway = network.nth(1).unwrap();

    let mut cd = Containerd::start(&cluster, node, plugin, &env);
    eprintln!(
        "containerd_cri: containerd ready after {:?}",
        started.elapsed()
    );

    // Two pods, A with a port mapping.
    let a = run_pod(&cd, cluster.prefix(), "pod-a", true);
    let b = run_pod(&cd, cluster.prefix(), "pod-b", false);
    for pod in [&a, &b] {
        assert!(
            network.contains(pod.ip) && pod.ip != gateway && pod.ip != network.network(),
            "pod {} got {} outside the node's FLANNEL_SUBNET {network} (or its gateway)",
            pod.name,
            pod.ip
        );
        assert!(
            pod.netns.starts_with(&cd.dir),
            "{} is not under containerd's state",
            pod.netns.display()
        );
        assert!(pod.netns.exists(), "{} is missing", pod.netns.display());
    }
    assert_ne!(a.ip, b.ip, "both pods got the same address");
    assert_ne!(a.netns, b.netns);

    // Inside each pod: eth0 with the address and the flannel MTU, a default
    // route via the bridge (isDefaultGateway).
    for pod in [&a, &b] {
        let addr = must(
            &mut in_netns(
                &pod.netns,
                &["ip", "-4", "-o", "addr", "show", "dev", "eth0"],
            ),
            TOOL_TIMEOUT,
        );
        let cidr = format!("inet {}/{} ", pod.ip, network.prefix());
        assert!(addr.contains(&cidr), "pod {}: no {cidr}in {addr}", pod.name);
        let link = must(
            &mut in_netns(&pod.netns, &["ip", "-o", "link", "show", "dev", "eth0"]),
            TOOL_TIMEOUT,
        );
        assert!(
            link.contains(&format!(" mtu {mtu} ")),
            "pod {}: eth0 MTU is not FLANNEL_MTU {mtu}: {link}",
            pod.name
        );
        let routes = must(
            &mut in_netns(&pod.netns, &["ip", "-4", "route", "show"]),
            TOOL_TIMEOUT,
        );
        assert!(
            routes
                .lines()
                .any(|l| l.starts_with(&format!("default via {gateway} dev eth0"))),
            "pod {}: no default route via {gateway}:\n{routes}",
            pod.name
        );
    }

    // On the node: cni0 with the gateway address, one veth per pod, in
    // hairpin mode.
    let cni0 = node
        .exec_ok(["ip", "-4", "-o", "addr", "show", "dev", "cni0"])
        .unwrap();
    assert!(
        cni0.contains(&format!("inet {gateway}/{} ", network.prefix())),
        "cni0 lacks {gateway}/{}: {cni0}",
        network.prefix()
    );
    let veths = bridge_ports(node);
    assert_eq!(veths.len(), 2, "expected two veths on cni0: {veths:?}");
    for veth in &veths {
        let detail = must(
            Command::new("bridge").args(["-n", node.netns(), "-d", "link", "show", "dev", veth]),
            TOOL_TIMEOUT,
        );
        assert!(
            detail.contains("hairpin on"),
            "{veth} is not in hairpin mode (delegate hairpinMode): {detail}"
        );
    }

    // The sandboxes run under shims of our containerd.
    let shims: Vec<u32> = [&a, &b]
        .iter()
        .map(|p| {
            assert!(
                process_alive_with(p.pid, SANDBOX_SLEEP),
                "no sandbox process {} for pod {}",
                p.pid,
                p.name
            );
            let shim = parent_pid(p.pid)
                .unwrap_or_else(|| panic!("no parent of sandbox process {}", p.pid));
            assert!(
                cd.is_our_shim(shim),
                "the parent {shim} of pod {}'s sandbox is not a shim of our containerd",
                p.name
            );
            shim
        })
        .collect();

    // containerd's CNI calls so far: one ADD per pod.
    let calls = cd.calls();
    check_add(&calls, &a, network.prefix());
    check_add(&calls, &b, network.prefix());

    // The IPAM state holds both addresses, each for its container.
    let held = reservations(&cd.reservations_dir);
    assert_eq!(
        held.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([a.ip, b.ip]),
        "{}",
        dump_dir(&cd.data_dir)
    );
    for pod in [&a, &b] {
        let owner = &held[&pod.ip];
        match cd.plugin {
            Plugin::Flannel => {
                assert_eq!(
                    *owner,
                    format!("{}\n{}\neth0\n", cd.network_name, pod.id),
                    "owner of {}",
                    pod.ip
                );
                let index = cd
                    .data_dir
                    .join("ipam/attachments")
                    .join(format!("{}:{}:eth0", cd.network_name, pod.id));
                let text = fs::read_to_string(&index).unwrap_or_else(|e| {
                    panic!(
                        "no attachment index {}: {e}\n{}",
                        index.display(),
                        dump_dir(&cd.data_dir)
                    )
                });
                assert_eq!(text.lines().next(), Some(pod.ip.to_string().as_str()));
            }
            Plugin::Reference => assert!(owner.starts_with(&pod.id), "{owner}"),
        }
    }

    // The pods reach each other.
    assert_ping(&a, &b);
    assert_ping(&b, &a);

    // The port mapping: portmap's DNAT rule, and a connection to the
    // node's address on the host port reaches pod A.
    let dnat = format!("--to-destination {}:{CONTAINER_PORT}", a.ip);
    let nat = nat_rules(node);
    assert!(nat.contains(&dnat), "no portmap DNAT to pod A:\n{nat}");
    {
        let _server = PodServer::start(&a, CONTAINER_PORT, "pong");
        let target = node.underlay_ip().to_string();
        let mut last = String::new();
        let reached = wait_for(
            "a TCP connection to the node's host port",
            Duration::from_secs(10),
            Duration::from_millis(200),
            || match node.exec([BUSYBOX, "nc", "-w", "2", &target, &HOST_PORT.to_string()]) {
                Ok(out) => {
                    last = String::from_utf8_lossy(&out.stdout).into_owned();
                    last.trim() == "pong"
                }
                Err(e) => {
                    last = e.to_string();
                    false
                }
            },
        );
        assert!(
            reached.is_ok(),
            "{target}:{HOST_PORT} does not reach pod A's port {CONTAINER_PORT}: {last}\n{nat}"
        );
    }

    // Stop and remove both pods, as the kubelet does. The DELs of the first
    // release its address and nothing of the other pod's.
    for (pod, remaining) in [(&a, BTreeSet::from([b.ip])), (&b, BTreeSet::new())] {
        cd.cri
            .stop(&pod.id)
            .unwrap_or_else(|e| panic!("StopPodSandbox {}: {e}", pod.name));
        let status = cd.cri.status(&pod.id).unwrap();
        assert_eq!(status["state"], "SANDBOX_NOTREADY", "{status}");
        cd.cri
            .remove(&pod.id)
            .unwrap_or_else(|e| panic!("RemovePodSandbox {}: {e}", pod.name));
        let held: BTreeSet<Ipv4Addr> = reservations(&cd.reservations_dir).into_keys().collect();
        assert_eq!(
            held,
            remaining,
            "reservations after removing pod {}:\n{}",
            pod.name,
            dump_dir(&cd.data_dir)
        );
    }
    let left = cd.cri.list().unwrap();
    assert!(left.is_empty(), "pods left after removal: {left:?}");

    // Two successful DELs per pod, the second without namespace or
    // prevResult.
    let calls = cd.calls();
    for pod in [&a, &b] {
        check_dels(&calls, pod);
    }
    assert!(
        calls.iter().all(CniCall::succeeded),
        "a plugin call failed:\n{}",
        render_calls(&calls)
    );

    // Everything the pods had is released.
    let held = reservations(&cd.reservations_dir);
    assert!(
        held.is_empty(),
        "addresses not released: {held:?}\n{}",
        dump_dir(&cd.data_dir)
    );
    for pod in [&a, &b] {
        let left = files_mentioning(&cd.data_dir, &pod.id);
        assert!(
            left.is_empty(),
            "pod {} ({}) still has state under the dataDir {left:?}:\n{}",
            pod.name,
            pod.ip,
            dump_dir(&cd.data_dir)
        );
        assert!(!pod.netns.exists(), "{} still exists", pod.netns.display());
    }
    for veth in &veths {
        assert!(!link_exists(node, veth), "host veth {veth} still exists");
    }
    assert!(bridge_ports(node).is_empty());
    let nat = nat_rules(node);
    assert!(!nat.contains(&dnat), "portmap DNAT rule left:\n{nat}");
    for (pod, shim) in [&a, &b].iter().zip(&shims) {
        let gone = wait_for(
            &format!("shim {shim} of pod {} to exit", pod.name),
            GONE_TIMEOUT,
            POLL,
            || !cd.is_our_shim(*shim),
        );
        assert!(gone.is_ok(), "shim {shim} still runs");
        assert!(
            !process_alive_with(pod.pid, SANDBOX_SLEEP),
            "sandbox process {} of pod {} still runs",
            pod.pid,
            pod.name
        );
    }

    let status = cd.stop();
    assert!(
        status.is_some(),
        "containerd did not exit within {CONTAINERD_STOP_GRACE:?} of SIGTERM"
    );
    eprintln!("containerd_cri: done in {:?}", started.elapsed());
}
