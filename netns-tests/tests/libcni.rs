//! The `flannel` CNI plugin driven by a real libcni client: ADD, CHECK, GC,
//! STATUS and DEL on a one-node cluster with a real etcd and flanneld.
//!
//! The client is `netns-tests/libcni-client` (Go, on Debian's libcni 1.1.2),
//! built into each test's temporary directory with the offline toolchain
//! (`golang-go`, `golang-github-appc-cni-dev`). It runs inside the node's
//! namespace (the bridge and host veths land there); every container is a
//! namespace `<node>x<k>` of the test's own, deleted by a drop guard. The
//! plugin directory holds our `flannel` (`$FLANNEL_CNI`, else
//! `target/debug/flannel`) and Debian's `portmap`, `tuning` and `loopback`.
//!
//! libcni 1.1.2 knows CNI up to 1.0.0: the client serves ADD, CHECK and DEL
//! through libcni for 0.3.1, 0.4.0 and 1.0.0 conflists, and runs the 1.1.0 chain
//! (and every GC and STATUS, which that libcni lacks) with the same protocol
//! itself; see the client's package comment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use netns_tests::{
    Cluster, ClusterSpec, Node, SUBNET_ENV_TIMEOUT, ip, netns_exec, require_root, run,
    unique_prefix,
};
use serde_json::{Value, json};

/// Timeout of the `go build` of the client.
const GO_BUILD_TIMEOUT: Duration = Duration::from_secs(120);
/// The client's own timeout for one command (passed as `--timeout`).
const CLIENT_INNER_TIMEOUT: &str = "20s";
/// Our timeout for one client run (above the client's own).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of the other commands (`ip`, `iptables-save`, `sysctl`).
const CMD_TIMEOUT: Duration = Duration::from_secs(10);
/// The interface name inside every container.
const IFNAME: &str = "eth0";

/// The workspace root.
fn workspace() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Our plugin: `$FLANNEL_CNI`, else `$CARGO_TARGET_DIR/debug/flannel`, else
/// `<workspace>/target/debug/flannel` (built by `cargo build -p cni-plugin`).
fn flannel_plugin() -> PathBuf {
    let path = if let Some(path) = std::env::var_os("FLANNEL_CNI") {
        PathBuf::from(path)
    } else {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| workspace().join("target"), |d| workspace().join(d));
        target.join("debug").join("flannel")
    };
    assert!(
        path.is_file(),
        "the flannel CNI plugin {} does not exist: run `cargo build -p cni-plugin`",
        path.display()
    );
    path
}

/// Serialises the tests' Go builds, so that all but the first find every
/// package in Go's build cache.
static GO_BUILD: Mutex<()> = Mutex::new(());

/// Builds the Go client into `dir` and returns its path. Go's default build
/// cache is used (`$XDG_CACHE_HOME` or `$HOME/.cache/go-build`); without
/// either variable a private cache in `dir`. Takes about 2.5 s with a cold
/// cache, 0.4 s with a warm one.
fn build_client(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("libcni-client");
    let out = dir.join("libcni-client");
    let mut cmd = Command::new("go");
    cmd.args(["build", "-o"])
        .arg(&out)
        .arg("main.go")
        .current_dir(&src)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOFLAGS", "")
        .env("CGO_ENABLED", "0");
    if std::env::var_os("XDG_CACHE_HOME").is_none() && std::env::var_os("HOME").is_none() {
        cmd.env("GOCACHE", dir.join("gocache"));
    }
    let _serial = GO_BUILD.lock().unwrap_or_else(PoisonError::into_inner);
    let started = Instant::now();
    let result = run(&mut cmd, GO_BUILD_TIMEOUT)
        .expect("cannot run `go build` (Debian packages golang-go and golang-github-appc-cni-dev)");
    assert!(
        result.status.success(),
        "go build of {} failed:\n{}{}",
        src.display(),
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    eprintln!("libcni-client built in {:?}", started.elapsed());
    out
}

/// Namespaces created by a test, deleted when dropped.
#[derive(Default)]
struct NetnsGuard {
    names: RefCell<Vec<String>>,
}

impl NetnsGuard {
    fn create(&self, name: &str) {
        self.names.borrow_mut().push(name.to_owned());
        ip(["netns", "add", name]).unwrap();
        ip(["-n", name, "link", "set", "lo", "up"]).unwrap();
    }

    fn delete(&self, name: &str) {
        self.names.borrow_mut().retain(|n| n != name);
        ip(["netns", "del", name]).unwrap();
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        for name in self.names.borrow_mut().drain(..) {
            if let Err(e) = ip(["netns", "del", &name]) {
                eprintln!("libcni test: cannot delete namespace {name}: {e}");
            }
        }
    }
}

/// A container: its namespace and the CNI attachment's identity.
#[derive(Debug, Clone)]
struct Attachment {
    netns: String,
    container_id: String,
}

impl Attachment {
    /// The runtime arguments of this attachment for the client.
    fn args(&self) -> Vec<String> {
        vec![
            "--container-id".into(),
            self.container_id.clone(),
            "--netns".into(),
            format!("/run/netns/{}", self.netns),
            "--ifname".into(),
            IFNAME.into(),
        ]
    }

    /// The `cni.dev/valid-attachments` entry of this attachment.
    fn gc_entry(&self) -> Value {
        json!({"containerID": self.container_id, "ifname": IFNAME})
    }

    /// `ip ...` inside the container namespace (must succeed).
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.netns];
        all.extend_from_slice(args);
        ip(all).unwrap()
    }

    /// Whether the container has its interface.
    fn has_interface(&self) -> bool {
        self.ip(&["-o", "link", "show"])
            .lines()
            .any(|l| l.contains(&format!(" {IFNAME}@")) || l.contains(&format!(" {IFNAME}:")))
    }
}

/// What one client run printed.
#[derive(Debug)]
struct Outcome {
    success: bool,
    json: Value,
    text: String,
}

/// A one-node cluster with flanneld, the client and a plugin directory.
/// Fields drop in order: container namespaces, then the cluster, then the
/// temporary directory.
struct Fixture {
    containers: NetnsGuard,
    cluster: Cluster,
    dir: tempfile::TempDir,
    client: PathBuf,
    next: Cell<usize>,
    subnet: Ipv4Network,
    mtu: u32,
}

impl Fixture {
    fn start() -> Self {
        require_root().unwrap();
        let started = Instant::now();
        // Named like the harness's own directories, so that its sweep
        // removes it if this process dies without dropping it.
        let dir = tempfile::Builder::new()
            .prefix(&format!("netns-tests-{}-libcni-", unique_prefix()))
            .tempdir()
            .unwrap();
        // The Go build runs while the cluster starts.
        let build = {
            let dir = dir.path().to_path_buf();
            std::thread::spawn(move || build_client(&dir))
        };
        let plugins = dir.path().join("plugins");
        std::fs::create_dir(&plugins).unwrap();
        std::os::unix::fs::symlink(flannel_plugin(), plugins.join("flannel")).unwrap();
        for p in ["portmap", "tuning", "loopback"] {
            let target = Path::new("/usr/lib/cni").join(p);
            assert!(
                target.is_file(),
                "{} missing (containernetworking-plugins)",
                target.display()
            );
            std::os::unix::fs::symlink(target, plugins.join(p)).unwrap();
        }
        let cluster = Cluster::start(ClusterSpec {
            nodes: 1,
            ..ClusterSpec::default()
        })
        .unwrap();
        let client = build.join().expect("the Go build of the client failed");
        let env = cluster.node(0).wait_subnet_env(SUBNET_ENV_TIMEOUT).unwrap();
        let subnet = env.subnet_network().unwrap();
        let mtu = env.mtu.unwrap();
        eprintln!("fixture ready in {:?}", started.elapsed());
        Self {
            containers: NetnsGuard::default(),
            cluster,
            dir,
            client,
            next: Cell::new(0),
            subnet,
            mtu,
        }
    }

    fn node(&self) -> &Node {
        self.cluster.node(0)
    }

    /// The one network name of this fixture (every conflist uses it: all
    /// attachments share the node's bridge and subnet).
    fn network(&self) -> String {
        format!("{}-net", self.cluster.prefix())
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("cni-data")
    }

    /// The `flannel` plugin's config with `subnet_file`.
    fn flannel_conf(&self, subnet_file: &Path) -> Value {
        json!({
            "type": "flannel",
            "subnetFile": subnet_file,
            "dataDir": self.data_dir(),
            "delegate": {"hairpinMode": true, "isDefaultGateway": true},
        })
    }

    /// Writes a conflist of `version` with `plugins` as `<file>.conflist`,
    /// for the fixture's network.
    fn conflist(&self, file: &str, version: &str, plugins: Vec<Value>) -> PathBuf {
        self.named_conflist(file, &self.network(), version, plugins)
    }

    /// Writes a conflist of network `name`, `version`, with `plugins` as
    /// `<file>.conflist`.
    fn named_conflist(
        &self,
        file: &str,
        name: &str,
        version: &str,
        plugins: Vec<Value>,
    ) -> PathBuf {
        let path = self.dir.path().join(format!("{file}.conflist"));
        let list = json!({"cniVersion": version, "name": name, "plugins": plugins});
        std::fs::write(&path, serde_json::to_vec_pretty(&list).unwrap()).unwrap();
        path
    }

    /// A conflist of `version` with only `flannel` on the node's subnet.env.
    fn flannel_conflist(&self, version: &str) -> PathBuf {
        let plugin = self.flannel_conf(&self.node().subnet_file());
        self.conflist(&format!("flannel-{version}"), version, vec![plugin])
    }

    /// A fresh container namespace `<node>x<k>` and container ID.
    fn container(&self) -> Attachment {
        let k = self.next.get();
        self.next.set(k + 1);
        let netns = format!("{}x{k}", self.node().netns());
        self.containers.create(&netns);
        Attachment {
            netns,
            container_id: format!("libcni-{}-{k}", self.cluster.prefix()),
        }
    }

    /// Runs `libcni-client <cmd> --conflist <conflist> ... <extra>` inside
    /// the node's namespace.
    fn client(&self, cmd: &str, conflist: &Path, extra: &[String]) -> Outcome {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.node().netns()))
            .arg(&self.client)
            .arg(cmd)
            .arg("--conflist")
            .arg(conflist)
            .arg("--plugin-dir")
            .arg(self.dir.path().join("plugins"))
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(["--timeout", CLIENT_INNER_TIMEOUT])
            .args(extra);
        let out = run(&mut command, CLIENT_TIMEOUT).unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let text = format!(
            "`libcni-client {cmd} {} {}` exited {}\nstdout: {stdout}\nstderr: {}",
            conflist.display(),
            extra.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let json = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("client output is not JSON ({e}): {text}"));
        Outcome {
            success: out.status.success(),
            json,
            text,
        }
    }

    /// Runs the client and panics unless it succeeded; returns its JSON.
    fn ok(&self, cmd: &str, conflist: &Path, extra: &[String]) -> Value {
        let out = self.client(cmd, conflist, extra);
        assert!(
            out.success,
            "expected success: {}\n{}",
            out.text,
            self.cluster.diagnostics()
        );
        out.json
    }

    /// Runs the client and panics if it succeeded; returns the error JSON
    /// (`code`, `msg`, `details`, `error`).
    fn fails(&self, cmd: &str, conflist: &Path, extra: &[String]) -> Value {
        let out = self.client(cmd, conflist, extra);
        assert!(!out.success, "expected a failure: {}", out.text);
        eprintln!("as expected, {}", out.text);
        out.json
    }

    /// ADD of `c`; checks the result against the node's subnet.env and the
    /// container's kernel state; returns the container's address.
    fn add(&self, conflist: &Path, version: &str, c: &Attachment, extra: &[String]) -> Ipv4Addr {
        let mut args = c.args();
        args.extend_from_slice(extra);
        let result = self.ok("add", conflist, &args);
        self.assert_result(&result, version, c)
    }

    /// Checks an ADD result of `version` for `c`; returns the address.
    fn assert_result(&self, result: &Value, version: &str, c: &Attachment) -> Ipv4Addr {
        assert_eq!(result["cniVersion"], version, "result {result:#}");
        let ips = result["ips"].as_array().expect("result without ips");
        assert_eq!(ips.len(), 1, "one IPv4 address expected: {result:#}");
        let address: Ipv4Network = ips[0]["address"].as_str().unwrap().parse().unwrap();
        let gateway = Ipv4Addr::from(u32::from(self.subnet.network()) + 1);
        assert!(
            self.subnet.contains(address.ip()),
            "{address} is not in FLANNEL_SUBNET {}",
            self.subnet
        );
        assert_eq!(address.prefix(), self.subnet.prefix(), "result {result:#}");
        assert_ne!(address.ip(), gateway, "the container got the gateway");
        assert_eq!(ips[0]["gateway"], gateway.to_string(), "result {result:#}");
        // The container interface, with its sandbox, is what ips[0] points at.
        let interfaces = result["interfaces"].as_array().expect("no interfaces");
        let index = usize::try_from(
            ips[0]["interface"]
                .as_u64()
                .expect("ips[0] without interface"),
        )
        .unwrap();
        let iface = &interfaces[index];
        assert_eq!(iface["name"], IFNAME, "result {result:#}");
        assert_eq!(
            iface["sandbox"],
            format!("/run/netns/{}", c.netns),
            "result {result:#}"
        );
        // The kernel agrees.
        let addr = c.ip(&["-4", "-o", "addr", "show", "dev", IFNAME]);
        assert!(
            addr.contains(&format!("inet {address} ")),
            "{address} not on {IFNAME}: {addr}"
        );
        let link = c.ip(&["-o", "link", "show", "dev", IFNAME]);
        assert!(link.contains(&format!("mtu {} ", self.mtu)), "{link}");
        let default = c.ip(&["-4", "route", "show", "default"]);
        assert!(
            default.contains(&format!("via {gateway} dev {IFNAME}")),
            "no default route via {gateway}: {default:?}"
        );
        let bridge = self
            .node()
            .exec_ok(["ip", "-4", "-o", "addr", "show", "dev", "cni0"])
            .unwrap();
        assert!(
            bridge.contains(&format!("inet {gateway}/")),
            "cni0: {bridge}"
        );
        address.ip()
    }

    /// The addresses the plugin's IPAM holds (from its state under dataDir).
    fn held(&self) -> BTreeSet<Ipv4Addr> {
        reservations(&self.data_dir(), self.subnet)
            .into_keys()
            .collect()
    }

    /// The container ID holding `addr`, if any.
    fn owner(&self, addr: Ipv4Addr) -> Option<String> {
        reservations(&self.data_dir(), self.subnet).remove(&addr)
    }
}

/// The plugin's address reservations under `data_dir` for `subnet`:
/// address to owner container ID. The layout is the plugin's
/// (`cni-plugin/src/ipam.rs`): `<dataDir>/ipam/<a.b.c.d-len>/<ip>`, each
/// holding `<network>\n<containerID>\n<ifname>\n`.
fn reservations(data_dir: &Path, subnet: Ipv4Network) -> BTreeMap<Ipv4Addr, String> {
    let dir = data_dir
        .join("ipam")
        .join(format!("{}-{}", subnet.network(), subnet.prefix()));
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return BTreeMap::new();
    };
    let mut held = BTreeMap::new();
    for entry in entries {
        let entry = entry.unwrap();
        let Some(addr) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        let owner = std::fs::read_to_string(entry.path()).unwrap();
        let container_id = owner.lines().nth(1).unwrap_or_default().to_owned();
        held.insert(addr, container_id);
    }
    held
}

/// `version` strings a VERSION answer lists.
fn supported_versions(info: &Value) -> Vec<String> {
    info["supportedVersions"]
        .as_array()
        .expect("no supportedVersions")
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// ADD, CHECK, DEL (twice, and once more with the namespace gone) through
/// libcni for 0.3.1 (no CHECK), 0.4.0 and 1.0.0 and with the 1.1.0
/// protocol; VERSION; the container reaches its gateway.
#[test]
fn add_check_del_per_version() {
    let fx = Fixture::start();
    let version_conf = fx.flannel_conflist("1.0.0");
    let info = fx.ok("version", &version_conf, &[]);
    let versions = supported_versions(&info["flannel"]);
    for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(versions.iter().any(|s| s == v), "{v} missing in {info:#}");
    }

    for version in ["1.0.0", "0.4.0", "0.3.1", "1.1.0"] {
        let conflist = fx.flannel_conflist(version);
        let c = fx.container();
        let addr = fx.add(&conflist, version, &c, &[]);
        eprintln!("cniVersion {version}: {} got {addr}", c.container_id);
        // libcni refuses CHECK before 0.4.0.
        if version != "0.3.1" {
            fx.ok("check", &conflist, &c.args());
        }
        let gateway = Ipv4Addr::from(u32::from(fx.subnet.network()) + 1);
        let stats = netns_tests::ping(&c.netns, gateway, 1, Duration::from_millis(200)).unwrap();
        assert!(stats.all_received(), "{addr} cannot reach {gateway}");
        assert!(
            fx.held().contains(&addr),
            "{addr} not held: {:?}",
            fx.held()
        );

        fx.ok("del", &conflist, &c.args());
        assert!(!c.has_interface(), "{IFNAME} still in {}", c.netns);
        assert!(!fx.held().contains(&addr), "{addr} still held after DEL");
        let veths = fx.node().exec_ok(["ip", "-o", "link", "show"]).unwrap();
        assert_eq!(
            veths.lines().filter(|l| l.contains("master cni0")).count(),
            0,
            "a host veth is left on cni0: {veths}"
        );
        // DEL is idempotent: again, and with the namespace gone (containerd's
        // second DEL has an empty CNI_NETNS).
        fx.ok("del", &conflist, &c.args());
        fx.containers.delete(&c.netns);
        let no_netns = vec![
            "--container-id".to_owned(),
            c.container_id.clone(),
            "--netns".to_owned(),
            String::new(),
        ];
        fx.ok("del", &conflist, &no_netns);
    }
    assert!(fx.held().is_empty(), "still held: {:?}", fx.held());
}

/// CHECK fails once the container's address or one of its routes is gone;
/// DEL still works on the damaged attachment.
#[test]
fn check_detects_missing_address_and_route() {
    let fx = Fixture::start();
    for version in ["1.0.0", "1.1.0"] {
        let conflist = fx.flannel_conflist(version);

        let c = fx.container();
        let addr = fx.add(&conflist, version, &c, &[]);
        fx.ok("check", &conflist, &c.args());
        c.ip(&[
            "addr",
            "del",
            &format!("{addr}/{}", fx.subnet.prefix()),
            "dev",
            IFNAME,
        ]);
        let err = fx.fails("check", &conflist, &c.args());
        assert_ne!(err["code"], 0, "not a CNI error from the plugin: {err}");
        fx.ok("del", &conflist, &c.args());
        assert!(!fx.held().contains(&addr), "{addr} still held after DEL");

        // One attachment per route of the result: remove that route only.
        let probe = fx.container();
        let result = fx.ok("add", &conflist, &probe.args());
        let routes: Vec<String> = result["routes"]
            .as_array()
            .expect("result without routes")
            .iter()
            .map(|r| r["dst"].as_str().unwrap().to_owned())
            .collect();
        assert!(
            routes.iter().any(|r| r == "0.0.0.0/0"),
            "isDefaultGateway but no default route in {result:#}"
        );
        fx.ok("del", &conflist, &probe.args());
        for dst in routes {
            let c = fx.container();
            fx.add(&conflist, version, &c, &[]);
            fx.ok("check", &conflist, &c.args());
            c.ip(&["-4", "route", "del", &dst]);
            let err = fx.fails("check", &conflist, &c.args());
            assert_ne!(err["code"], 0, "route {dst}: not a CNI error: {err}");
            fx.ok("del", &conflist, &c.args());
        }
    }
    assert!(fx.held().is_empty(), "still held: {:?}", fx.held());
}

/// GC with `cni.dev/valid-attachments` keeps the listed attachments' IPs
/// and releases the others of its network (only): a new container can then
/// ask for the released IP, not for a kept one, and a late DEL of the
/// collected attachment does not take the address from its new owner.
#[test]
fn gc_releases_only_unlisted_attachments() {
    let fx = Fixture::start();
    let conflist = fx.flannel_conflist("1.1.0");
    let gc = |valid: Value| {
        fx.ok(
            "gc",
            &conflist,
            &["--valid-attachments".into(), valid.to_string()],
        );
    };
    let a = fx.container();
    let b = fx.container();
    let ip_a = fx.add(&conflist, "1.1.0", &a, &[]);
    let ip_b = fx.add(&conflist, "1.1.0", &b, &[]);
    assert_ne!(ip_a, ip_b);
    // Another network on the same node (and subnet): GC of ours must not
    // touch its attachment.
    let plugin = fx.flannel_conf(&fx.node().subnet_file());
    let other_name = format!("{}-other", fx.network());
    let other = fx.named_conflist("other-1.1.0", &other_name, "1.1.0", vec![plugin]);
    let e = fx.container();
    let ip_e = fx.add(&other, "1.1.0", &e, &[]);
    assert_eq!(fx.held(), BTreeSet::from([ip_a, ip_b, ip_e]));
    assert_eq!(fx.owner(ip_a), Some(a.container_id.clone()));
    assert_eq!(fx.owner(ip_b), Some(b.container_id.clone()));

    // Both listed: nothing is released.
    gc(json!([a.gc_entry(), b.gc_entry()]));
    assert_eq!(fx.held(), BTreeSet::from([ip_a, ip_b, ip_e]));

    // Only a listed: b's address is released, a's kept and still correct.
    gc(json!([a.gc_entry()]));
    assert_eq!(
        fx.held(),
        BTreeSet::from([ip_a, ip_e]),
        "after GC keeping only a"
    );
    fx.ok("check", &conflist, &a.args());

    // a's address cannot be taken; a failed ADD and its DEL release nothing.
    let d = fx.container();
    let err = fx.fails("add", &conflist, &[d.args(), args_ip(ip_a)].concat());
    assert_ne!(err["code"], 0, "{err}");
    fx.ok("del", &conflist, &d.args());
    assert_eq!(
        fx.held(),
        BTreeSet::from([ip_a, ip_e]),
        "a failed ADD's DEL"
    );
    assert_eq!(fx.owner(ip_a), Some(a.container_id.clone()));

    // b's address is free again.
    let c = fx.container();
    let ip_c = fx.add(&conflist, "1.1.0", &c, &args_ip(ip_b));
    assert_eq!(ip_c, ip_b, "asked for the released {ip_b}");
    assert_eq!(fx.owner(ip_b), Some(c.container_id.clone()));

    // A late DEL of the collected b must not release c's address.
    fx.ok("del", &conflist, &b.args());
    assert_eq!(fx.held(), BTreeSet::from([ip_a, ip_b, ip_e]), "DEL of b");
    assert_eq!(fx.owner(ip_b), Some(c.container_id.clone()));
    fx.ok("check", &conflist, &c.args());

    // An attachment is its container ID and ifname: c under another ifname
    // is not c.
    gc(json!([a.gc_entry(), {"containerID": c.container_id, "ifname": "net1"}]));
    assert_eq!(fx.held(), BTreeSet::from([ip_a, ip_e]), "c as net1 only");

    // An empty list releases everything of this network, nothing else.
    gc(json!([]));
    assert_eq!(fx.held(), BTreeSet::from([ip_e]), "after GC of []");
    fx.ok(
        "gc",
        &other,
        &[
            "--valid-attachments".into(),
            json!([e.gc_entry()]).to_string(),
        ],
    );
    assert_eq!(fx.held(), BTreeSet::from([ip_e]), "GC of the other network");
    for x in [&a, &c] {
        fx.ok("del", &conflist, &x.args());
    }
    fx.ok("del", &other, &e.args());
    assert!(fx.held().is_empty(), "still held: {:?}", fx.held());
}

/// `--args IP=<addr>` (what `podman run --ip` sends).
fn args_ip(addr: Ipv4Addr) -> Vec<String> {
    vec!["--args".to_owned(), format!("IgnoreUnknown=1;IP={addr}")]
}

/// STATUS succeeds while subnet.env is readable and fails with code 50
/// naming subnet.env while it is missing; ADD fails then too.
#[test]
fn status_follows_subnet_env() {
    let fx = Fixture::start();
    let conflist = fx.flannel_conflist("1.1.0");
    fx.ok("status", &conflist, &[]);

    let missing = fx.dir.path().join("later").join("subnet.env");
    let plugin = fx.flannel_conf(&missing);
    let later = fx.conflist("later-1.1.0", "1.1.0", vec![plugin]);
    let err = fx.fails("status", &later, &[]);
    assert_eq!(err["code"], 50, "{err}");
    let text = format!("{} {}", err["msg"], err["details"]);
    assert!(
        text.contains("subnet.env"),
        "no mention of subnet.env: {err}"
    );

    let c = fx.container();
    let err = fx.fails("add", &later, &c.args());
    assert_ne!(err["code"], 0, "{err}");
    fx.ok("del", &later, &c.args());

    // Once the file is there, STATUS and ADD succeed.
    std::fs::create_dir_all(missing.parent().unwrap()).unwrap();
    std::fs::copy(fx.node().subnet_file(), &missing).unwrap();
    fx.ok("status", &later, &[]);
    fx.add(&later, "1.1.0", &c, &[]);
    fx.ok("del", &later, &c.args());
}

/// flannel chained with Debian's tuning and portmap through libcni: the
/// capability args reach portmap on ADD and, from libcni's cache, on DEL.
#[test]
fn chained_with_tuning_and_portmap() {
    let fx = Fixture::start();
    let mut plugins = vec![
        fx.flannel_conf(&fx.node().subnet_file()),
        json!({
            "type": "tuning",
            "sysctl": {"net.ipv4.conf.eth0.arp_filter": "1"},
            "dataDir": fx.dir.path().join("tuning"),
        }),
    ];
    // Debian's portmap (1.1.1) fails every CHECK of an IPv4-only attachment
    // ("could not check ipv6 dnat: chain CNI-DN-... not found"), whatever
    // the plugin before it: CHECK runs on the chain without it.
    let without_portmap = fx.conflist("chained-check-1.0.0", "1.0.0", plugins.clone());
    plugins.push(json!({"type": "portmap", "capabilities": {"portMappings": true}}));
    let conflist = fx.conflist("chained-1.0.0", "1.0.0", plugins);
    let c = fx.container();
    let cap = json!({"portMappings": [
        {"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}
    ]})
    .to_string();
    let addr = fx.add(&conflist, "1.0.0", &c, &["--cap-args".into(), cap]);

    let sysctl = netns_exec(
        &c.netns,
        ["sysctl", "-n", "net.ipv4.conf.eth0.arp_filter"],
        CMD_TIMEOUT,
    )
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&sysctl.stdout).trim(), "1");
    let nat = || fx.node().exec_ok(["iptables-save", "-t", "nat"]).unwrap();
    let rules = nat();
    assert!(
        rules
            .lines()
            .any(|l| l.contains("--dport 18080") && l.contains(&format!("{addr}:80"))),
        "no DNAT 18080 -> {addr}:80:\n{rules}"
    );

    fx.ok("check", &without_portmap, &c.args());
    c.ip(&["link", "set", IFNAME, "mtu", "1400"]);
    let err = fx.fails("check", &without_portmap, &c.args());
    assert_ne!(err["code"], 0, "{err}");

    // No --cap-args: the client passes the cached ADD's.
    fx.ok("del", &conflist, &c.args());
    let rules = nat();
    assert!(!rules.contains("18080"), "portmap rules left:\n{rules}");
    assert!(!c.has_interface());
    fx.ok("del", &conflist, &c.args());
    assert!(fx.held().is_empty(), "still held: {:?}", fx.held());
}
