//! The kernel objects of an attachment, through [`Netlink`]: the bridge and
//! its gateway address, the veth pair, the container's address and routes.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use ipnetwork::Ipv4Network;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::args::{Mac, format_mac};
use crate::error::{CniError, CniResult};
use crate::netlink::{EADDRNOTAVAIL, EEXIST, ENODEV, Netlink, Request};

const CREATE_EXCL: u16 = NLM_F_CREATE | NLM_F_EXCL;
const CREATE_REPLACE: u16 = NLM_F_CREATE | NLM_F_REPLACE;

/// What we need to know about one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// ifindex.
    pub index: u32,
    /// Name.
    pub name: String,
    /// Hardware address.
    pub mac: Vec<u8>,
    /// MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// `IFLA_INFO_KIND` (`bridge`, `veth`, ...).
    pub kind: Option<InfoKind>,
    /// `IFLA_MASTER`.
    pub master: Option<u32>,
    /// `IFLA_LINK`: for a veth, the peer's index (in the peer's namespace).
    pub peer_index: Option<u32>,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Self {
        let mut link = Self {
            index: m.header.index,
            name: String::new(),
            mac: Vec::new(),
            mtu: 0,
            up: m.header.flags.contains(LinkFlags::Up),
            kind: None,
            master: None,
            peer_index: None,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name.clone_from(n),
                LinkAttribute::Address(mac) => link.mac.clone_from(mac),
                LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
                LinkAttribute::Controller(master) => link.master = Some(*master),
                LinkAttribute::Link(peer) => link.peer_index = Some(*peer),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            link.kind = Some(kind.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    /// The MAC as `aa:bb:..`.
    pub fn mac_string(&self) -> String {
        format_mac(&self.mac)
    }
}

/// The link called `name`, if it exists.
pub fn link_by_name(nl: &mut Netlink, name: &str) -> CniResult<Option<Link>> {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_owned()));
    get_link(nl, m, &format!("look up link {name}"))
}

/// The link with index `index`, if it exists.
pub fn link_by_index(nl: &mut Netlink, index: u32) -> CniResult<Option<Link>> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    get_link(nl, m, &format!("look up link {index}"))
}

fn get_link(nl: &mut Netlink, query: LinkMessage, what: &str) -> CniResult<Option<Link>> {
    Ok(match nl.get(RouteNetlinkMessage::GetLink(query), what)? {
        Some(RouteNetlinkMessage::NewLink(m)) => Some(Link::from_message(&m)),
        _ => None,
    })
}

/// Sets a link up (no-op if it is).
fn set_up(nl: &mut Netlink, link: &Link) -> CniResult<()> {
    if link.up {
        return Ok(());
    }
    let mut m = LinkMessage::default();
    m.header.index = link.index;
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
    nl.execute(
        RouteNetlinkMessage::SetLink(m),
        0,
        format!("set {} up", link.name),
    )?;
    Ok(())
}

/// A random locally administered unicast MAC.
fn random_mac() -> Mac {
    let mut mac = [0u8; 6];
    for b in &mut mac {
        *b = fastrand::u8(..);
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// Makes sure the bridge exists, is up and (when `gateway` is given) has
/// that address, removing addresses inside `networks` that are not it (left
/// from a previous lease of this node: the reference bridge plugin fails
/// with "cni0 already has an IP address different from" in that case).
pub fn ensure_bridge(
    nl: &mut Netlink,
    name: &str,
    mtu: u32,
    gateway: Option<Ipv4Network>,
    networks: &[Ipv4Network],
) -> CniResult<Link> {
    let bridge = match link_by_name(nl, name)? {
        Some(link) => link,
        None => {
            let mut m = LinkMessage::default();
            m.header.flags = LinkFlags::Up;
            m.header.change_mask = LinkFlags::Up;
            m.attributes.push(LinkAttribute::IfName(name.to_owned()));
            m.attributes.push(LinkAttribute::Mtu(mtu));
            // A fixed MAC: otherwise the bridge takes its lowest port's MAC,
            // which changes as containers come and go and stales neighbours.
            m.attributes
                .push(LinkAttribute::Address(random_mac().to_vec()));
            m.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                    InfoKind::Bridge,
                )]));
            match nl.execute(
                RouteNetlinkMessage::NewLink(m),
                CREATE_EXCL,
                format!("create bridge {name}"),
            ) {
                Ok(()) => {}
                // Another ADD created it at the same time.
                Err(e) if e.errno() == Some(EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
            link_by_name(nl, name)?.ok_or_else(|| {
                CniError::plugin(format!("bridge {name} vanished right after it was created"))
            })?
        }
    };
    if bridge.kind != Some(InfoKind::Bridge) {
        return Err(CniError::plugin(format!(
            "{name} exists but is not a bridge (kind {:?}); delete it or configure \
             delegate.bridge",
            bridge.kind
        )));
    }
    set_up(nl, &bridge)?;
    if let Some(gateway) = gateway {
        let current = ipv4_addresses(nl, bridge.index)?;
        let mut requests: Vec<Request> = Vec::new();
        for stale in current
            .iter()
            .filter(|a| **a != gateway && networks.iter().any(|n| n.contains(a.ip())))
        {
            requests.push((
                RouteNetlinkMessage::DelAddress(address_message(bridge.index, *stale)),
                0,
                format!("remove stale address {stale} from {name}"),
            ));
        }
        if !current.contains(&gateway) {
            requests.push((
                RouteNetlinkMessage::NewAddress(address_message(bridge.index, gateway)),
                CREATE_EXCL,
                format!("add gateway address {gateway} to {name}"),
            ));
        }
        nl.batch_allowing(requests, &[EEXIST, EADDRNOTAVAIL])?;
    }
    Ok(bridge)
}

/// The IPv4 addresses on link `index`.
pub fn ipv4_addresses(nl: &mut Netlink, index: u32) -> CniResult<Vec<Ipv4Network>> {
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet;
    let all = nl.dump(RouteNetlinkMessage::GetAddress(m), "list addresses")?;
    Ok(all
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) if a.header.index == index => ipv4_of(a),
            _ => None,
        })
        .collect())
}

fn ipv4_of(m: &AddressMessage) -> Option<Ipv4Network> {
    let ip = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
        _ => None,
    })?;
    Ipv4Network::new(ip, m.header.prefix_len).ok()
}

fn address_message(index: u32, address: Ipv4Network) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.prefix_len = address.prefix();
    m.header.index = index;
    m.attributes
        .push(AddressAttribute::Local(IpAddr::V4(address.ip())));
    m.attributes
        .push(AddressAttribute::Address(IpAddr::V4(address.ip())));
    if address.prefix() < 31 {
        m.attributes
            .push(AddressAttribute::Broadcast(address.broadcast()));
    }
    m
}

/// The veth to create for one container.
#[derive(Debug)]
pub struct VethSpec<'a> {
    /// Host-side name (`veth` + 8 hex digits).
    pub host_name: &'a str,
    /// The bridge to enslave the host side to.
    pub bridge_index: u32,
    /// MTU of both ends.
    pub mtu: u32,
    /// The container's network namespace.
    pub netns: &'a File,
    /// Container-side name (`CNI_IFNAME`).
    pub ifname: &'a str,
    /// Container-side MAC, if the runtime asked for one.
    pub mac: Option<Mac>,
}

/// Creates the veth pair in one request: the host end up on the bridge, the
/// peer created directly in the container namespace under its final name,
/// down. Returns `Ok(false)` if the host name is taken (pick another).
pub fn create_veth(nl: &mut Netlink, spec: &VethSpec<'_>) -> CniResult<bool> {
    // The peer cannot be created up: the kernel configures it before the
    // pair is linked, and opening a veth without a peer is ENOTCONN.
    // [`configure_container`] brings it up.
    let mut peer = LinkMessage::default();
    peer.attributes
        .push(LinkAttribute::IfName(spec.ifname.to_owned()));
    peer.attributes.push(LinkAttribute::Mtu(spec.mtu));
    peer.attributes
        .push(LinkAttribute::NetNsFd(spec.netns.as_raw_fd()));
    if let Some(mac) = spec.mac {
        peer.attributes.push(LinkAttribute::Address(mac.to_vec()));
    }
    let mut m = LinkMessage::default();
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
    m.attributes
        .push(LinkAttribute::IfName(spec.host_name.to_owned()));
    m.attributes.push(LinkAttribute::Mtu(spec.mtu));
    m.attributes
        .push(LinkAttribute::Controller(spec.bridge_index));
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
    ]));
    match nl.execute(
        RouteNetlinkMessage::NewLink(m),
        CREATE_EXCL,
        format!(
            "create veth {} (host) / {} (container)",
            spec.host_name, spec.ifname
        ),
    ) {
        Ok(()) => Ok(true),
        Err(e) if e.errno() == Some(EEXIST) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Makes `port` a port of `bridge`, up.
pub fn set_master(nl: &mut Netlink, port: &Link, bridge: &Link) -> CniResult<()> {
    let mut m = LinkMessage::default();
    m.header.index = port.index;
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
    m.attributes.push(LinkAttribute::Controller(bridge.index));
    nl.execute(
        RouteNetlinkMessage::SetLink(m),
        0,
        format!("attach {} to {}", port.name, bridge.name),
    )?;
    Ok(())
}

/// Turns hairpin mode on for a bridge port.
pub fn set_hairpin(nl: &mut Netlink, port: &Link) -> CniResult<()> {
    let mut m = LinkMessage::default();
    m.header.index = port.index;
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::PortKind(InfoPortKind::Bridge),
        LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(
            true,
        )])),
    ]));
    nl.execute(
        RouteNetlinkMessage::NewLink(m),
        0,
        format!("set hairpin mode on {}", port.name),
    )?;
    Ok(())
}

/// A container route as the kernel gets it: `dst via gw dev <index>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelRoute {
    /// Destination.
    pub dst: Ipv4Network,
    /// Next hop.
    pub gw: Ipv4Addr,
}

/// Brings the container's link up and adds its address and routes, in one
/// batch (idempotent).
pub fn configure_container(
    nl: &mut Netlink,
    link: &Link,
    address: Ipv4Network,
    routes: &[KernelRoute],
) -> CniResult<()> {
    let mut up = LinkMessage::default();
    up.header.index = link.index;
    up.header.flags = LinkFlags::Up;
    up.header.change_mask = LinkFlags::Up;
    let mut requests: Vec<Request> = vec![
        (
            RouteNetlinkMessage::SetLink(up),
            0,
            format!("set {} up", link.name),
        ),
        (
            RouteNetlinkMessage::NewAddress(address_message(link.index, address)),
            CREATE_REPLACE,
            format!("add address {address} to {}", link.name),
        ),
    ];
    for r in routes {
        requests.push((
            RouteNetlinkMessage::NewRoute(route_message(r, link.index)),
            CREATE_REPLACE,
            format!("add route {} via {} dev {}", r.dst, r.gw, link.name),
        ));
    }
    nl.batch(requests)?;
    Ok(())
}

fn route_message(r: &KernelRoute, index: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet;
    m.header.destination_prefix_length = r.dst.prefix();
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Boot;
    m.header.scope = RouteScope::Universe;
    m.header.kind = RouteType::Unicast;
    if r.dst.prefix() > 0 {
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(
                r.dst.network(),
            )));
    }
    m.attributes
        .push(RouteAttribute::Gateway(RouteAddress::Inet(r.gw)));
    m.attributes.push(RouteAttribute::Oif(index));
    m
}

/// The main-table IPv4 routes with a gateway, as `(dst, gw, oif)`.
pub fn gateway_routes(nl: &mut Netlink) -> CniResult<Vec<(Ipv4Network, Ipv4Addr, u32)>> {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet;
    let all = nl.dump(RouteNetlinkMessage::GetRoute(m), "list routes")?;
    let mut out = Vec::new();
    for msg in all {
        let RouteNetlinkMessage::NewRoute(r) = msg else {
            continue;
        };
        if r.header.table != RouteHeader::RT_TABLE_MAIN {
            continue;
        }
        let mut dst = Ipv4Addr::UNSPECIFIED;
        let mut gw = None;
        let mut oif = 0;
        for a in &r.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                RouteAttribute::Oif(i) => oif = *i,
                _ => {}
            }
        }
        if let (Some(gw), Ok(dst)) = (
            gw,
            Ipv4Network::new(dst, r.header.destination_prefix_length),
        ) {
            out.push((dst, gw, oif));
        }
    }
    Ok(out)
}

/// Deletes link `name` if it exists (a veth takes its peer with it).
pub fn delete_link(nl: &mut Netlink, name: &str) -> CniResult<bool> {
    let Some(link) = link_by_name(nl, name)? else {
        return Ok(false);
    };
    let mut m = LinkMessage::default();
    m.header.index = link.index;
    match nl.execute(RouteNetlinkMessage::DelLink(m), 0, format!("delete {name}")) {
        Ok(()) => Ok(true),
        Err(e) if e.errno() == Some(ENODEV) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
