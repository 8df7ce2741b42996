//! What the kernel must hold for a set of VXLAN peers, and the operations
//! that get it there (pure: no netlink, no clock).
//!
//! Per peer, as flannel programs it:
//! 1. neighbour `<peer subnet base>` → `<peer VTEP MAC>` on the VXLAN device, permanent;
//! 2. FDB `<peer VTEP MAC>` → `dst <peer public IP>` on the device;
//! 3. route `<peer subnet> via <peer subnet base> dev <device> onlink`, added last
//!    so the kernel never has to ARP for the gateway.
//!
//! With `DirectRouting` and a peer on the same L2 segment only a route
//! `<peer subnet> via <peer public IP>` is needed. Removal runs in reverse.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use subnet::lease::{Lease, MacAddr, SubnetKey};
use subnet::watch::LeaseEvent;

/// One kernel change, named after its iproute2 equivalent. The VXLAN device
/// is implicit: the netlink layer applying these is bound to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NetOp {
    /// `ip neigh replace <ip> lladdr <mac> dev <vxlan> nud permanent`
    ReplaceNeighbour {
        /// The peer's subnet base address (its VTEP's overlay address).
        ip: Ipv4Addr,
        /// The peer's VTEP MAC.
        mac: MacAddr,
    },
    /// `bridge fdb replace <mac> dev <vxlan> dst <dst> self permanent`
    ReplaceFdb {
        /// The peer's VTEP MAC.
        mac: MacAddr,
        /// The peer's public (underlay) IP.
        dst: Ipv4Addr,
    },
    /// `ip route replace <dst> via <gateway> dev <vxlan> onlink`
    ReplaceTunnelRoute {
        /// The peer's subnet.
        dst: Ipv4Network,
        /// The peer's subnet base address.
        gateway: Ipv4Addr,
    },
    /// `ip route replace <dst> via <gateway>` (direct routing over the underlay)
    ReplaceDirectRoute {
        /// The peer's subnet.
        dst: Ipv4Network,
        /// The peer's public IP.
        gateway: Ipv4Addr,
    },
    /// `ip route del <dst>` (whichever next hop it has)
    DeleteRoute {
        /// The peer's subnet.
        dst: Ipv4Network,
    },
    /// `bridge fdb del <mac> dev <vxlan> dst <dst> self`
    DeleteFdb {
        /// The VTEP MAC of the entry.
        mac: MacAddr,
        /// The destination of the entry.
        dst: Ipv4Addr,
    },
    /// `ip neigh del <ip> dev <vxlan>`
    DeleteNeighbour {
        /// The neighbour's address.
        ip: Ipv4Addr,
    },
}

/// A route flannel owns, as found in (or wanted in) the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OwnedRoute {
    /// The peer's subnet.
    pub dst: Ipv4Network,
    /// The next hop.
    pub gateway: Ipv4Addr,
    /// `true`: on the VXLAN device (onlink); `false`: direct, via the underlay.
    pub tunnel: bool,
}

/// The flannel-owned kernel state: what a resync compares with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    /// Permanent neighbours on the VXLAN device.
    pub neighbours: BTreeMap<Ipv4Addr, MacAddr>,
    /// FDB entries with a destination on the VXLAN device.
    pub fdb: BTreeSet<(MacAddr, Ipv4Addr)>,
    /// Routes into the flannel network: those on the VXLAN device, and
    /// gatewayed routes of the subnet length elsewhere (direct routing).
    pub routes: BTreeMap<Ipv4Network, OwnedRoute>,
}

/// What the plan needs to know about this node.
#[derive(Debug, Clone)]
pub struct PlanContext {
    /// Program direct routes to peers on the same L2 segment.
    pub direct_routing: bool,
    /// The underlay's directly connected prefixes: a peer whose public IP is
    /// in one of them is on our L2 segment.
    pub onlink: Vec<Ipv4Network>,
}

impl PlanContext {
    fn is_direct(&self, public_ip: Ipv4Addr) -> bool {
        self.direct_routing && self.onlink.iter().any(|net| net.contains(public_ip))
    }
}

/// Why a lease is not programmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The lease's subnet.
    pub key: SubnetKey,
    /// Why (in words, for the log).
    pub reason: String,
}

/// A peer reduced to what the kernel needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Peer {
    subnet: Ipv4Network,
    public_ip: Ipv4Addr,
    mac: MacAddr,
}

fn peer(lease: &Lease) -> Result<Peer, Skipped> {
    let skipped = |reason: String| Skipped {
        key: lease.key,
        reason,
    };
    if lease.attrs.backend_type != "vxlan" {
        return Err(skipped(format!(
            "backend type {:?} is not vxlan",
            lease.attrs.backend_type
        )));
    }
    let data = match lease.attrs.vxlan_data() {
        None => return Err(skipped("no BackendData".into())),
        Some(Err(error)) => return Err(skipped(error.to_string())),
        Some(Ok(data)) => data,
    };
    Ok(Peer {
        subnet: lease.key.ipv4,
        public_ip: lease.attrs.public_ip,
        mac: data.vtep_mac,
    })
}

/// The kernel state wanted for `peers`, and the leases that cannot be programmed.
pub fn desired<'a>(
    peers: impl IntoIterator<Item = &'a Lease>,
    ctx: &PlanContext,
) -> (KernelState, Vec<Skipped>) {
    let mut state = KernelState::default();
    let mut skipped = Vec::new();
    for lease in peers {
        match peer(lease) {
            Ok(p) => add_peer(&mut state, p, ctx),
            Err(s) => skipped.push(s),
        }
    }
    (state, skipped)
}

fn add_peer(state: &mut KernelState, p: Peer, ctx: &PlanContext) {
    let base = p.subnet.network();
    if ctx.is_direct(p.public_ip) {
        state.routes.insert(
            p.subnet,
            OwnedRoute {
                dst: p.subnet,
                gateway: p.public_ip,
                tunnel: false,
            },
        );
    } else {
        state.neighbours.insert(base, p.mac);
        state.fdb.insert((p.mac, p.public_ip));
        state.routes.insert(
            p.subnet,
            OwnedRoute {
                dst: p.subnet,
                gateway: base,
                tunnel: true,
            },
        );
    }
}

/// The operations that turn `current` into `wanted`: additions in
/// neighbour, FDB, route order; removals route first. Entries already
/// right are left alone, so applying a plan twice changes nothing.
pub fn diff(current: &KernelState, wanted: &KernelState) -> Vec<NetOp> {
    let mut ops = Vec::new();
    // Removals first, routes before what they rely on.
    for (dst, route) in &current.routes {
        if !wanted.routes.contains_key(dst) {
            ops.push(NetOp::DeleteRoute { dst: route.dst });
        }
    }
    for &(mac, dst) in &current.fdb {
        if !wanted.fdb.contains(&(mac, dst)) {
            ops.push(NetOp::DeleteFdb { mac, dst });
        }
    }
    for ip in current.neighbours.keys() {
        if !wanted.neighbours.contains_key(ip) {
            ops.push(NetOp::DeleteNeighbour { ip: *ip });
        }
    }
    // Additions and changes: neighbours, FDB, then routes.
    for (&ip, &mac) in &wanted.neighbours {
        if current.neighbours.get(&ip) != Some(&mac) {
            ops.push(NetOp::ReplaceNeighbour { ip, mac });
        }
    }
    for &(mac, dst) in &wanted.fdb {
        if !current.fdb.contains(&(mac, dst)) {
            ops.push(NetOp::ReplaceFdb { mac, dst });
        }
    }
    for (dst, route) in &wanted.routes {
        if current.routes.get(dst) != Some(route) {
            ops.push(replace_route(*route));
        }
    }
    ops
}

fn replace_route(route: OwnedRoute) -> NetOp {
    if route.tunnel {
        NetOp::ReplaceTunnelRoute {
            dst: route.dst,
            gateway: route.gateway,
        }
    } else {
        NetOp::ReplaceDirectRoute {
            dst: route.dst,
            gateway: route.gateway,
        }
    }
}

/// The operations for one lease event. A changed peer is removed as it was
/// and added as it is, minus what stays the same, so no stale FDB entry or
/// neighbour survives a VTEP MAC change.
pub fn plan_event(event: &LeaseEvent, ctx: &PlanContext) -> (Vec<NetOp>, Vec<Skipped>) {
    let (old, new): (Option<&Lease>, Option<&Lease>) = match event {
        LeaseEvent::Added(lease) => (None, Some(lease)),
        LeaseEvent::Removed(lease) => (Some(lease), None),
        LeaseEvent::Changed { old, new } => (Some(old), Some(new)),
    };
    let before = state_of(old, ctx).unwrap_or_default();
    // Only the lease being programmed can be "skipped"; an old lease that
    // was never programmed simply contributes nothing to remove.
    let (after, skipped) = match state_of(new, ctx) {
        Ok(state) => (state, Vec::new()),
        Err(skip) => (KernelState::default(), vec![skip]),
    };
    (diff(&before, &after), skipped)
}

/// The kernel state one (optional) lease needs.
fn state_of(lease: Option<&Lease>, ctx: &PlanContext) -> Result<KernelState, Skipped> {
    let mut state = KernelState::default();
    if let Some(lease) = lease {
        add_peer(&mut state, peer(lease)?, ctx);
    }
    Ok(state)
}

/// The operations that make the kernel match `peers` exactly: missing
/// entries added, entries of peers that no longer exist removed.
pub fn plan_resync<'a>(
    peers: impl IntoIterator<Item = &'a Lease>,
    current: &KernelState,
    ctx: &PlanContext,
) -> (Vec<NetOp>, Vec<Skipped>) {
    let (wanted, skipped) = desired(peers, ctx);
    (diff(current, &wanted), skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use subnet::lease::{LeaseAttrs, VxlanData};

    fn lease(third: u8, public: u8, mac_last: u8) -> Lease {
        Lease {
            key: SubnetKey::v4(Ipv4Network::new(Ipv4Addr::new(10, 244, third, 0), 24).unwrap()),
            attrs: LeaseAttrs {
                backend_type: "vxlan".into(),
                backend_data: Some(
                    VxlanData {
                        vni: 1,
                        vtep_mac: MacAddr([2, 0, 0, 0, third, mac_last]),
                    }
                    .encode(),
                ),
                ..LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, public))
            },
        }
    }

    fn tunnel_ctx() -> PlanContext {
        PlanContext {
            direct_routing: false,
            onlink: vec!["198.18.0.0/24".parse().unwrap()],
        }
    }

    /// The MAC `lease(2, _, last)` publishes.
    fn mac(last: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 2, last])
    }

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    #[test]
    fn added_peer_is_neighbour_fdb_then_route() {
        let (ops, skipped) =
            plan_event(&LeaseEvent::Added(lease(2, 12, 0xaa).into()), &tunnel_ctx());
        assert!(skipped.is_empty());
        assert_eq!(
            ops,
            vec![
                NetOp::ReplaceNeighbour {
                    ip: Ipv4Addr::new(10, 244, 2, 0),
                    mac: mac(0xaa)
                },
                NetOp::ReplaceFdb {
                    mac: mac(0xaa),
                    dst: Ipv4Addr::new(198, 18, 0, 12)
                },
                NetOp::ReplaceTunnelRoute {
                    dst: net("10.244.2.0/24"),
                    gateway: Ipv4Addr::new(10, 244, 2, 0)
                },
            ]
        );
    }

    #[test]
    fn removed_peer_is_route_first() {
        let (ops, _) = plan_event(
            &LeaseEvent::Removed(lease(2, 12, 0xaa).into()),
            &tunnel_ctx(),
        );
        assert_eq!(
            ops,
            vec![
                NetOp::DeleteRoute {
                    dst: net("10.244.2.0/24")
                },
                NetOp::DeleteFdb {
                    mac: mac(0xaa),
                    dst: Ipv4Addr::new(198, 18, 0, 12)
                },
                NetOp::DeleteNeighbour {
                    ip: Ipv4Addr::new(10, 244, 2, 0)
                },
            ]
        );
    }

    #[test]
    fn changed_mac_removes_the_old_fdb_entry() {
        let event = LeaseEvent::Changed {
            old: lease(2, 12, 0xaa).into(),
            new: lease(2, 12, 0xbb).into(),
        };
        let (ops, _) = plan_event(&event, &tunnel_ctx());
        assert_eq!(
            ops,
            vec![
                NetOp::DeleteFdb {
                    mac: mac(0xaa),
                    dst: Ipv4Addr::new(198, 18, 0, 12)
                },
                NetOp::ReplaceNeighbour {
                    ip: Ipv4Addr::new(10, 244, 2, 0),
                    mac: mac(0xbb)
                },
                NetOp::ReplaceFdb {
                    mac: mac(0xbb),
                    dst: Ipv4Addr::new(198, 18, 0, 12)
                },
            ]
        );
    }

    #[test]
    fn direct_routing_uses_the_underlay_for_onlink_peers_only() {
        let ctx = PlanContext {
            direct_routing: true,
            onlink: vec![net("198.18.0.0/24")],
        };
        let (ops, _) = plan_event(&LeaseEvent::Added(lease(2, 12, 0xaa).into()), &ctx);
        assert_eq!(
            ops,
            vec![NetOp::ReplaceDirectRoute {
                dst: net("10.244.2.0/24"),
                gateway: Ipv4Addr::new(198, 18, 0, 12)
            }]
        );
        let far = PlanContext {
            direct_routing: true,
            onlink: vec![net("198.19.0.0/24")],
        };
        let (ops, _) = plan_event(&LeaseEvent::Added(lease(2, 12, 0xaa).into()), &far);
        assert_eq!(ops.len(), 3, "a peer on another segment is tunnelled");
    }

    #[test]
    fn non_vxlan_and_broken_leases_are_skipped_with_a_reason() {
        let mut hostgw = lease(3, 13, 1);
        hostgw.attrs.backend_type = "host-gw".into();
        let mut broken = lease(4, 14, 1);
        broken.attrs.backend_data = None;
        let (ops, skipped) = plan_resync(
            &[hostgw, broken, lease(5, 15, 5)],
            &KernelState::default(),
            &tunnel_ctx(),
        );
        assert_eq!(ops.len(), 3);
        assert_eq!(skipped.len(), 2);
        assert!(skipped[0].reason.contains("host-gw"));
        assert!(skipped[1].reason.contains("BackendData"));
    }

    #[test]
    fn resync_removes_entries_of_vanished_peers_only() {
        let ctx = tunnel_ctx();
        let (current, _) = desired(&[lease(2, 12, 2), lease(3, 13, 3)], &ctx);
        let (ops, _) = plan_resync(&[lease(3, 13, 3), lease(4, 14, 4)], &current, &ctx);
        assert!(ops.contains(&NetOp::DeleteRoute {
            dst: net("10.244.2.0/24")
        }));
        assert!(ops.contains(&NetOp::ReplaceTunnelRoute {
            dst: net("10.244.4.0/24"),
            gateway: Ipv4Addr::new(10, 244, 4, 0)
        }));
        assert!(!ops.iter().any(|op| matches!(op,
            NetOp::ReplaceTunnelRoute { dst, .. } if *dst == net("10.244.3.0/24"))));
        assert_eq!(ops.len(), 6);
    }

    /// Applies ops to a model of the kernel, as the netlink layer would.
    fn apply(state: &mut KernelState, ops: &[NetOp]) {
        for op in ops {
            match *op {
                NetOp::ReplaceNeighbour { ip, mac } => {
                    state.neighbours.insert(ip, mac);
                }
                NetOp::DeleteNeighbour { ip } => {
                    state.neighbours.remove(&ip);
                }
                NetOp::ReplaceFdb { mac, dst } => {
                    state.fdb.retain(|(m, _)| *m != mac);
                    state.fdb.insert((mac, dst));
                }
                NetOp::DeleteFdb { mac, dst } => {
                    state.fdb.remove(&(mac, dst));
                }
                NetOp::ReplaceTunnelRoute { dst, gateway } => {
                    state.routes.insert(
                        dst,
                        OwnedRoute {
                            dst,
                            gateway,
                            tunnel: true,
                        },
                    );
                }
                NetOp::ReplaceDirectRoute { dst, gateway } => {
                    state.routes.insert(
                        dst,
                        OwnedRoute {
                            dst,
                            gateway,
                            tunnel: false,
                        },
                    );
                }
                NetOp::DeleteRoute { dst } => {
                    state.routes.remove(&dst);
                }
            }
        }
    }

    fn arb_lease() -> impl Strategy<Value = Lease> {
        (1u8..12, 1u8..6, 1u8..4).prop_map(|(t, p, m)| lease(t, p, m))
    }

    proptest! {
        /// A resync plan takes any kernel state to exactly the wanted one,
        /// and a second plan is empty (idempotence).
        #[test]
        fn resync_reaches_the_wanted_state(
            before in proptest::collection::vec(arb_lease(), 0..8),
            after in proptest::collection::vec(arb_lease(), 0..8),
            direct in any::<bool>(),
        ) {
            let ctx = PlanContext { direct_routing: direct, onlink: vec![net("198.18.0.0/30")] };
            let dedup = |v: Vec<Lease>| {
                let mut m = BTreeMap::new();
                for l in v { m.insert(l.key, l); }
                m.into_values().collect::<Vec<_>>()
            };
            let (mut kernel, _) = desired(&dedup(before), &ctx);
            let after = dedup(after);
            let (ops, _) = plan_resync(&after, &kernel, &ctx);
            apply(&mut kernel, &ops);
            let (wanted, _) = desired(&after, &ctx);
            prop_assert_eq!(&kernel.routes, &wanted.routes);
            prop_assert_eq!(&kernel.neighbours, &wanted.neighbours);
            prop_assert_eq!(&kernel.fdb, &wanted.fdb);
            let (again, _) = plan_resync(&after, &kernel, &ctx);
            prop_assert!(again.is_empty(), "second plan not empty: {:?}", again);
        }
    }
}
