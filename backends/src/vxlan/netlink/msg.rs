//! Netlink messages for the VXLAN backend's operations, and the parsing of
//! dumps back into our types. Pure: nothing here touches a socket.

use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::Ipv4Network;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo as LinkInfoNla, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use subnet::lease::MacAddr;

use super::LinkInfo;
use crate::vxlan::plan::{NetOp, OwnedRoute};

/// ENOENT: no such neighbour / FDB entry.
pub(super) const ENOENT: i32 = 2;
/// ESRCH: no such route.
pub(super) const ESRCH: i32 = 3;
/// ENODEV: no such link.
pub(super) const ENODEV: i32 = 19;
/// EADDRNOTAVAIL: no such address.
pub(super) const EADDRNOTAVAIL: i32 = 99;

/// Create-or-replace, as `ip … replace` and `bridge fdb replace` send it.
const REPLACE: u16 = NLM_F_CREATE | NLM_F_REPLACE;

/// The request for `op` on the VXLAN device `index`, with its extra header flags.
pub(super) fn op_request(index: u32, op: &NetOp) -> (RouteNetlinkMessage, u16) {
    match *op {
        NetOp::ReplaceNeighbour { ip, mac } => {
            let mut m = neighbour(AddressFamily::Inet, index);
            m.header.state = NeighbourState::Permanent;
            m.attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
            m.attributes
                .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
            (RouteNetlinkMessage::NewNeighbour(m), REPLACE)
        }
        NetOp::DeleteNeighbour { ip } => {
            let mut m = neighbour(AddressFamily::Inet, index);
            m.attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
            (RouteNetlinkMessage::DelNeighbour(m), 0)
        }
        NetOp::ReplaceFdb { mac, dst } => {
            let mut m = fdb(index, mac, dst);
            m.header.state = NeighbourState::Permanent;
            (RouteNetlinkMessage::NewNeighbour(m), REPLACE)
        }
        NetOp::DeleteFdb { mac, dst } => {
            (RouteNetlinkMessage::DelNeighbour(fdb(index, mac, dst)), 0)
        }
        NetOp::ReplaceTunnelRoute { dst, gateway } => {
            let mut m = route(dst);
            m.header.flags = RouteFlags::Onlink;
            m.attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
            m.attributes.push(RouteAttribute::Oif(index));
            (RouteNetlinkMessage::NewRoute(m), REPLACE)
        }
        NetOp::ReplaceDirectRoute { dst, gateway } => {
            let mut m = route(dst);
            m.attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
            (RouteNetlinkMessage::NewRoute(m), REPLACE)
        }
        NetOp::DeleteRoute { dst } => {
            let mut m = route(dst);
            // As `ip route del`: match whatever scope, protocol and type the
            // route has; only the prefix (and table) must match.
            m.header.scope = RouteScope::NoWhere;
            m.header.protocol = RouteProtocol::Unspec;
            m.header.kind = RouteType::Unspec;
            (RouteNetlinkMessage::DelRoute(m), 0)
        }
    }
}

/// The errnos that mean "already gone" for a delete.
pub(super) fn absent_errnos(op: &NetOp) -> &'static [i32] {
    match op {
        NetOp::DeleteRoute { .. } => &[ESRCH, ENOENT],
        NetOp::DeleteFdb { .. } | NetOp::DeleteNeighbour { .. } => &[ENOENT, ESRCH],
        _ => &[],
    }
}

/// `op` as the iproute2 command that does the same, on device `dev`.
pub(super) fn describe(op: &NetOp, dev: &str) -> String {
    match op {
        NetOp::ReplaceNeighbour { ip, mac } => {
            format!("ip neigh replace {ip} lladdr {mac} dev {dev} nud permanent")
        }
        NetOp::ReplaceFdb { mac, dst } => {
            format!("bridge fdb replace {mac} dev {dev} dst {dst} self permanent")
        }
        NetOp::ReplaceTunnelRoute { dst, gateway } => {
            format!("ip route replace {dst} via {gateway} dev {dev} onlink")
        }
        NetOp::ReplaceDirectRoute { dst, gateway } => {
            format!("ip route replace {dst} via {gateway}")
        }
        NetOp::DeleteRoute { dst } => format!("ip route del {dst}"),
        NetOp::DeleteFdb { mac, dst } => format!("bridge fdb del {mac} dev {dev} dst {dst} self"),
        NetOp::DeleteNeighbour { ip } => format!("ip neigh del {ip} dev {dev}"),
    }
}

fn neighbour(family: AddressFamily, index: u32) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = family;
    m.header.ifindex = index;
    m
}

/// A VXLAN FDB entry: AF_BRIDGE, NTF_SELF (the device's own table, not a
/// bridge master's), NDA_LLADDR and NDA_DST.
fn fdb(index: u32, mac: MacAddr, dst: Ipv4Addr) -> NeighbourMessage {
    let mut m = neighbour(AddressFamily::Bridge, index);
    m.header.flags = NeighbourFlags::Own;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
    m
}

/// A main-table IPv4 unicast route to `dst`, scope universe, proto boot
/// (what `ip route` uses, and hides).
fn route(dst: Ipv4Network) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet;
    m.header.destination_prefix_length = dst.prefix();
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Boot;
    m.header.scope = RouteScope::Universe;
    m.header.kind = RouteType::Unicast;
    m.attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(
            dst.network(),
        )));
    m
}

/// `ip route replace <dst> dev <index>`: scope link, no gateway.
pub(super) fn device_route(index: u32, dst: Ipv4Network) -> RouteMessage {
    let mut m = route(dst);
    m.header.scope = RouteScope::Link;
    m.attributes.push(RouteAttribute::Oif(index));
    m
}

/// `ip addr replace <address> dev <index>` (IFA_LOCAL and IFA_ADDRESS both
/// the address, as iproute2 sends for a non-point-to-point link).
pub(super) fn address_message(index: u32, address: Ipv4Network) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.prefix_len = address.prefix();
    m.header.index = index;
    m.attributes
        .push(AddressAttribute::Local(IpAddr::V4(address.ip())));
    m.attributes
        .push(AddressAttribute::Address(IpAddr::V4(address.ip())));
    m
}

/// The IPv4 address of an address message (IFA_LOCAL, else IFA_ADDRESS).
pub(super) fn ipv4_of(m: &AddressMessage) -> Option<(u32, Ipv4Network)> {
    if m.header.family != AddressFamily::Inet {
        return None;
    }
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
        _ => None,
    });
    let address = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
        _ => None,
    });
    let ip = local.or(address)?;
    Ipv4Network::new(ip, m.header.prefix_len)
        .ok()
        .map(|net| (m.header.index, net))
}

/// Our view of a link message.
pub(super) fn link_info(m: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: m.header.index,
        name: String::new(),
        mtu: 0,
        mac: None,
        up: m.header.flags.contains(LinkFlags::Up),
        kind: None,
    };
    for attribute in &m.attributes {
        match attribute {
            LinkAttribute::IfName(name) => info.name.clone_from(name),
            LinkAttribute::Mtu(mtu) => info.mtu = *mtu,
            LinkAttribute::Address(bytes) => info.mac = mac_of(bytes),
            LinkAttribute::LinkInfo(infos) => {
                info.kind = infos.iter().find_map(|i| match i {
                    LinkInfoNla::Kind(kind) => Some(kind.to_string()),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    info
}

pub(super) fn mac_of(bytes: &[u8]) -> Option<MacAddr> {
    <[u8; 6]>::try_from(bytes).ok().map(MacAddr)
}

/// The VXLAN attributes of an existing link that decide whether it can be
/// reused.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct VxlanAttrs {
    pub(super) vni: Option<u32>,
    pub(super) underlay: Option<u32>,
    pub(super) local: Option<Ipv4Addr>,
    pub(super) port: Option<u16>,
    pub(super) learning: Option<bool>,
    pub(super) gbp: bool,
    pub(super) group: bool,
    pub(super) l2miss: bool,
    pub(super) l3miss: bool,
}

/// `Some` if `m` is a VXLAN link.
pub(super) fn vxlan_attrs(m: &LinkMessage) -> Option<VxlanAttrs> {
    let infos = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => Some(infos),
        _ => None,
    })?;
    if !infos
        .iter()
        .any(|i| matches!(i, LinkInfoNla::Kind(InfoKind::Vxlan)))
    {
        return None;
    }
    let mut attrs = VxlanAttrs::default();
    for info in infos {
        let LinkInfoNla::Data(InfoData::Vxlan(data)) = info else {
            continue;
        };
        for nla in data {
            match nla {
                InfoVxlan::Id(vni) => attrs.vni = Some(*vni),
                InfoVxlan::Link(index) => attrs.underlay = Some(*index),
                InfoVxlan::Local(ip) => attrs.local = Some(*ip),
                InfoVxlan::Port(port) => attrs.port = Some(*port),
                InfoVxlan::Learning(on) => attrs.learning = Some(*on),
                InfoVxlan::Gbp => attrs.gbp = true,
                InfoVxlan::Group(ip) => attrs.group |= !ip.is_unspecified(),
                InfoVxlan::Group6(ip) => attrs.group |= !ip.is_unspecified(),
                InfoVxlan::L2Miss(on) => attrs.l2miss = *on,
                InfoVxlan::L3Miss(on) => attrs.l3miss = *on,
                _ => {}
            }
        }
    }
    Some(attrs)
}

/// A permanent IPv4 neighbour on `index`: (IP, MAC).
pub(super) fn permanent_neighbour(m: &NeighbourMessage, index: u32) -> Option<(Ipv4Addr, MacAddr)> {
    if m.header.family != AddressFamily::Inet
        || m.header.ifindex != index
        || m.header.state != NeighbourState::Permanent
    {
        return None;
    }
    let ip = m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })?;
    Some((ip, lladdr(m)?))
}

/// A permanent FDB entry on `index` with an IPv4 destination: (MAC, dst).
/// The all-zero MAC (the default/flood destination) is not a peer.
pub(super) fn fdb_entry(m: &NeighbourMessage, index: u32) -> Option<(MacAddr, Ipv4Addr)> {
    if m.header.family != AddressFamily::Bridge
        || m.header.ifindex != index
        || m.header.state != NeighbourState::Permanent
    {
        return None;
    }
    let dst = m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        // rtnetlink parses NDA_DST by the message's family, and AF_BRIDGE
        // is not an IP family, so the address arrives as raw bytes.
        NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => {
            <[u8; 4]>::try_from(bytes.as_slice())
                .ok()
                .map(Ipv4Addr::from)
        }
        _ => None,
    })?;
    let mac = lladdr(m)?;
    (mac.0 != [0; 6]).then_some((mac, dst))
}

fn lladdr(m: &NeighbourMessage) -> Option<MacAddr> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(bytes) => mac_of(bytes),
        _ => None,
    })
}

/// The parts of a main-table IPv4 unicast route we look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MainRoute {
    pub(super) dst: Ipv4Network,
    pub(super) gateway: Option<Ipv4Addr>,
    pub(super) oif: Option<u32>,
    pub(super) priority: u32,
}

/// `Some` for a main-table IPv4 unicast route (single next hop; for a
/// multipath route `oif` is the first hop's device and `gateway` is `None`).
pub(super) fn main_route(m: &RouteMessage) -> Option<MainRoute> {
    if m.header.address_family != AddressFamily::Inet || m.header.kind != RouteType::Unicast {
        return None;
    }
    // Tables above 255 only fit RTA_TABLE; the header then holds RT_TABLE_COMPAT.
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let mut dst_ip = Ipv4Addr::UNSPECIFIED;
    let mut route = MainRoute {
        dst: Ipv4Network::new(dst_ip, 0).ok()?,
        gateway: None,
        oif: None,
        priority: 0,
    };
    for attribute in &m.attributes {
        match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst_ip = *ip,
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => route.gateway = Some(*ip),
            RouteAttribute::Oif(index) => route.oif = Some(*index),
            RouteAttribute::Priority(p) => route.priority = *p,
            RouteAttribute::MultiPath(hops) if route.oif.is_none() => {
                route.oif = hops.first().map(|hop| hop.interface_index);
            }
            _ => {}
        }
    }
    route.dst = Ipv4Network::new(dst_ip, m.header.destination_prefix_length).ok()?;
    Some(route)
}

/// A route flannel owns, if `r` is one: inside `network`, and either on the
/// VXLAN device `index` with a gateway (tunnel) or via a gateway on another
/// device with the subnet length (direct routing).
pub(super) fn owned_route(
    r: &MainRoute,
    index: u32,
    network: Ipv4Network,
    subnet_len: u8,
) -> Option<OwnedRoute> {
    let inside = r.dst.prefix() >= network.prefix() && network.contains(r.dst.network());
    let gateway = r.gateway?;
    if !inside {
        return None;
    }
    if r.oif == Some(index) {
        Some(OwnedRoute {
            dst: r.dst,
            gateway,
            tunnel: true,
        })
    } else if r.dst.prefix() == subnet_len {
        Some(OwnedRoute {
            dst: r.dst,
            gateway,
            tunnel: false,
        })
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    #[test]
    fn owned_routes_are_tunnel_or_direct_inside_the_network() {
        let network = net("10.244.0.0/16");
        let tunnel = MainRoute {
            dst: net("10.244.2.0/24"),
            gateway: Some(Ipv4Addr::new(10, 244, 2, 0)),
            oif: Some(7),
            priority: 0,
        };
        assert_eq!(
            owned_route(&tunnel, 7, network, 24).map(|r| r.tunnel),
            Some(true)
        );
        let direct = MainRoute {
            oif: Some(2),
            gateway: Some(Ipv4Addr::new(198, 18, 0, 2)),
            ..tunnel
        };
        assert_eq!(
            owned_route(&direct, 7, network, 24).map(|r| r.tunnel),
            Some(false)
        );
        assert_eq!(owned_route(&direct, 7, network, 26), None, "other length");
        let outside = MainRoute {
            dst: net("10.245.2.0/24"),
            ..tunnel
        };
        assert_eq!(owned_route(&outside, 7, network, 24), None);
        let connected = MainRoute {
            gateway: None,
            ..tunnel
        };
        assert_eq!(owned_route(&connected, 7, network, 24), None);
    }

    #[test]
    fn describe_names_device_and_addresses() {
        let op = NetOp::ReplaceTunnelRoute {
            dst: net("10.244.2.0/24"),
            gateway: Ipv4Addr::new(10, 244, 2, 0),
        };
        assert_eq!(
            describe(&op, "flannel.1"),
            "ip route replace 10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink"
        );
    }
}
