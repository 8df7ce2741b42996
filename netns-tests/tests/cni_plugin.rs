//! The `flannel` CNI plugin in real namespaces: many sequential and
//! concurrent ADDs, SIGKILL during ADD then GC, CHECK against hand-made
//! damage, repeated ADD, requested addresses, `ipMasq`, delegation to another
//! plugin, and Debian's reference `tuning` and `portmap` chained after it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use netns_tests::{
    Cluster, ClusterSpec, CniCall, CniOutput, Node, cni_exec, cni_plugin_binary, ip, require_root,
    run_ok,
};
use serde_json::{Value, json};
use subnet::subnet_env::{SubnetEnv, write_atomic};

/// One node whose subnet.env we write ourselves (no flanneld needed to test
/// the plugin on one node).
fn node_with_subnet(third_octet: u8, ipmasq: bool) -> (Cluster, Ipv4Network) {
    require_root().unwrap();
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        start_flanneld: false,
        config: String::new(),
        ..ClusterSpec::default()
    })
    .unwrap();
    let gateway: Ipv4Network = format!("10.244.{third_octet}.1/24").parse().unwrap();
    let env = SubnetEnv {
        networks: vec!["10.244.0.0/16".parse().unwrap()],
        subnet: Some(gateway),
        mtu: Some(1450),
        ipmasq: Some(ipmasq),
        ..SubnetEnv::default()
    };
    write_atomic(&cluster.node(0).subnet_file(), &env).unwrap();
    let subnet = env.subnet_network().unwrap();
    (cluster, subnet)
}

fn call(node: &Node, command: &str, netns: &str, config: &Value) -> CniOutput {
    cni_exec(
        Some(node.netns()),
        &cni_plugin_binary(),
        &CniCall::new(command, netns, netns),
        config,
    )
    .unwrap()
}

fn add(node: &Node, netns: &str) -> Value {
    call(node, "ADD", netns, &node.cni_config())
        .result()
        .unwrap()
}

fn address_of(result: &Value) -> Ipv4Addr {
    let cidr: Ipv4Network = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    cidr.ip()
}

fn with_prev(config: &Value, prev: &Value) -> Value {
    let mut c = config.clone();
    c["prevResult"] = prev.clone();
    c
}

/// Reservations on disk: address -> container ID (the IPAM layout documented
/// in `cni-plugin/src/ipam.rs`).
fn reservations(node: &Node, subnet: Ipv4Network) -> HashMap<Ipv4Addr, String> {
    let dir =
        node.cni_data_dir()
            .join("ipam")
            .join(format!("{}-{}", subnet.network(), subnet.prefix()));
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return HashMap::new();
    };
    entries
        .filter_map(|e| {
            let e = e.unwrap();
            let ip: Ipv4Addr = e.file_name().to_str()?.parse().ok()?;
            let owner = std::fs::read_to_string(e.path()).unwrap();
            Some((ip, owner.lines().nth(1).unwrap().to_owned()))
        })
        .collect()
}

/// Container veths on the node (its underlay `eth0` is a veth too).
fn host_veths(node: &Node) -> usize {
    ip(["-n", node.netns(), "-o", "link", "show", "type", "veth"])
        .unwrap()
        .lines()
        .filter(|l| l.contains(": veth"))
        .count()
}

fn container_address(netns: &str) -> Option<String> {
    ip(["-n", netns, "-4", "-o", "addr", "show", "dev", "eth0"])
        .ok()?
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .map(str::to_owned)
}

fn usable(subnet: Ipv4Network, ip: Ipv4Addr) -> bool {
    subnet.contains(ip)
        && ip != subnet.network()
        && ip != subnet.broadcast()
        && ip != Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

#[test]
fn sequential_adds_get_distinct_addresses_and_dels_free_them() {
    let (cluster, subnet) = node_with_subnet(31, true);
    let node = cluster.node(0);
    let mut netnses = Vec::new();
    let mut ips = HashSet::new();
    for _ in 0..100 {
        let ns = node.add_container_netns().unwrap();
        let ip = address_of(&add(node, &ns));
        assert!(
            usable(subnet, ip),
            "{ip} is not a container address of {subnet}"
        );
        assert!(ips.insert(ip), "{ip} handed out twice");
        netnses.push(ns);
    }
    assert_eq!(reservations(node, subnet).len(), 100);
    assert_eq!(host_veths(node), 100);
    // The first and the last container share the bridge.
    let last = netnses.last().unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &netnses[0], "ping", "-c", "1", "-W", "2"])
        .arg(container_address(last).unwrap().split('/').next().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    for ns in &netnses {
        call(node, "DEL", ns, &node.cni_config())
            .succeeded()
            .unwrap();
        assert_eq!(container_address(ns), None, "{ns} still has eth0");
    }
    assert!(
        reservations(node, subnet).is_empty(),
        "{:?}",
        reservations(node, subnet)
    );
    assert_eq!(host_veths(node), 0);
    let attachments = node.cni_data_dir().join("ipam/attachments");
    assert_eq!(std::fs::read_dir(attachments).unwrap().count(), 0);
    // DEL again, and DEL as containerd's second DEL (no netns), are no-ops.
    call(node, "DEL", &netnses[0], &node.cni_config())
        .succeeded()
        .unwrap();
    let mut no_netns = CniCall::new("DEL", &netnses[1], "");
    no_netns.container_id.clone_from(&netnses[1]);
    cni_exec(
        Some(node.netns()),
        &cni_plugin_binary(),
        &no_netns,
        &node.cni_config(),
    )
    .unwrap()
    .succeeded()
    .unwrap();
}

#[test]
fn concurrent_adds_get_distinct_addresses() {
    let (cluster, subnet) = node_with_subnet(32, true);
    let node = cluster.node(0);
    let netnses: Vec<String> = (0..50)
        .map(|_| node.add_container_netns().unwrap())
        .collect();
    let results: Vec<(String, Value)> = thread::scope(|s| {
        let handles: Vec<_> = netnses
            .iter()
            .map(|ns| s.spawn(move || (ns.clone(), add(node, ns))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ips: HashSet<Ipv4Addr> = results.iter().map(|(_, r)| address_of(r)).collect();
    assert_eq!(ips.len(), 50, "duplicate addresses among concurrent ADDs");
    for (ns, result) in &results {
        let ip = address_of(result);
        assert!(usable(subnet, ip));
        assert_eq!(container_address(ns).unwrap(), format!("{ip}/24"), "{ns}");
    }
    assert_eq!(host_veths(node), 50);
    assert_eq!(reservations(node, subnet).len(), 50);
}

#[test]
fn sigkill_during_add_then_gc_leaves_no_leak_and_no_duplicate() {
    let (cluster, subnet) = node_with_subnet(33, true);
    let node = cluster.node(0);
    let config = node.cni_config().to_string();
    let mut survivors = Vec::new();
    let mut killed = 0;
    // Kill after 0, 0.5, 1, ... 20 ms: every phase of an ADD gets hit.
    for i in 0..40u64 {
        let ns = node.add_container_netns().unwrap();
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", node.netns()))
            .arg(cni_plugin_binary())
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", &ns)
            .env("CNI_NETNS", format!("/run/netns/{ns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(config.as_bytes()).unwrap();
        }
        thread::sleep(Duration::from_micros(i * 500));
        // nsenter execs the plugin: this PID is our plugin process.
        let finished = child.try_wait().unwrap();
        let status = match finished {
            Some(status) => status,
            None => {
                child.kill().unwrap();
                child.wait().unwrap()
            }
        };
        if status.success() {
            survivors.push(ns);
        } else {
            killed += 1;
            // What a runtime does with a failed container: drop its netns.
            node.delete_container_netns(&ns).unwrap();
        }
    }
    assert!(
        killed > 0,
        "no ADD was interrupted; the test proves nothing"
    );
    let valid: Vec<Value> = survivors
        .iter()
        .map(|ns| json!({"containerID": ns, "ifname": "eth0"}))
        .collect();
    let mut gc = node.cni_config();
    gc["cni.dev/valid-attachments"] = Value::Array(valid);
    let out = cni_exec(
        Some(node.netns()),
        &cni_plugin_binary(),
        &CniCall::new("GC", "", ""),
        &gc,
    )
    .unwrap();
    out.succeeded().unwrap();

    let held = reservations(node, subnet);
    let holders: HashSet<&String> = held.values().collect();
    let expected: HashSet<&String> = survivors.iter().collect();
    assert_eq!(
        holders, expected,
        "after GC exactly the finished ADDs hold addresses"
    );
    assert_eq!(held.len(), survivors.len(), "one address per container");

    // New containers never get an address still in use.
    let mut in_use: HashSet<Ipv4Addr> = held.keys().copied().collect();
    for _ in 0..20 {
        let ns = node.add_container_netns().unwrap();
        let ip = address_of(&add(node, &ns));
        assert!(in_use.insert(ip), "{ip} given out twice after the kills");
    }
    eprintln!("{killed} of 40 ADDs killed, {} finished", survivors.len());
}

#[test]
fn check_detects_hand_made_damage_and_repeated_add_repairs_it() {
    let (cluster, _subnet) = node_with_subnet(34, true);
    let node = cluster.node(0);
    let ns = node.add_container_netns().unwrap();
    let first = add(node, &ns);
    let second = add(node, &ns);
    assert_eq!(first, second, "ADD twice must return the same result");
    let check_config = with_prev(&node.cni_config(), &first);
    call(node, "CHECK", &ns, &check_config).succeeded().unwrap();

    let cidr = first["ips"][0]["address"].as_str().unwrap().to_owned();
    ip(["-n", &ns, "addr", "del", &cidr, "dev", "eth0"]).unwrap();
    let out = call(node, "CHECK", &ns, &check_config);
    assert!(!out.success);
    assert_eq!(out.error_code(), Some(100));
    assert!(out.stdout.contains(&cidr), "{}", out.stdout);

    // ADD repeated restores the address (and routes), CHECK passes again.
    assert_eq!(add(node, &ns), first);
    call(node, "CHECK", &ns, &check_config).succeeded().unwrap();

    ip(["-n", &ns, "route", "del", "10.244.0.0/16"]).unwrap();
    let out = call(node, "CHECK", &ns, &check_config);
    assert!(!out.success);
    assert!(out.stdout.contains("10.244.0.0/16"), "{}", out.stdout);

    assert_eq!(add(node, &ns), first);
    let host_veth = first["interfaces"][1]["name"].as_str().unwrap().to_owned();
    ip(["-n", node.netns(), "link", "set", &host_veth, "nomaster"]).unwrap();
    let out = call(node, "CHECK", &ns, &check_config);
    assert!(!out.success, "a host veth off the bridge must fail CHECK");
    assert!(out.stdout.contains("cni0"), "{}", out.stdout);
    let repaired = add(node, &ns);
    // (The bridge's own MTU reads 1500 while it has no port: compare the rest.)
    assert_eq!(repaired["ips"], first["ips"]);
    assert_eq!(
        repaired["interfaces"][1], first["interfaces"][1],
        "same host veth"
    );
    assert_eq!(
        repaired["interfaces"][2], first["interfaces"][2],
        "same eth0"
    );
    call(node, "CHECK", &ns, &check_config).succeeded().unwrap();
}

#[test]
fn requested_addresses_and_macs_are_honoured() {
    let (cluster, subnet) = node_with_subnet(35, true);
    let node = cluster.node(0);
    let ns = node.add_container_netns().unwrap();
    let want = Ipv4Addr::new(10, 244, 35, 77);
    let mut a = CniCall::new("ADD", &ns, &ns);
    a.args = format!("IgnoreUnknown=1;K8S_POD_NAME=x;IP={want};MAC=0a:58:0a:f4:23:4d");
    let out = cni_exec(
        Some(node.netns()),
        &cni_plugin_binary(),
        &a,
        &node.cni_config(),
    )
    .unwrap();
    let result = out.result().unwrap();
    assert_eq!(address_of(&result), want);
    assert_eq!(result["interfaces"][2]["mac"], "0a:58:0a:f4:23:4d");

    // Someone else asking for the same address gets a clear error.
    let other = node.add_container_netns().unwrap();
    let mut b = CniCall::new("ADD", &other, &other);
    b.args = format!("IP={want}");
    let out = cni_exec(
        Some(node.netns()),
        &cni_plugin_binary(),
        &b,
        &node.cni_config(),
    )
    .unwrap();
    assert!(!out.success);
    assert!(out.stdout.contains("already allocated"), "{}", out.stdout);
    assert_eq!(reservations(node, subnet).len(), 1, "the failed ADD leaked");
    assert_eq!(container_address(&other), None);

    // The `ips` capability works the same way.
    let mut config = node.cni_config();
    config["runtimeConfig"] = json!({"ips": ["10.244.35.99/24"]});
    let r = call(node, "ADD", &other, &config).result().unwrap();
    assert_eq!(address_of(&r), Ipv4Addr::new(10, 244, 35, 99));
}

#[test]
fn ip_masq_is_installed_when_flanneld_does_not_masquerade() {
    let (cluster, subnet) = node_with_subnet(36, false);
    let node = cluster.node(0);
    let ns = node.add_container_netns().unwrap();
    add(node, &ns);
    let nat = node.exec_ok(["iptables", "-t", "nat", "-S"]).unwrap();
    let jump = nat
        .lines()
        .find(|l| l.starts_with("-A POSTROUTING") && l.contains(&subnet.to_string()))
        .unwrap_or_else(|| panic!("no masquerade jump for {subnet}:\n{nat}"));
    let chain = jump.split_whitespace().last().unwrap();
    assert!(
        nat.contains(&format!("-A {chain} ! -d 224.0.0.0/4 -j MASQUERADE")),
        "{nat}"
    );
    // A second container does not add a second jump.
    add(node, &node.add_container_netns().unwrap());
    let nat = node
        .exec_ok(["iptables", "-t", "nat", "-S", "POSTROUTING"])
        .unwrap();
    assert_eq!(nat.matches(chain).count(), 1, "{nat}");
}

/// Debian's reference plugins, chained after ours as in flannel's conflist.
#[test]
fn chained_tuning_and_portmap_work_on_our_result() {
    let (cluster, _subnet) = node_with_subnet(37, true);
    let node = cluster.node(0);
    let ns = node.add_container_netns().unwrap();
    // Debian's tuning and portmap (plugins 1.1.1) speak CNI up to 1.0.0.
    let mut base = node.cni_config();
    base["cniVersion"] = json!("1.0.0");
    let ours = call(node, "ADD", &ns, &base).result().unwrap();
    assert_eq!(ours["cniVersion"], "1.0.0");
    let container_ip = address_of(&ours);

    let tuning = json!({"cniVersion": base["cniVersion"], "name": base["name"], "type": "tuning",
        "sysctl": {"net.ipv4.conf.eth0.arp_notify": "1"}, "prevResult": ours});
    let plugin_dir = Path::new("/usr/lib/cni");
    let run = |plugin: &str, command: &str, config: &Value| {
        cni_exec(
            Some(node.netns()),
            &plugin_dir.join(plugin),
            &CniCall::new(command, &ns, &ns),
            config,
        )
        .unwrap()
    };
    let after_tuning = run("tuning", "ADD", &tuning).result().unwrap();
    assert_eq!(
        after_tuning["ips"], ours["ips"],
        "tuning must pass our result on"
    );
    let sysctl = run_ok(
        Command::new("ip").args([
            "netns",
            "exec",
            &ns,
            "cat",
            "/proc/sys/net/ipv4/conf/eth0/arp_notify",
        ]),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(sysctl.trim(), "1");

    let portmap = json!({"cniVersion": base["cniVersion"], "name": base["name"], "type": "portmap",
        "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}]},
        "prevResult": after_tuning});
    let after_portmap = run("portmap", "ADD", &portmap).result().unwrap();
    assert_eq!(after_portmap["ips"], ours["ips"]);
    let nat = node.exec_ok(["iptables", "-t", "nat", "-S"]).unwrap();
    assert!(nat.contains(&format!("{container_ip}:8080")), "{nat}");

    // Real traffic through the port mapping: node address:18080 -> container:8080.
    let www = cluster.dir().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "hello from the container\n").unwrap();
    let mut httpd = Command::new("ip")
        .args([
            "netns", "exec", &ns, "busybox", "httpd", "-f", "-p", "8080", "-h",
        ])
        .arg(&www)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // (Debian's static busybox wget crashes here; bash's /dev/tcp does the GET.)
    let get = format!(
        "exec 3<>/dev/tcp/{}/18080 && printf 'GET /hello.txt HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3",
        node.underlay_ip()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let response = loop {
        let out = node.exec(["timeout", "5", "bash", "-c", &get]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if (out.status.success() && text.contains("200 OK")) || Instant::now() > deadline {
            break text;
        }
        thread::sleep(Duration::from_millis(100));
    };
    httpd.kill().unwrap();
    httpd.wait().unwrap();
    assert!(
        response.starts_with("HTTP/1.") && response.ends_with("\r\n\r\nhello from the container\n"),
        "{response:?}"
    );

    // DEL in reverse chain order, each with the final result as prevResult.
    run("portmap", "DEL", &with_prev(&portmap, &after_portmap))
        .succeeded()
        .unwrap();
    run("tuning", "DEL", &with_prev(&tuning, &after_portmap))
        .succeeded()
        .unwrap();
    call(node, "DEL", &ns, &with_prev(&base, &after_portmap))
        .succeeded()
        .unwrap();
    let nat = node.exec_ok(["iptables", "-t", "nat", "-S"]).unwrap();
    assert!(!nat.contains(&container_ip.to_string()), "{nat}");
    assert_eq!(host_veths(node), 0);
}

/// A `delegate.type` other than `bridge` runs that plugin with flannel's
/// rendered config, saved under `dataDir` for DEL (which needs no subnet.env).
#[test]
fn other_delegates_are_run_like_flannel_does() {
    let (cluster, subnet) = node_with_subnet(38, true);
    let node = cluster.node(0);
    let ns = node.add_container_netns().unwrap();
    let mut config = node.cni_config();
    config["cniVersion"] = json!("1.0.0");
    config["delegate"] = json!({"type": "ptp"});
    let result = call(node, "ADD", &ns, &config).result().unwrap();
    let ip = address_of(&result);
    assert!(usable(subnet, ip), "{ip} not from {subnet}");
    assert_eq!(container_address(&ns).unwrap(), format!("{ip}/24"));
    let saved_path = node.cni_data_dir().join(&ns);
    let saved: Value = serde_json::from_slice(&std::fs::read(&saved_path).unwrap()).unwrap();
    assert_eq!(saved["type"], "ptp");
    assert_eq!(saved["name"], config["name"]);
    assert_eq!(saved["mtu"], 1450);
    assert_eq!(saved["ipMasq"], false);
    assert_eq!(saved["ipam"]["type"], "host-local");
    assert_eq!(
        saved["ipam"]["ranges"],
        json!([[{"subnet": subnet.to_string()}]])
    );
    assert_eq!(saved["ipam"]["routes"], json!([{"dst": "10.244.0.0/16"}]));

    // DEL replays the saved config even with subnet.env gone.
    std::fs::remove_file(node.subnet_file()).unwrap();
    call(node, "DEL", &ns, &config).succeeded().unwrap();
    assert!(
        !saved_path.exists(),
        "the saved delegate config must go with DEL"
    );
    assert_eq!(container_address(&ns), None);
    call(node, "DEL", &ns, &config).succeeded().unwrap();
}
