//! CHECK: the attachment is still what ADD made: the address is reserved,
//! the container interface exists, is up, has the address and every route,
//! and its peer is a port of the bridge.

use ipnetwork::Ipv4Network;

use super::{open_netns, owner, read_subnet_env};
use crate::args::Env;
use crate::config::{Plan, PluginConfig};
use crate::delegate;
use crate::error::{CniError, CniResult, ErrorCode};
use crate::ipam::Ipam;
use crate::links;
use crate::netlink::Netlink;
use crate::result::AddResult;

fn failed(msg: String) -> CniError {
    CniError::plugin(format!("CHECK failed: {msg}"))
}

pub(super) fn check(env: &Env, conf: &PluginConfig) -> CniResult<()> {
    let container_id = env.require_container_id()?;
    let ifname = env.require_ifname()?;
    let netns_path = env.require_netns()?;
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "CHECK needs prevResult in the network config",
        )
    })?;
    let prev = AddResult::from_prev(prev)?;
    let subnet_env = read_subnet_env(&conf.subnet_file)?;
    let s = match conf.plan(&subnet_env)? {
        Plan::Bridge(s) => s,
        Plan::Delegate(_) => {
            return match delegate::load(&conf.data_dir, container_id)? {
                Some(mut saved) => {
                    // The delegate needs prevResult too.
                    if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&saved)
                        && let Some(obj) = v.as_object_mut()
                    {
                        obj.insert(
                            "prevResult".into(),
                            conf.prev_result.clone().unwrap_or_default(),
                        );
                        saved = v.to_string().into_bytes();
                    }
                    delegate::invoke(env, "CHECK", &saved).map(|_| ())
                }
                None => Err(failed(format!(
                    "no saved delegate config for {container_id}"
                ))),
            };
        }
    };

    let ours = prev
        .ips
        .iter()
        .find(|ip| s.subnet.contains(ip.address.ip()))
        .ok_or_else(|| {
            failed(format!(
                "prevResult has no address in the node subnet {}",
                s.subnet
            ))
        })?;
    let address = ours.address;
    let owner = owner(env, conf)?;
    let reserved = Ipam::lock(&conf.data_dir)?.find(s.subnet, &owner);
    if reserved != Some(address.ip()) {
        return Err(failed(format!(
            "address {} is not reserved for container {container_id} interface {ifname} \
             (reserved: {})",
            address.ip(),
            reserved.map_or_else(|| "none".to_owned(), |ip| ip.to_string())
        )));
    }

    let netns = open_netns(netns_path)?.ok_or_else(|| {
        CniError::new(
            ErrorCode::UnknownContainer,
            format!("network namespace {} does not exist", netns_path.display()),
        )
    })?;
    let mut container = Netlink::open_in(&netns)?;
    let link = links::link_by_name(&mut container, ifname)?
        .ok_or_else(|| failed(format!("the container has no interface {ifname}")))?;
    if !link.up {
        return Err(failed(format!("container interface {ifname} is down")));
    }
    if link.mtu != s.mtu {
        return Err(failed(format!(
            "container interface {ifname} has MTU {}, want {}",
            link.mtu, s.mtu
        )));
    }
    if let Some(want) = prev
        .interfaces
        .iter()
        .find(|i| i.name == ifname && i.sandbox.is_some())
        .map(|i| i.mac.to_ascii_lowercase())
        .filter(|m| !m.is_empty())
        && link.mac_string() != want
    {
        return Err(failed(format!(
            "container interface {ifname} has MAC {}, prevResult says {want}",
            link.mac_string()
        )));
    }
    let addresses = links::ipv4_addresses(&mut container, link.index)?;
    if !addresses.contains(&address) {
        return Err(failed(format!(
            "container interface {ifname} does not have address {address} (has: {})",
            list(&addresses)
        )));
    }
    let routes = links::gateway_routes(&mut container)?;
    for r in &s.routes {
        let gw = r.gw.unwrap_or(s.gateway);
        if !routes
            .iter()
            .any(|(dst, g, oif)| *dst == r.dst && *g == gw && *oif == link.index)
        {
            return Err(failed(format!(
                "the container has no route {} via {gw} dev {ifname}",
                r.dst
            )));
        }
    }

    let mut host = Netlink::open()?;
    let bridge = links::link_by_name(&mut host, &s.bridge)?
        .ok_or_else(|| failed(format!("bridge {} does not exist", s.bridge)))?;
    let peer = link
        .peer_index
        .map(|i| links::link_by_index(&mut host, i))
        .transpose()?
        .flatten();
    if peer.as_ref().and_then(|p| p.master) != Some(bridge.index) {
        return Err(failed(format!(
            "the host end of {ifname} is missing or not a port of {}",
            s.bridge
        )));
    }
    if s.is_gateway {
        let gateway = Ipv4Network::new(s.gateway, s.subnet.prefix())
            .map_err(|e| CniError::plugin(e.to_string()))?;
        let on_bridge = links::ipv4_addresses(&mut host, bridge.index)?;
        if !on_bridge.contains(&gateway) {
            return Err(failed(format!(
                "bridge {} does not have the gateway address {gateway}",
                s.bridge
            )));
        }
    }
    Ok(())
}

fn list(addresses: &[Ipv4Network]) -> String {
    if addresses.is_empty() {
        return "none".into();
    }
    addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
