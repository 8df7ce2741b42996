//! ADD: bridge, veth pair, address and routes, in this process.

use std::fs;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use super::{open_netns, owner, read_subnet_env};
use crate::args::Env;
use crate::config::{BridgeSettings, Plan, PluginConfig};
use crate::delegate;
use crate::error::{CniError, CniResult, ErrorCode};
use crate::ipam::Ipam;
use crate::links::{self, KernelRoute, Link, VethSpec};
use crate::masq;
use crate::netlink::Netlink;
use crate::result::{AddResult, Interface, IpConfig};

/// How many random host-side veth names to try before giving up.
const VETH_NAME_ATTEMPTS: usize = 8;

pub(super) fn add(env: &Env, conf: &PluginConfig) -> CniResult<String> {
    let container_id = env.require_container_id()?;
    let ifname = env.require_ifname()?;
    let netns_path = env.require_netns()?;
    let subnet_env = read_subnet_env(&conf.subnet_file)?;
    let settings = match conf.plan(&subnet_env)? {
        Plan::Bridge(settings) => settings,
        Plan::Delegate(config) => {
            let bytes = config.to_string().into_bytes();
            delegate::save(&conf.data_dir, container_id, &bytes)?;
            let out = delegate::invoke(env, "ADD", &bytes)?;
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
    };
    let netns = open_netns(netns_path)?.ok_or_else(|| {
        CniError::new(
            ErrorCode::UnknownContainer,
            format!("network namespace {} does not exist", netns_path.display()),
        )
    })?;
    let owner = owner(env, conf)?;
    let requested = env.args.ip.or_else(|| conf.requested_ips.first().copied());

    let (ip, newly_reserved) = {
        let ipam = Ipam::lock(&conf.data_dir)?;
        let (ip, newly_reserved) = ipam.reserve(settings.subnet, &owner, requested)?;
        if settings.ip_masq
            && let Err(e) = masq::ensure(&conf.name, settings.subnet)
        {
            if newly_reserved {
                ipam.release(&owner)?;
            }
            return Err(e);
        }
        (ip, newly_reserved)
    };
    let mac = env.args.mac.or(conf.requested_mac);
    match attach(
        &settings,
        &netns,
        netns_path.to_string_lossy().as_ref(),
        ifname,
        ip,
        mac,
    ) {
        Ok(mut result) => {
            result.dns.clone_from(&conf.dns);
            Ok(result.to_value(conf.version).to_string())
        }
        Err(e) => {
            if newly_reserved {
                // Do not leak the address; the runtime may never call DEL.
                Ipam::lock(&conf.data_dir)?.release(&owner)?;
            }
            Err(e)
        }
    }
}

/// Enables IPv4 forwarding (the node routes between cni0 and the overlay).
fn enable_ip_forward() -> CniResult<()> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    if fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    fs::write(path, "1").map_err(|e| {
        CniError::new(
            ErrorCode::Io,
            format!("cannot enable IPv4 forwarding ({path})"),
        )
        .with_details(e)
    })
}

fn attach(
    s: &BridgeSettings,
    netns: &fs::File,
    netns_path: &str,
    ifname: &str,
    ip: Ipv4Addr,
    mac: Option<[u8; 6]>,
) -> CniResult<AddResult> {
    let mut host = Netlink::open()?;
    let gateway_cidr = Ipv4Network::new(s.gateway, s.subnet.prefix())
        .map_err(|e| CniError::plugin(e.to_string()))?;
    let bridge = links::ensure_bridge(
        &mut host,
        &s.bridge,
        s.mtu,
        s.is_gateway.then_some(gateway_cidr),
        &s.networks,
    )?;
    if s.is_gateway {
        enable_ip_forward()?;
    }
    let mut container = Netlink::open_in(netns)?;
    let (container_link, host_link) = match links::link_by_name(&mut container, ifname)? {
        Some(existing) => (
            existing.clone(),
            existing_peer(&mut host, &existing, &bridge, ifname)?,
        ),
        None => create_pair(&mut host, &mut container, s, &bridge, netns, ifname, mac)?,
    };
    if s.hairpin {
        links::set_hairpin(&mut host, &host_link)?;
    }
    let address =
        Ipv4Network::new(ip, s.subnet.prefix()).map_err(|e| CniError::plugin(e.to_string()))?;
    let routes: Vec<KernelRoute> = s
        .routes
        .iter()
        .map(|r| KernelRoute {
            dst: r.dst,
            gw: r.gw.unwrap_or(s.gateway),
        })
        .collect();
    links::configure_container(&mut container, &container_link, address, &routes)?;
    Ok(AddResult {
        interfaces: vec![
            Interface {
                name: bridge.name.clone(),
                mac: bridge.mac_string(),
                mtu: Some(bridge.mtu),
                sandbox: None,
            },
            Interface {
                name: host_link.name.clone(),
                mac: host_link.mac_string(),
                mtu: Some(host_link.mtu),
                sandbox: None,
            },
            Interface {
                name: container_link.name.clone(),
                mac: container_link.mac_string(),
                mtu: Some(container_link.mtu),
                sandbox: Some(netns_path.to_owned()),
            },
        ],
        ips: vec![IpConfig {
            address,
            gateway: Some(s.gateway),
            interface: Some(2),
        }],
        routes: s.routes.clone(),
        dns: None,
    })
}

/// ADD repeated: the container already has `ifname`; it must be a veth
/// whose host end is in this namespace. A host end taken off the bridge is
/// put back (ADD repairs what it made).
fn existing_peer(
    host: &mut Netlink,
    existing: &Link,
    bridge: &Link,
    ifname: &str,
) -> CniResult<Link> {
    let peer = match existing.peer_index {
        Some(index) if existing.kind == Some(netlink_packet_route::link::InfoKind::Veth) => {
            links::link_by_index(host, index)?
        }
        _ => None,
    };
    match peer {
        Some(peer) if peer.kind == Some(netlink_packet_route::link::InfoKind::Veth) => {
            if peer.master != Some(bridge.index) {
                links::set_master(host, &peer, bridge)?;
            }
            Ok(peer)
        }
        _ => Err(CniError::plugin(format!(
            "the container already has an interface {ifname} that is not a veth to this node \
             (use another CNI_IFNAME or delete it)"
        ))),
    }
}

fn create_pair(
    host: &mut Netlink,
    container: &mut Netlink,
    s: &BridgeSettings,
    bridge: &Link,
    netns: &fs::File,
    ifname: &str,
    mac: Option<[u8; 6]>,
) -> CniResult<(Link, Link)> {
    for _ in 0..VETH_NAME_ATTEMPTS {
        let host_name = format!("veth{:08x}", fastrand::u32(..));
        let spec = VethSpec {
            host_name: &host_name,
            bridge_index: bridge.index,
            mtu: s.mtu,
            netns,
            ifname,
            mac,
        };
        if !links::create_veth(host, &spec)? {
            continue;
        }
        let host_link = links::link_by_name(host, &host_name)?;
        let container_link = links::link_by_name(container, ifname)?;
        return match (container_link, host_link) {
            (Some(c), Some(h)) => Ok((c, h)),
            _ => Err(CniError::plugin(format!(
                "veth {host_name}/{ifname} vanished right after it was created"
            ))),
        };
    }
    Err(CniError::plugin(format!(
        "could not find a free host-side veth name in {VETH_NAME_ATTEMPTS} attempts"
    )))
}
