//! Kernel tests of the VXLAN netlink layer (`backends::vxlan::netlink`).
//!
//! Root only: they fail, never skip, without it. Each test makes its own
//! network namespace `fvx<pid>x<n>` with a veth pair `u0`/`u1` inside as the
//! underlay (198.18.200.1/24 on u0), runs its body on a thread that entered
//! that namespace (so the netlink sockets are opened there) and checks the
//! result with iproute2 run in the namespace. Nothing touches the root
//! namespace's links; the namespace is deleted by a drop guard.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use backends::vxlan::netlink::{self, Netlink, NetlinkError, VxlanDevice, VxlanDeviceSpec};
use backends::vxlan::plan::{KernelState, NetOp, OwnedRoute};
use common::{Ns, run};
use ipnetwork::Ipv4Network;
use subnet::lease::MacAddr;

const PREFIX: &str = "fvx";
const UNDERLAY_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
const BODY_TIMEOUT: Duration = Duration::from_secs(120);

impl Ns {
    fn bridge(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("bridge", &all)
    }

    fn index(&self, link: &str) -> u32 {
        let out = self.ip(&["-o", "link", "show", link]);
        out.split(':').next().unwrap().trim().parse().unwrap()
    }

    /// Trimmed non-empty output lines of `ip`/`bridge`, as a set.
    fn lines(out: &str) -> BTreeSet<String> {
        out.lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect()
    }

    fn neighbours(&self) -> BTreeSet<String> {
        Self::lines(&self.ip(&["neigh", "show", "dev", "flannel.1"]))
    }

    fn fdb(&self) -> BTreeSet<String> {
        Self::lines(&self.bridge(&["fdb", "show", "dev", "flannel.1"]))
    }

    fn routes(&self) -> BTreeSet<String> {
        Self::lines(&self.ip(&["route"]))
    }
}

/// Makes a fresh namespace with the veth underlay, runs `body` on a thread
/// inside it with a current-thread runtime, deletes the namespace, and then
/// re-raises the body's panic if it had one.
fn with_netns<F, Fut>(body: F)
where
    F: FnOnce(Ns) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let (ns, guard) = Ns::create(
        PREFIX,
        "the VXLAN kernel tests need root (network namespaces, links); run them as root",
    );
    ns.ip(&["link", "add", "u0", "type", "veth", "peer", "name", "u1"]);
    ns.ip(&["addr", "add", "198.18.200.1/24", "dev", "u0"]);
    ns.ip(&["link", "set", "u0", "up"]);
    ns.ip(&["link", "set", "u1", "up"]);
    guard.run_inside(None, move |ns| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            tokio::time::timeout(BODY_TIMEOUT, body(ns))
                .await
                .expect("the test body timed out");
        });
    });
}

fn spec(ns: &Ns) -> VxlanDeviceSpec {
    VxlanDeviceSpec {
        name: "flannel.1".into(),
        vni: 1,
        local: UNDERLAY_IP,
        underlay_index: ns.index("u0"),
        port: 0,
        learning: false,
        gbp: false,
        mtu: 1450,
        mac: netlink::random_mac(),
    }
}

async fn device(ns: &Ns, nl: &Netlink) -> VxlanDevice {
    nl.ensure_vxlan(&spec(ns)).await.unwrap()
}

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

/// Peer `i` (2..): subnet 10.244.<i>.0/24, VTEP MAC 02:00:00:00:00:<i>,
/// public IP 198.18.200.<10+i>.
fn peer_ops(i: u8) -> [NetOp; 3] {
    let base = Ipv4Addr::new(10, 244, i, 0);
    let mac = MacAddr([2, 0, 0, 0, 0, i]);
    [
        NetOp::ReplaceNeighbour { ip: base, mac },
        NetOp::ReplaceFdb {
            mac,
            dst: Ipv4Addr::new(198, 18, 200, 10 + i),
        },
        NetOp::ReplaceTunnelRoute {
            dst: Ipv4Network::new(base, 24).unwrap(),
            gateway: base,
        },
    ]
}

fn removal_ops(add: &[NetOp]) -> Vec<NetOp> {
    add.iter()
        .rev()
        .map(|op| match *op {
            NetOp::ReplaceNeighbour { ip, .. } => NetOp::DeleteNeighbour { ip },
            NetOp::ReplaceFdb { mac, dst } => NetOp::DeleteFdb { mac, dst },
            NetOp::ReplaceTunnelRoute { dst, .. } | NetOp::ReplaceDirectRoute { dst, .. } => {
                NetOp::DeleteRoute { dst }
            }
            other => other,
        })
        .collect()
}

fn set(lines: &[String]) -> BTreeSet<String> {
    lines.iter().cloned().collect()
}

fn assert_clean(report: &netlink::ApplyReport, expected: usize) {
    assert!(report.failed.is_empty(), "failures: {:#?}", report.failed);
    assert_eq!(report.applied, expected);
}

#[test]
fn creates_the_device_with_flannels_attributes() {
    with_netns(|ns| async move {
        let nl = Netlink::connect().unwrap();
        let spec = spec(&ns);
        let dev = nl.ensure_vxlan(&spec).await.unwrap();
        assert!(dev.created);
        assert_eq!(dev.name, "flannel.1");
        assert_eq!(dev.mac, spec.mac);
        assert_eq!(dev.mtu, 1450);
        assert_eq!(dev.index, ns.index("flannel.1"));

        let out = ns.ip(&["-d", "link", "show", "flannel.1"]);
        let first = out.lines().next().unwrap();
        assert!(
            first.contains("<BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1450 "),
            "{out}"
        );
        assert!(
            out.contains(&format!("link/ether {} brd ff:ff:ff:ff:ff:ff", spec.mac)),
            "{out}"
        );
        assert!(
            out.contains(
                "vxlan id 1 local 198.18.200.1 dev u0 srcport 0 0 dstport 8472 nolearning ttl auto \
                 ageing 300 udpcsum noudp6zerocsumtx noudp6zerocsumrx "
            ),
            "{out}"
        );
        let vxlan = out
            .lines()
            .find(|l| l.trim_start().starts_with("vxlan "))
            .unwrap();
        for absent in ["gbp", "l2miss", "l3miss", "proxy", "group", "remote"] {
            assert!(!vxlan.contains(absent), "{absent} in {vxlan}");
        }
        if std::path::Path::new("/proc/sys/net/ipv6").exists() {
            let ra = ns.exec(&["cat", "/proc/sys/net/ipv6/conf/flannel.1/accept_ra"]);
            assert_eq!(ra.trim(), "0");
        }
    });
}

#[test]
fn reuses_a_compatible_device_and_keeps_its_mac() {
    with_netns(|ns| async move {
        let nl = Netlink::connect().unwrap();
        let first = device(&ns, &nl).await;
        let again = VxlanDeviceSpec {
            mtu: 1400,
            ..spec(&ns)
        };
        assert_ne!(again.mac, first.mac);
        let second = nl.ensure_vxlan(&again).await.unwrap();
        assert!(!second.created);
        assert_eq!(second.index, first.index);
        assert_eq!(second.mac, first.mac, "a reused device keeps its MAC");
        assert_eq!(second.mtu, 1400, "MTU is set on reuse");
        let out = ns.ip(&["link", "show", "flannel.1"]);
        assert!(out.contains(&format!("link/ether {}", first.mac)), "{out}");
        assert!(out.contains("mtu 1400"), "{out}");

        // Down devices are brought up on reuse.
        ns.ip(&["link", "set", "flannel.1", "down"]);
        let third = nl.ensure_vxlan(&again).await.unwrap();
        assert!(!third.created);
        assert!(nl.link_by_name("flannel.1").await.unwrap().unwrap().up);
    });
}

#[test]
fn replaces_a_vxlan_device_with_another_vni() {
    with_netns(|ns| async move {
        ns.ip(&[
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            "2",
            "local",
            "198.18.200.1",
            "dev",
            "u0",
            "dstport",
            "0",
        ]);
        let old = ns.index("flannel.1");
        let nl = Netlink::connect().unwrap();
        let spec = spec(&ns);
        let dev = nl.ensure_vxlan(&spec).await.unwrap();
        assert!(dev.created);
        assert_ne!(dev.index, old);
        assert_eq!(dev.mac, spec.mac);
        let out = ns.ip(&["-d", "link", "show", "flannel.1"]);
        assert!(
            out.contains("vxlan id 1 local 198.18.200.1 dev u0 "),
            "{out}"
        );
    });
}

#[test]
fn replaces_a_veth_named_like_the_device() {
    with_netns(|ns| async move {
        ns.ip(&[
            "link",
            "add",
            "flannel.1",
            "type",
            "veth",
            "peer",
            "name",
            "fpeer0",
        ]);
        let nl = Netlink::connect().unwrap();
        let dev = device(&ns, &nl).await;
        assert!(dev.created);
        let out = ns.ip(&["-d", "link", "show", "flannel.1"]);
        assert!(out.contains("vxlan id 1 "), "{out}");
        assert_eq!(
            nl.link_by_name("flannel.1")
                .await
                .unwrap()
                .unwrap()
                .kind
                .as_deref(),
            Some("vxlan")
        );
    });
}

#[test]
fn ensure_address_adds_ours_and_removes_stray_ones_in_the_network() {
    with_netns(|ns| async move {
        let nl = Netlink::connect().unwrap();
        let dev = device(&ns, &nl).await;
        ns.ip(&["addr", "add", "10.244.9.9/32", "dev", "flannel.1"]);
        ns.ip(&["addr", "add", "198.18.250.1/32", "dev", "flannel.1"]);
        for _ in 0..2 {
            nl.ensure_address(dev.index, net("10.244.1.0/32"), net("10.244.0.0/16"))
                .await
                .unwrap();
            let out = ns.ip(&["-4", "-o", "addr", "show", "dev", "flannel.1"]);
            let inets: BTreeSet<&str> = out
                .lines()
                .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
                .collect();
            assert_eq!(
                inets,
                BTreeSet::from(["10.244.1.0/32", "198.18.250.1/32"]),
                "{out}"
            );
        }
        let addresses = nl.ipv4_addresses().await.unwrap();
        assert!(addresses.contains(&(dev.index, net("10.244.1.0/32"))));
    });
}

#[test]
fn apply_programs_peers_exactly_and_is_idempotent() {
    with_netns(|ns| async move {
        let nl = Netlink::connect().unwrap();
        let dev = device(&ns, &nl).await;
        let ops: Vec<NetOp> = [2, 3, 4].into_iter().flat_map(peer_ops).collect();
        let neighbours =
            set(&[2, 3, 4].map(|i| format!("10.244.{i}.0 lladdr 02:00:00:00:00:0{i} PERMANENT")));
        let fdb =
            set(&[2, 3, 4]
                .map(|i| format!("02:00:00:00:00:0{i} dst 198.18.200.1{i} self permanent")));
        let mut routes =
            set(&[2, 3, 4]
                .map(|i| format!("10.244.{i}.0/24 via 10.244.{i}.0 dev flannel.1 onlink")));
        routes.insert("198.18.200.0/24 dev u0 proto kernel scope link src 198.18.200.1".into());

        for round in 0..2 {
            let report = nl.apply(dev.index, &ops).await;
            assert_clean(&report, 9);
            assert_eq!(ns.neighbours(), neighbours, "round {round}");
            assert_eq!(ns.fdb(), fdb, "round {round}");
            assert_eq!(ns.routes(), routes, "round {round}");
        }

        let removals = removal_ops(&ops);
        for round in 0..2 {
            let report = nl.apply(dev.index, &removals).await;
            assert_clean(&report, 9);
            assert!(ns.neighbours().is_empty(), "round {round}");
            assert!(ns.fdb().is_empty(), "round {round}");
            assert_eq!(
                ns.routes(),
                set(&["198.18.200.0/24 dev u0 proto kernel scope link src 198.18.200.1".into()]),
                "round {round}"
            );
        }
    });
}

#[test]
fn kernel_state_reads_back_what_apply_wrote() {
    with_netns(|ns| async move {
        let nl = Netlink::connect().unwrap();
        let dev = device(&ns, &nl).await;
        let ops: Vec<NetOp> = [2, 3, 4].into_iter().flat_map(peer_ops).collect();
        assert_clean(&nl.apply(dev.index, &ops).await, 9);
        // Not ours: a route outside the network, a learned-looking neighbour,
        // the all-zero flood entry.
        ns.bridge(&[
            "fdb",
            "append",
            "00:00:00:00:00:00",
            "dev",
            "flannel.1",
            "dst",
            "198.18.200.99",
        ]);
        ns.ip(&[
            "route",
            "add",
            "10.99.0.0/24",
            "via",
            "10.244.2.0",
            "dev",
            "flannel.1",
            "onlink",
        ]);
        ns.ip(&[
            "neigh",
            "add",
            "10.244.50.1",
            "lladdr",
            "02:aa:00:00:00:01",
            "dev",
            "flannel.1",
            "nud",
            "reachable",
        ]);

        let state = nl
            .kernel_state(dev.index, net("10.244.0.0/16"), 24)
            .await
            .unwrap();
        let mut wanted = KernelState::default();
        for i in [2u8, 3, 4] {
            let base = Ipv4Addr::new(10, 244, i, 0);
            let mac = MacAddr([2, 0, 0, 0, 0, i]);
            wanted.neighbours.insert(base, mac);
            wanted
                .fdb
                .insert((mac, Ipv4Addr::new(198, 18, 200, 10 + i)));
            let dst = Ipv4Network::new(base, 24).unwrap();
            wanted.routes.insert(
                dst,
                OwnedRoute {
                    dst,
                    gateway: base,
                    tunnel: true,
                },
            );
        }
        assert_eq!(state, wanted);
    });
}

#[test]
fn direct_routes_read_back_as_not_tunnelled_and_failures_do_not_stop_apply() {
    with_netns(|ns| async move {
        let nl = Netlink::connect().unwrap();
        let dev = device(&ns, &nl).await;
        let dst = net("10.244.7.0/24");
        let direct = NetOp::ReplaceDirectRoute {
            dst,
            gateway: Ipv4Addr::new(198, 18, 200, 2),
        };
        // Not on any connected prefix: the kernel refuses it.
        let unreachable = NetOp::ReplaceDirectRoute {
            dst: net("10.244.8.0/24"),
            gateway: Ipv4Addr::new(198, 18, 201, 5),
        };
        let report = nl.apply(dev.index, &[unreachable, direct]).await;
        assert_eq!(report.applied, 1);
        assert_eq!(report.failed.len(), 1, "{:#?}", report.failed);
        let (op, error) = &report.failed[0];
        assert_eq!(*op, unreachable);
        assert_eq!(error.errno(), Some(101), "ENETUNREACH: {error}");
        let text = error.to_string();
        assert!(
            text.starts_with("ip route replace 10.244.8.0/24 via 198.18.201.5: "),
            "{text}"
        );
        println!("a refused op reads: {text}");

        assert!(
            ns.routes()
                .contains("10.244.7.0/24 via 198.18.200.2 dev u0")
        );
        let state = nl
            .kernel_state(dev.index, net("10.244.0.0/16"), 24)
            .await
            .unwrap();
        assert_eq!(
            state.routes.get(&dst),
            Some(&OwnedRoute {
                dst,
                gateway: Ipv4Addr::new(198, 18, 200, 2),
                tunnel: false
            })
        );

        // Replace semantics: the tunnel route takes the direct one's place.
        let tunnel = NetOp::ReplaceTunnelRoute {
            dst,
            gateway: Ipv4Addr::new(10, 244, 7, 0),
        };
        assert_clean(&nl.apply(dev.index, &[tunnel]).await, 1);
        let routes = ns.routes();
        assert!(
            routes.contains("10.244.7.0/24 via 10.244.7.0 dev flannel.1 onlink"),
            "{routes:?}"
        );
        assert!(
            !routes.iter().any(|r| r.contains("via 198.18.200.2")),
            "{routes:?}"
        );
        let state = nl
            .kernel_state(dev.index, net("10.244.0.0/16"), 24)
            .await
            .unwrap();
        assert!(state.routes[&dst].tunnel);
    });
}

#[test]
fn failures_are_matched_to_their_ops_across_batches() {
    with_netns(|ns| async move {
        let nl = Netlink::connect().unwrap();
        let dev = device(&ns, &nl).await;
        // 150 ops span three datagrams; every 7th is refused by the kernel.
        let ops: Vec<NetOp> = (0u8..150)
            .map(|i| {
                let dst = Ipv4Network::new(Ipv4Addr::new(10, 244, i, 0), 24).unwrap();
                if i % 7 == 0 {
                    NetOp::ReplaceDirectRoute {
                        dst,
                        gateway: Ipv4Addr::new(198, 18, 201, 5),
                    }
                } else {
                    NetOp::ReplaceTunnelRoute {
                        dst,
                        gateway: dst.network(),
                    }
                }
            })
            .collect();
        let report = nl.apply(dev.index, &ops).await;
        let refused: Vec<NetOp> = ops.iter().step_by(7).copied().collect();
        let failed: Vec<NetOp> = report.failed.iter().map(|(op, _)| *op).collect();
        assert_eq!(failed, refused);
        assert_eq!(report.applied, 150 - refused.len());
        for (op, error) in &report.failed {
            let NetOp::ReplaceDirectRoute { dst, .. } = op else {
                panic!("{op:?}")
            };
            assert!(error.to_string().contains(&dst.to_string()), "{error}");
        }
        let tunnel_routes = ns
            .routes()
            .iter()
            .filter(|r| r.ends_with("dev flannel.1 onlink"))
            .count();
        assert_eq!(tunnel_routes, 150 - refused.len());
    });
}

#[test]
fn a_thousand_peers_land_in_one_apply() {
    with_netns(|ns| async move {
        let nl = Netlink::connect().unwrap();
        let dev = device(&ns, &nl).await;
        let mut ops = Vec::new();
        for i in 0u16..1000 {
            let [hi, lo] = i.to_be_bytes();
            // 1,000 /26 subnets of 10.244.0.0/16.
            let [third, fourth] = (i * 64).to_be_bytes();
            let base = Ipv4Addr::new(10, 244, third, fourth);
            let mac = MacAddr([2, 0, 0, 1, hi, lo]);
            let public = Ipv4Addr::new(198, 18, 201 + hi, lo);
            ops.push(NetOp::ReplaceNeighbour { ip: base, mac });
            ops.push(NetOp::ReplaceFdb { mac, dst: public });
            ops.push(NetOp::ReplaceTunnelRoute {
                dst: Ipv4Network::new(base, 26).unwrap(),
                gateway: base,
            });
        }
        let started = Instant::now();
        let report = nl.apply(dev.index, &ops).await;
        let took = started.elapsed();
        assert_clean(&report, 3000);
        println!("1000 peers (3000 ops) applied in {took:?}");

        assert_eq!(ns.neighbours().len(), 1000);
        assert_eq!(ns.fdb().len(), 1000);
        let tunnel_routes = ns
            .routes()
            .iter()
            .filter(|r| r.ends_with("dev flannel.1 onlink"))
            .count();
        assert_eq!(tunnel_routes, 1000);

        let started = Instant::now();
        let state = nl
            .kernel_state(dev.index, net("10.244.0.0/16"), 26)
            .await
            .unwrap();
        println!("kernel_state of 1000 peers read in {:?}", started.elapsed());
        assert_eq!(
            (state.neighbours.len(), state.fdb.len(), state.routes.len()),
            (1000, 1000, 1000)
        );

        let started = Instant::now();
        assert_clean(&nl.apply(dev.index, &removal_ops(&ops)).await, 3000);
        println!("1000 peers removed in {:?}", started.elapsed());
        assert!(ns.neighbours().is_empty());
    });
}

#[test]
fn link_removals_are_reported_and_the_watch_ends_with_the_netlink() {
    with_netns(|ns| async move {
        let nl = Netlink::connect().unwrap();
        let dev = device(&ns, &nl).await;
        let mut removals = nl.watch_link_removals().unwrap();
        ns.ip(&["link", "del", "flannel.1"]);
        let reported = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(index) = removals.recv().await {
                if index == dev.index {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(
            reported,
            Ok(true),
            "no RTM_DELLINK for {} within 2 s",
            dev.index
        );

        drop(nl);
        let ended = tokio::time::timeout(Duration::from_secs(2), removals.recv()).await;
        assert_eq!(ended, Ok(None), "the watch should end with the Netlink");
    });
}

#[test]
fn tx_checksum_offload_is_switched_by_ethtool() {
    with_netns(|ns| async move {
        let nl = Netlink::connect().unwrap();
        device(&ns, &nl).await;
        netlink::set_tx_checksum_offload("flannel.1", false)
            .await
            .unwrap();
        let out = ns.exec(&["ethtool", "-k", "flannel.1"]);
        assert!(out.contains("tx-checksum-ip-generic: off"), "{out}");
        netlink::set_tx_checksum_offload("flannel.1", true)
            .await
            .unwrap();
        let out = ns.exec(&["ethtool", "-k", "flannel.1"]);
        assert!(out.contains("tx-checksum-ip-generic: on"), "{out}");

        let error = netlink::set_tx_checksum_offload("nosuchdev0", false)
            .await
            .unwrap_err();
        assert!(matches!(error, NetlinkError::Ethtool { .. }), "{error:?}");
        assert!(error.to_string().contains("nosuchdev0"), "{error}");
    });
}

#[test]
fn links_addresses_and_routes_of_the_underlay() {
    with_netns(|ns| async move {
        let nl = Netlink::connect().unwrap();
        let u0 = ns.index("u0");
        let links = nl.links().await.unwrap();
        let link = links.iter().find(|l| l.name == "u0").unwrap();
        assert_eq!(link.index, u0);
        assert_eq!(link.kind.as_deref(), Some("veth"));
        assert_eq!(link.mtu, 1500);
        assert!(link.up);
        assert!(link.mac.is_some());
        assert!(links.iter().any(|l| l.name == "lo" && l.kind.is_none()));

        assert_eq!(nl.link_by_name("u0").await.unwrap().unwrap().index, u0);
        assert_eq!(nl.link_by_index(u0).await.unwrap().unwrap().name, "u0");
        assert!(nl.link_by_name("nosuchdev0").await.unwrap().is_none());
        assert!(nl.link_by_index(999_999).await.unwrap().is_none());

        let addresses = nl.ipv4_addresses().await.unwrap();
        assert!(
            addresses.contains(&(u0, net("198.18.200.1/24"))),
            "{addresses:?}"
        );
        assert_eq!(
            nl.connected_prefixes(u0).await.unwrap(),
            vec![net("198.18.200.0/24")]
        );

        assert_eq!(nl.default_route_interface().await.unwrap(), None);
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            "198.18.200.2",
            "dev",
            "u0",
        ]);
        assert_eq!(nl.default_route_interface().await.unwrap(), Some(u0));

        nl.delete_link(999_999).await.unwrap();
        let u1 = ns.index("u1");
        nl.delete_link(u1).await.unwrap();
        assert!(nl.link_by_index(u1).await.unwrap().is_none());
    });
}
