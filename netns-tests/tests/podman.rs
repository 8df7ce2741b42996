//! podman 4.3.1 with its CNI network backend drives our `flannel` CNI
//! plugin on a one-node cluster (real etcd, real flanneld), with a conflist
//! `flannel` + `portmap` for CNI 1.0.0 and for 0.4.0:
//!
//! - podman takes the conflist (`podman network inspect` shows `flannel`);
//! - two containers get distinct host addresses of the node's
//!   `FLANNEL_SUBNET`, `FLANNEL_MTU`, the default route via the bridge, a
//!   hairpin veth on `cni0`, and ping each other and the bridge;
//! - `--ip` is honoured, and a published port (`-p`, portmap chained after
//!   our result) serves a page on the node's address;
//! - `podman rm` releases everything: namespace, host veth, the IPAM
//!   reservation in `dataDir`, libcni's cache entry; the released address
//!   can be requested again (with `--mac-address`, also honoured);
//! - `podman restart` (DEL, then ADD in a new namespace) keeps the container
//!   reachable and releases its old address;
//! - every CNI call succeeded, and each container got as many DELs as ADDs.
//!
//! The same scenario with Debian's reference plugins (`bridge` +
//! `host-local` + `portmap`, configured as flannel would configure them) is
//! the baseline: if it passes and the flannel run fails, the plugin is at
//! fault, not the podman setup. See `tests/podman/runtime.rs` for the
//! private podman and `/work/shared/docs/real-clients.md` for what podman
//! sends.
//!
//! Needs root, `podman runc conmon containernetworking-plugins
//! busybox-static`, and the plugin built (`cargo build -p cni-plugin`, or
//! `$FLANNEL_CNI` pointing at it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "podman/runtime.rs"]
mod runtime;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use netns_tests::{
    Cluster, ClusterSpec, IP_TIMEOUT, Node, SUBNET_ENV_TIMEOUT, UNDERLAY_IFACE, cni_plugin_binary,
    ip, require_root, run, wait_for,
};
use serde_json::{Value, json};

use runtime::{INDEX_PAGE, Podman, libcni_cache_entries};

/// The host port the published container maps to its port 80 (in the node
/// namespace, so any port is free).
const HOST_PORT: u16 = 18080;
/// The requested address (`--ip`) is this host of the node's subnet.
const REQUESTED_HOST: u32 = 200;
/// The MAC address requested for the fourth container (`--mac-address`,
/// locally administered).
const REQUESTED_MAC: &str = "02:00:0a:f4:c8:42";
/// How long a removed container's host veth may take to go.
const VETH_WAIT: Duration = Duration::from_secs(3);
/// How long the published port may take to answer (httpd starting).
const HTTP_WAIT: Duration = Duration::from_secs(10);

/// Which plugins the network is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plugins {
    /// Ours: `flannel` (bridge, veth and IPAM in-process) + `portmap`.
    Flannel,
    /// Debian's `bridge` + `host-local` + `portmap`, set up as flannel
    /// would set them up: the baseline for the podman plumbing.
    Reference,
}

impl Plugins {
    /// The first plugin's type, which `podman network inspect` reports as
    /// the driver; it is also the plugin whose calls are logged.
    fn driver(self) -> &'static str {
        match self {
            Self::Flannel => "flannel",
            Self::Reference => "bridge",
        }
    }

    /// The binary behind [`Plugins::driver`].
    fn binary(self) -> PathBuf {
        match self {
            Self::Flannel => cni_plugin_binary(),
            Self::Reference => PathBuf::from("/usr/lib/cni/bridge"),
        }
    }
}

/// What the node's subnet.env says.
#[derive(Debug, Clone, Copy)]
struct NodeNet {
    /// `FLANNEL_SUBNET` as a network (`10.244.7.0/24`).
    subnet: Ipv4Network,
    /// Its first address, the bridge's (`10.244.7.1`).
    gateway: Ipv4Addr,
    /// `FLANNEL_MTU`.
    mtu: u32,
}

/// The conflist of network `name`.
fn conflist(
    plugins: Plugins,
    cni_version: &str,
    name: &str,
    subnet_file: &Path,
    data_dir: &Path,
    net: NodeNet,
) -> Value {
    let first = match plugins {
        Plugins::Flannel => json!({
            "type": "flannel",
            "subnetFile": subnet_file,
            "dataDir": data_dir,
            "delegate": {"hairpinMode": true, "isDefaultGateway": true},
        }),
        Plugins::Reference => json!({
            "type": "bridge",
            "bridge": "cni0",
            "mtu": net.mtu,
            "isGateway": true,
            "isDefaultGateway": true,
            "hairpinMode": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": net.subnet.to_string(), "gateway": net.gateway.to_string()}]],
                "dataDir": data_dir,
            },
        }),
    };
    json!({
        "cniVersion": cni_version,
        "name": name,
        "plugins": [first, {"type": "portmap", "capabilities": {"portMappings": true}}],
    })
}

/// A container as podman and the kernel see it.
#[derive(Debug, Clone)]
struct Ctr {
    /// Its podman name.
    name: String,
    /// The full 64-hex ID (the CNI container ID).
    id: String,
    /// Its address on the network.
    ip: Ipv4Addr,
    /// Its network namespace (`/run/netns/netns-<uuid>`).
    sandbox: String,
    /// The ifindex of its veth's host end in the node namespace.
    host_ifindex: u32,
    /// The MAC address podman reports (from the CNI result).
    mac: String,
    /// The gateway podman reports (from the CNI result).
    gateway: String,
    /// The prefix length podman reports (from the CNI result).
    prefix_len: u64,
}

/// One podman network on one node, with the image to run.
struct Net<'a> {
    /// The node.
    node: &'a Node,
    /// Its private podman.
    podman: &'a Podman,
    /// The network name.
    name: String,
    /// The image.
    image: String,
    /// The node's subnet.
    net: NodeNet,
    /// The plugin's `dataDir` (or host-local's).
    data_dir: PathBuf,
    /// The plugins under test.
    plugins: Plugins,
}

impl Net<'_> {
    /// `podman run -d --name <name> --network <net> <extra> <image> <cmd>`;
    /// checks the container's `eth0` and returns it.
    fn start(&self, name: &str, extra: &[&str], cmd: &[&str]) -> Ctr {
        let mut args = vec!["run", "-d", "--pull=never", "--name", name, "--network"];
        args.push(&self.name);
        args.extend_from_slice(extra);
        args.push(&self.image);
        args.extend_from_slice(cmd);
        let id = self.podman.ok(&args);
        let c = self.inspect(name);
        assert_eq!(c.id, id, "podman run printed another ID than inspect");
        self.check_eth0(&c);
        c
    }

    /// The container `name` from `podman container inspect`.
    fn inspect(&self, name: &str) -> Ctr {
        let text = self.podman.ok(["container", "inspect", name]);
        let v: Value = serde_json::from_str(&text).expect("podman inspect prints JSON");
        let c = &v[0];
        let field = |value: &Value, what: &str| -> String {
            value
                .as_str()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| panic!("no {what} in podman inspect of {name}:\n{text}"))
                .to_owned()
        };
        assert_eq!(
            c["State"]["Running"],
            json!(true),
            "{name} is not running:\n{text}"
        );
        let settings = &c["NetworkSettings"];
        let attachment = &settings["Networks"][&self.name];
        let ip = field(&attachment["IPAddress"], "IPAddress");
        let iflink = self.exec_ok(name, &["cat", "/sys/class/net/eth0/iflink"]);
        Ctr {
            name: name.to_owned(),
            id: field(&c["Id"], "Id"),
            ip: ip
                .parse()
                .unwrap_or_else(|e| panic!("IPAddress {ip:?}: {e}")),
            sandbox: field(&settings["SandboxKey"], "SandboxKey"),
            host_ifindex: iflink
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("iflink {iflink:?} of {name}: {e}")),
            mac: field(&attachment["MacAddress"], "MacAddress"),
            gateway: field(&attachment["Gateway"], "Gateway"),
            prefix_len: attachment["IPPrefixLen"]
                .as_u64()
                .unwrap_or_else(|| panic!("no IPPrefixLen in podman inspect of {name}:\n{text}")),
        }
    }

    /// `podman exec <name> <cmd>`: stdout, or a panic with the output.
    fn exec_ok(&self, name: &str, cmd: &[&str]) -> String {
        let mut args = vec!["exec", name];
        args.extend_from_slice(cmd);
        self.podman.ok(&args)
    }

    /// Asserts the container's address is a host of the node's subnet
    /// (not the network, gateway or broadcast address), that `eth0` has it
    /// with the subnet's prefix, `FLANNEL_MTU` and the MAC address podman
    /// got from the CNI result, that the result's gateway is the bridge, and
    /// that the default route goes through it (`isDefaultGateway`).
    fn check_eth0(&self, c: &Ctr) {
        let NodeNet {
            subnet,
            gateway,
            mtu,
        } = self.net;
        assert!(
            subnet.contains(c.ip)
                && c.ip != subnet.network()
                && c.ip != subnet.broadcast()
                && c.ip != gateway,
            "{} got {}, not a host address of the node's FLANNEL_SUBNET {subnet} (gateway \
             {gateway})",
            c.name,
            c.ip
        );
        let addr = self.exec_ok(&c.name, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
        let cidr = format!("inet {}/{} ", c.ip, subnet.prefix());
        assert!(
            addr.contains(&cidr),
            "{}: eth0 lacks `{cidr}`:\n{addr}",
            c.name
        );
        assert_eq!(
            (c.gateway.as_str(), c.prefix_len),
            (gateway.to_string().as_str(), u64::from(subnet.prefix())),
            "{}: the CNI result's gateway and prefix length as podman reports them",
            c.name
        );
        let mac = self.exec_ok(&c.name, &["cat", "/sys/class/net/eth0/address"]);
        assert_eq!(
            mac, c.mac,
            "{}: eth0's MAC is not the one in the CNI result",
            c.name
        );
        let got_mtu = self.exec_ok(&c.name, &["cat", "/sys/class/net/eth0/mtu"]);
        assert_eq!(
            got_mtu,
            mtu.to_string(),
            "{}: eth0's MTU is not FLANNEL_MTU",
            c.name
        );
        let routes = self.exec_ok(&c.name, &["ip", "-4", "route", "show"]);
        assert!(
            routes
                .lines()
                .any(|l| l.starts_with(&format!("default via {gateway} "))),
            "{}: no default route via {gateway}:\n{routes}",
            c.name
        );
    }

    /// `podman exec <from> ping -c <count> -i 0.2 -W 2 <to>`; asserts every echo
    /// was answered.
    fn ping(&self, from: &Ctr, to: Ipv4Addr, count: u32) {
        let count = count.to_string();
        let to_s = to.to_string();
        let out = self.podman.run([
            "exec", &from.name, "ping", "-c", &count, "-i", "0.2", "-W", "2", &to_s,
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(&format!("{count} packets received")),
            "{} ({}) cannot ping {to}:\n{text}{}\n{}",
            from.name,
            from.ip,
            String::from_utf8_lossy(&out.stderr),
            self.node_state()
        );
    }

    /// The node's veths but its underlay `eth0`, as `(ifindex, the ip -d
    /// line)`.
    fn host_veths(&self) -> BTreeMap<u32, String> {
        let ns = self.node.netns();
        let underlay = format!(" {UNDERLAY_IFACE}@");
        ip(["-n", ns, "-d", "-o", "link", "show", "type", "veth"])
            .unwrap()
            .lines()
            .filter(|l| !l.contains(&underlay))
            .filter_map(|l| Some((l.split(':').next()?.trim().parse().ok()?, l.to_owned())))
            .collect()
    }

    /// The node's veths once `done` holds for them, or after
    /// [`VETH_WAIT`] (a veth whose other end was left to the deletion of
    /// the container's namespace goes asynchronously, in the kernel's
    /// namespace cleanup).
    fn settled_veths(
        &self,
        done: impl Fn(&BTreeMap<u32, String>) -> bool,
    ) -> BTreeMap<u32, String> {
        let deadline = Instant::now() + VETH_WAIT;
        loop {
            let veths = self.host_veths();
            if done(&veths) || Instant::now() >= deadline {
                return veths;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Asserts that the node's veths are exactly the host ends of `live`,
    /// each on `cni0` with hairpin mode on (the delegate's `hairpinMode`).
    fn assert_veths(&self, live: &[&Ctr]) {
        let mut want: Vec<u32> = live.iter().map(|c| c.host_ifindex).collect();
        want.sort_unstable();
        let veths = self.settled_veths(|v| v.keys().copied().eq(want.iter().copied()));
        let got: Vec<u32> = veths.keys().copied().collect();
        assert_eq!(
            got,
            want,
            "the node's veths are not exactly the host ends of {:?}\n{}",
            live.iter().map(|c| &c.name).collect::<Vec<_>>(),
            self.node_state()
        );
        for c in live {
            let line = &veths[&c.host_ifindex];
            assert!(
                line.contains(" master cni0 ") && line.contains(" hairpin on "),
                "{}'s host veth is not a hairpin port of cni0: {line}",
                c.name
            );
        }
    }

    /// Files under the data directory that name `id` (in their path or
    /// their content): the IPAM reservations of that container.
    fn reservations(&self, id: &str) -> Vec<PathBuf> {
        fn walk(dir: &Path, id: &str, found: &mut Vec<PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&path, id, found);
                } else if path.to_string_lossy().contains(id)
                    || std::fs::read(&path).is_ok_and(|b| String::from_utf8_lossy(&b).contains(id))
                {
                    found.push(path);
                }
            }
        }
        let mut found = Vec::new();
        walk(&self.data_dir, id, &mut found);
        found
    }

    /// The file that reserves `ip`: `ipam/<subnet as in lease keys>/<ip>`
    /// for our plugin (the layout in `cni-plugin/src/ipam.rs`),
    /// `<network>/<ip>` for host-local.
    fn reservation_file(&self, ip: Ipv4Addr) -> PathBuf {
        let subnet = self.net.subnet;
        match self.plugins {
            Plugins::Flannel => {
                self.data_dir
                    .join("ipam")
                    .join(format!("{}-{}", subnet.network(), subnet.prefix()))
            }
            Plugins::Reference => self.data_dir.join(&self.name),
        }
        .join(ip.to_string())
    }

    /// Asserts that the data directory holds `c`'s reservation: the
    /// [`Net::reservation_file`] of its address names the container (for
    /// our plugin exactly `<network>\n<id>\neth0\n`), so the release checks
    /// of [`Net::remove`] are not vacuous.
    fn assert_reserved(&self, c: &Ctr) {
        let file = self.reservation_file(c.ip);
        let owner = std::fs::read_to_string(&file).unwrap_or_else(|e| {
            panic!(
                "{}'s reservation {}: {e}\n{}",
                c.name,
                file.display(),
                self.data_dir_listing()
            )
        });
        let expected = match self.plugins {
            Plugins::Flannel => vec![self.name.as_str(), c.id.as_str(), "eth0"],
            Plugins::Reference => vec![c.id.as_str(), "eth0"],
        };
        assert_eq!(
            owner.lines().collect::<Vec<_>>(),
            expected,
            "{}'s reservation {} names another owner",
            c.name,
            file.display()
        );
        if self.plugins == Plugins::Flannel {
            assert!(owner.ends_with('\n'), "{}: {owner:?}", file.display());
        }
    }

    /// The data directory's files and contents, for failure messages.
    fn data_dir_listing(&self) -> String {
        let out = run(
            Command::new("grep")
                .args(["-r", "", "--"])
                .arg(&self.data_dir),
            IP_TIMEOUT,
        );
        match out {
            Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
            Err(e) => format!("<{e}>"),
        }
    }

    /// `podman rm -f -t 0 <names>`, then asserts that each container is
    /// gone without a trace: no namespace, no host veth, no reservation,
    /// no libcni cache entry.
    fn remove(&self, gone: &[&Ctr]) {
        let mut args = vec!["rm", "-f", "-t", "0"];
        args.extend(gone.iter().map(|c| c.name.as_str()));
        self.podman.ok(&args);
        let veths = self.settled_veths(|v| gone.iter().all(|c| !v.contains_key(&c.host_ifindex)));
        for c in gone {
            assert!(
                !Path::new(&c.sandbox).exists(),
                "{}'s namespace {} outlived podman rm",
                c.name,
                c.sandbox
            );
            assert!(
                !veths.contains_key(&c.host_ifindex),
                "{}'s host veth (ifindex {}) outlived podman rm\n{}",
                c.name,
                c.host_ifindex,
                self.node_state()
            );
            assert!(
                !self.reservation_file(c.ip).exists(),
                "{}'s address {} is still reserved after podman rm\n{}",
                c.name,
                c.ip,
                self.data_dir_listing()
            );
            let left = self.reservations(&c.id);
            assert!(
                left.is_empty(),
                "the data dir still holds {}'s reservation after podman rm: {left:?}\n{}\n{}",
                c.name,
                self.data_dir_listing(),
                self.podman.call_log_tail()
            );
            let cached: Vec<_> = libcni_cache_entries(&self.name)
                .into_iter()
                .filter(|p| p.to_string_lossy().contains(&c.id))
                .collect();
            assert!(
                cached.is_empty(),
                "libcni still caches {}'s result (so its DEL failed): {cached:?}\n{}",
                c.name,
                self.podman.call_log_tail()
            );
        }
    }

    /// GETs `/index.html` through the published host port on the node's
    /// own underlay address (portmap's DNAT for local traffic), with
    /// busybox `nc` in the node namespace; retries until httpd answers.
    fn assert_published(&self) {
        let request = format!(
            "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | {} nc -w 3 {} {HOST_PORT}",
            runtime::BUSYBOX,
            self.node.underlay_ip()
        );
        let mut last = String::new();
        let answered = wait_for(
            &format!("port {HOST_PORT} of {}", self.node.underlay_ip()),
            HTTP_WAIT,
            Duration::from_millis(200),
            || {
                let out = self.node.exec(["sh", "-c", &request]);
                last = match out {
                    Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
                    Err(e) => e.to_string(),
                };
                last.contains(INDEX_PAGE)
            },
        );
        assert!(
            answered.is_ok(),
            "the published port {HOST_PORT} did not serve the page; last answer:\n{last}\n{}",
            self.node_state()
        );
    }

    /// The node's links, addresses, routes and NAT rules, for failure
    /// messages.
    fn node_state(&self) -> String {
        let ns = self.node.netns();
        let mut text = String::new();
        for args in [
            &["-n", ns, "-br", "link"][..],
            &["-n", ns, "-br", "addr"][..],
            &["-n", ns, "route"][..],
        ] {
            let out = ip(args).unwrap_or_else(|e| e.to_string());
            text.push_str(&format!("----- ip {}:\n{out}", args.join(" ")));
        }
        let nat = self
            .node
            .exec(["iptables-save", "-t", "nat"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| e.to_string());
        text.push_str(&format!("----- iptables-save -t nat:\n{nat}"));
        text
    }
}

/// One parsed entry of the CNI call log.
#[derive(Debug)]
struct Call {
    /// `CNI_COMMAND`.
    command: String,
    /// The plugin's exit status.
    exit: String,
    /// `CNI_CONTAINERID`.
    id: String,
    /// The header line, for messages.
    header: String,
}

/// The calls in the log the plugin wrapper wrote.
fn calls(log: &str) -> Vec<Call> {
    log.lines()
        .filter_map(|l| l.strip_prefix("=== "))
        .map(|h| {
            let word = |key: &str| {
                h.split(' ')
                    .find_map(|w| w.strip_prefix(key))
                    .unwrap_or_default()
                    .to_owned()
            };
            Call {
                command: h.split(' ').next().unwrap_or_default().to_owned(),
                exit: word("exit="),
                id: word("id="),
                header: h.to_owned(),
            }
        })
        .collect()
}

/// Asserts that every call of the plugin succeeded and that each of
/// `containers` (by ID) got `adds` ADDs and as many DELs.
fn assert_calls(podman: &Podman, containers: &[(&Ctr, usize)]) {
    let log = podman.call_log();
    let calls = calls(&log);
    let failed: Vec<_> = calls.iter().filter(|c| c.exit != "0").collect();
    assert!(
        failed.is_empty(),
        "CNI calls failed: {failed:#?}\n{}",
        podman.call_log_tail()
    );
    for (c, adds) in containers {
        let count = |command: &str| {
            calls
                .iter()
                .filter(|x| x.command == command && x.id == c.id)
                .count()
        };
        assert_eq!(
            (count("ADD"), count("DEL")),
            (*adds, *adds),
            "(ADD, DEL) calls for {} ({})\n{}",
            c.name,
            c.id,
            podman.call_log_tail()
        );
    }
    assert!(
        calls.iter().any(|c| c.command == "VERSION"),
        "podman never asked the plugin's VERSION: {:?}",
        calls.iter().map(|c| &c.header).collect::<Vec<_>>()
    );
}

/// The whole scenario for one network of `plugins` with `cniVersion`
/// `cni_version`.
fn podman_scenario(plugins: Plugins, cni_version: &str) {
    require_root().unwrap();
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        ..ClusterSpec::default()
    })
    .unwrap();
    let node = cluster.node(0);
    let env = node.wait_subnet_env(SUBNET_ENV_TIMEOUT).unwrap();
    let net = NodeNet {
        subnet: env.subnet_network().expect("subnet.env has FLANNEL_SUBNET"),
        gateway: env.subnet.expect("subnet.env has FLANNEL_SUBNET").ip(),
        mtu: env.mtu.expect("subnet.env has FLANNEL_MTU"),
    };
    // Declared after the cluster: dropped (containers removed) before the
    // node namespace goes.
    let podman = Podman::new(node.netns());
    let name = format!("{}-{}", cluster.prefix(), plugins.driver());
    let data_dir = podman.path().join("cni-data");
    podman.install_plugin(plugins.driver(), &plugins.binary());
    podman.write_conflist(
        &name,
        &conflist(
            plugins,
            cni_version,
            &name,
            &node.subnet_file(),
            &data_dir,
            net,
        ),
    );
    // podman warns and carries on with a bridge network of its own making
    // if it rejects a conflist (or the plugin's VERSION answer).
    let driver = podman.ok(["network", "inspect", "--format", "{{.Driver}}", &name]);
    assert_eq!(
        driver,
        plugins.driver(),
        "podman did not take the conflist\n{}",
        podman.call_log_tail()
    );
    let image = podman.import_busybox();
    let n = Net {
        node,
        podman: &podman,
        name,
        image,
        net,
        data_dir,
        plugins,
    };
    let sleep = ["sleep", "600"];

    // Two containers: distinct addresses of the subnet, reachable.
    let c1 = n.start("c1", &[], &sleep);
    let c2 = n.start("c2", &[], &sleep);
    assert_ne!(c1.ip, c2.ip, "two containers got the same address");
    n.ping(&c1, c2.ip, 3);
    n.ping(&c2, c1.ip, 3);
    n.ping(&c1, net.gateway, 1);
    n.assert_veths(&[&c1, &c2]);
    n.assert_reserved(&c1);
    n.assert_reserved(&c2);

    // A requested address and a published port.
    let requested = net
        .subnet
        .nth(REQUESTED_HOST)
        .expect("the subnet has 200 hosts");
    assert!(![c1.ip, c2.ip].contains(&requested));
    let requested_s = requested.to_string();
    let publish = format!("{HOST_PORT}:80");
    let c3 = n.start(
        "c3",
        &["--ip", &requested_s, "-p", &publish],
        &["httpd", "-f", "-p", "80", "-h", "/www"],
    );
    assert_eq!(c3.ip, requested, "--ip {requested} was not honoured");
    n.ping(&c1, c3.ip, 1);
    n.assert_published();
    n.assert_reserved(&c3);

    // podman rm releases everything; the requested address can be had again.
    n.remove(&[&c3]);
    n.assert_veths(&[&c1, &c2]);
    let c4 = n.start(
        "c4",
        &["--ip", &requested_s, "--mac-address", REQUESTED_MAC],
        &sleep,
    );
    assert_eq!(
        c4.ip, requested,
        "the released address {requested} was not given out again"
    );
    assert_eq!(c4.mac, REQUESTED_MAC, "--mac-address was not honoured");
    n.ping(&c4, c1.ip, 1);

    // podman restart: DEL, then ADD in a new namespace; still reachable.
    n.podman.ok(["restart", "-t", "0", "c2"]);
    let c2b = n.inspect("c2");
    n.check_eth0(&c2b);
    assert_eq!(c2b.id, c2.id);
    assert_ne!(c2b.sandbox, c2.sandbox, "restart kept the old namespace");
    assert!(
        !Path::new(&c2.sandbox).exists(),
        "the namespace before the restart is still there"
    );
    n.ping(&c1, c2b.ip, 3);
    n.ping(&c2b, c1.ip, 1);
    n.assert_veths(&[&c1, &c2b, &c4]);
    n.assert_reserved(&c2b);
    if c2b.ip != c2.ip {
        assert!(
            !n.reservation_file(c2.ip).exists(),
            "c2's address before the restart, {}, is still reserved\n{}",
            c2.ip,
            n.data_dir_listing()
        );
    }
    n.assert_reserved(&c4);

    // Everything removed: no veth, no reservation, no cache entry.
    n.remove(&[&c1, &c2b, &c4]);
    n.assert_veths(&[]);
    let cached = libcni_cache_entries(&n.name);
    assert!(cached.is_empty(), "libcni cache entries left: {cached:?}");
    assert_calls(&podman, &[(&c1, 1), (&c2, 2), (&c3, 1), (&c4, 1)]);
}

/// podman with a CNI 1.0.0 conflist of our plugin.
#[test]
fn podman_flannel_cni_1_0_0() {
    podman_scenario(Plugins::Flannel, "1.0.0");
}

/// podman with a CNI 0.4.0 conflist of our plugin.
#[test]
fn podman_flannel_cni_0_4_0() {
    podman_scenario(Plugins::Flannel, "0.4.0");
}

/// The baseline: the same scenario with Debian's reference plugins, which
/// shows that the podman setup itself works.
#[test]
fn podman_reference_plugins_baseline() {
    podman_scenario(Plugins::Reference, "1.0.0");
}
