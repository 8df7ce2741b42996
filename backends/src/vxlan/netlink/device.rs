//! The VXLAN device and its address.

use std::io;

use ipnetwork::Ipv4Network;
use rtnetlink::LinkVxlan;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};

use super::msg::{self, VxlanAttrs};
use super::{Netlink, NetlinkError, VxlanDevice, VxlanDeviceSpec};
use crate::vxlan::options::KERNEL_DEFAULT_PORT;

impl Netlink {
    /// Creates the VXLAN device as flannel does, or reuses a compatible one.
    ///
    /// A new device is `ip link add <name> address <mac> mtu <mtu> up type
    /// vxlan id <vni> local <local> dev <underlay> [dstport <port>]
    /// [no]learning [gbp] ttl 0 tos 0 noproxy norsc nol2miss nol3miss
    /// noudp6zerocsumtx noudp6zerocsumrx` (no group: unicast only; port 0
    /// leaves the kernel's 8472). Its MAC is read back and must be the one
    /// set: udev's `MACAddressPolicy=persistent` rewriting it would make
    /// every peer program a stale MAC (flannel#1795).
    ///
    /// An existing link of that name is reused, keeping its MAC, if it is a
    /// VXLAN with the same VNI, underlay, local address, destination port,
    /// GBP and learning setting, no multicast group and no L2/L3 miss
    /// notifications; only its MTU is set and it is brought up. Anything
    /// else with that name is deleted and the device created afresh.
    ///
    /// Also `sysctl net.ipv6.conf.<name>.accept_ra=0` where IPv6 exists.
    pub async fn ensure_vxlan(&self, spec: &VxlanDeviceSpec) -> Result<VxlanDevice, NetlinkError> {
        let existing = self.link_message_by_name(&spec.name).await?;
        let reused = match existing {
            None => None,
            Some(link) => match incompatibility(&link, spec) {
                None => Some(link.header.index),
                Some(reason) => {
                    tracing::warn!(device = %spec.name, %reason, "replacing an incompatible link");
                    self.delete_link(link.header.index).await?;
                    None
                }
            },
        };
        let created = reused.is_none();
        let index = match reused {
            Some(index) => {
                tracing::info!(device = %spec.name, index, "reusing the existing VXLAN device");
                self.set_mtu_up(index, &spec.name, spec.mtu).await?;
                index
            }
            None => self.create_vxlan(spec).await?,
        };
        let op = format!("ip link show {}", spec.name);
        let link = self
            .link_by_index(index)
            .await?
            .ok_or_else(|| NetlinkError::LinkNotFound {
                op: op.clone(),
                device: spec.name.clone(),
            })?;
        let mac = match link.mac {
            Some(mac) if !created || mac == spec.mac => mac,
            actual => {
                return Err(NetlinkError::MacMismatch {
                    device: spec.name.clone(),
                    wanted: spec.mac,
                    actual,
                });
            }
        };
        disable_accept_ra(&spec.name)?;
        Ok(VxlanDevice {
            index,
            name: link.name,
            mac,
            mtu: link.mtu,
            created,
        })
    }

    /// `ip link add … type vxlan …` (see [`Netlink::ensure_vxlan`]); returns the ifindex.
    async fn create_vxlan(&self, spec: &VxlanDeviceSpec) -> Result<u32, NetlinkError> {
        // `LinkMessageBuilder::link()` (IFLA_LINK) is ignored for vxlan; the
        // underlay goes in IFLA_VXLAN_LINK through `dev()`.
        let mut builder = LinkVxlan::new(&spec.name, spec.vni)
            .dev(spec.underlay_index)
            .local(spec.local)
            .ttl(0)
            .tos(0)
            .learning(spec.learning)
            .proxy(false)
            .rsc(false)
            .l2miss(false)
            .l3miss(false)
            .udp_zero_csum6_tx(false)
            .udp_zero_csum6_rx(false);
        if spec.port > 0 {
            builder = builder.port(spec.port);
        }
        if spec.gbp {
            builder = builder.gbp();
        }
        let message = builder
            .mtu(spec.mtu)
            .address(spec.mac.0.to_vec())
            .up()
            .build();
        let op = describe_create(spec);
        self.conn
            .ack(
                RouteNetlinkMessage::NewLink(message),
                NLM_F_CREATE | NLM_F_EXCL,
                &op,
            )
            .await?
            .into_result(&op, &[])?;
        tracing::info!(device = %spec.name, mac = %spec.mac, "created the VXLAN device");
        self.link_message_by_name(&spec.name)
            .await?
            .map(|link| link.header.index)
            .ok_or_else(|| NetlinkError::LinkNotFound {
                op,
                device: spec.name.clone(),
            })
    }

    /// `ip link set <name> mtu <mtu> up` (link `index`).
    pub async fn set_mtu_up(&self, index: u32, name: &str, mtu: u32) -> Result<(), NetlinkError> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        message.header.flags = LinkFlags::Up;
        message.header.change_mask = LinkFlags::Up;
        message.attributes.push(LinkAttribute::Mtu(mtu));
        let op = format!("ip link set {name} mtu {mtu} up");
        self.conn
            .ack(RouteNetlinkMessage::SetLink(message), 0, &op)
            .await?
            .into_result(&op, &[])
    }

    /// `ip route replace <dst> dev <index>` (scope link): how the udp
    /// backend sends the whole network into its TUN device.
    pub async fn replace_device_route(
        &self,
        index: u32,
        dst: Ipv4Network,
    ) -> Result<(), NetlinkError> {
        let dev = self.device_label(index).await;
        let op = format!("ip route replace {dst} dev {dev}");
        self.conn
            .ack(
                RouteNetlinkMessage::NewRoute(msg::device_route(index, dst)),
                NLM_F_CREATE | NLM_F_REPLACE,
                &op,
            )
            .await?
            .into_result(&op, &[])
    }

    /// Puts `address` (e.g. `10.244.1.0/32`) on link `index` (`ip addr
    /// replace`) and removes every other IPv4 address inside `network` from
    /// it (`ip addr del`), as flannel does when its lease changed.
    pub async fn ensure_address(
        &self,
        index: u32,
        address: Ipv4Network,
        network: Ipv4Network,
    ) -> Result<(), NetlinkError> {
        let dev = self.device_label(index).await;
        let current: Vec<Ipv4Network> = self
            .ipv4_addresses()
            .await?
            .into_iter()
            .filter(|(i, _)| *i == index)
            .map(|(_, a)| a)
            .collect();
        // Stale ones first: the wanted address is never a secondary of them
        // (a /32 or its own prefix), so removing them cannot take it along.
        for stale in current
            .iter()
            .filter(|a| network.contains(a.ip()) && **a != address)
        {
            let op = format!("ip addr del {stale} dev {dev}");
            self.conn
                .ack(
                    RouteNetlinkMessage::DelAddress(msg::address_message(index, *stale)),
                    0,
                    &op,
                )
                .await?
                .into_result(&op, &[msg::EADDRNOTAVAIL, msg::ENOENT])?;
            tracing::info!(device = %dev, address = %stale, "removed a stale address");
        }
        if !current.contains(&address) {
            let op = format!("ip addr replace {address} dev {dev}");
            self.conn
                .ack(
                    RouteNetlinkMessage::NewAddress(msg::address_message(index, address)),
                    NLM_F_CREATE | NLM_F_REPLACE,
                    &op,
                )
                .await?
                .into_result(&op, &[])?;
        }
        Ok(())
    }
}

/// Why an existing link cannot serve as the device `spec` describes, if it can't.
fn incompatibility(link: &LinkMessage, spec: &VxlanDeviceSpec) -> Option<String> {
    let Some(attrs) = msg::vxlan_attrs(link) else {
        let kind = msg::link_info(link)
            .kind
            .unwrap_or_else(|| "no kind".into());
        return Some(format!("it is not a vxlan link ({kind})"));
    };
    vxlan_incompatibility(&attrs, spec)
}

fn vxlan_incompatibility(attrs: &VxlanAttrs, spec: &VxlanDeviceSpec) -> Option<String> {
    let wanted_port = if spec.port == 0 {
        KERNEL_DEFAULT_PORT
    } else {
        spec.port
    };
    // Stricter than flannel on the port: flannel ignores it when its own is
    // unset, and then listens on a port its peers don't send to.
    let checks = [
        (
            attrs.vni != Some(spec.vni),
            format!("VNI {:?}, want {}", attrs.vni, spec.vni),
        ),
        (
            attrs.underlay != Some(spec.underlay_index),
            format!(
                "underlay ifindex {:?}, want {}",
                attrs.underlay, spec.underlay_index
            ),
        ),
        (
            attrs.local != Some(spec.local),
            format!("local {:?}, want {}", attrs.local, spec.local),
        ),
        (
            attrs.port.is_some_and(|p| p != wanted_port),
            format!("dstport {:?}, want {wanted_port}", attrs.port),
        ),
        (
            attrs.gbp != spec.gbp,
            format!("gbp {}, want {}", attrs.gbp, spec.gbp),
        ),
        (
            attrs.learning.unwrap_or(true) != spec.learning,
            format!("learning {:?}, want {}", attrs.learning, spec.learning),
        ),
        (attrs.group, "it has a multicast group/remote".to_owned()),
        (
            attrs.l2miss || attrs.l3miss,
            "it has l2miss/l3miss on".to_owned(),
        ),
    ];
    checks
        .into_iter()
        .find_map(|(bad, reason)| bad.then_some(reason))
}

fn describe_create(spec: &VxlanDeviceSpec) -> String {
    let mut op = format!(
        "ip link add {} address {} mtu {} up type vxlan id {} local {} dev (ifindex {})",
        spec.name, spec.mac, spec.mtu, spec.vni, spec.local, spec.underlay_index
    );
    if spec.port > 0 {
        op.push_str(&format!(" dstport {}", spec.port));
    }
    op.push_str(if spec.learning {
        " learning"
    } else {
        " nolearning"
    });
    if spec.gbp {
        op.push_str(" gbp");
    }
    op
}

/// `sysctl -w net.ipv6.conf.<dev>.accept_ra=0`, if IPv6 is there at all.
/// Written synchronously from this thread: /proc/sys/net shows the network
/// namespace of the thread that opens it, and a blocking-pool thread might
/// not be in ours.
fn disable_accept_ra(dev: &str) -> Result<(), NetlinkError> {
    let path = format!("/proc/sys/net/ipv6/conf/{dev}/accept_ra");
    match std::fs::write(&path, "0") {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetlinkError::Io {
            op: format!("write 0 to {path}"),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use subnet::lease::MacAddr;

    fn spec() -> VxlanDeviceSpec {
        VxlanDeviceSpec {
            name: "flannel.1".into(),
            vni: 1,
            local: Ipv4Addr::new(198, 18, 0, 1),
            underlay_index: 2,
            port: 0,
            learning: false,
            gbp: false,
            mtu: 1450,
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
        }
    }

    fn attrs() -> VxlanAttrs {
        VxlanAttrs {
            vni: Some(1),
            underlay: Some(2),
            local: Some(Ipv4Addr::new(198, 18, 0, 1)),
            port: Some(8472),
            learning: Some(false),
            ..VxlanAttrs::default()
        }
    }

    #[test]
    fn same_settings_are_compatible() {
        assert_eq!(vxlan_incompatibility(&attrs(), &spec()), None);
    }

    #[test]
    fn each_difference_is_named() {
        let cases: [(VxlanAttrs, &str); 7] = [
            (
                VxlanAttrs {
                    vni: Some(2),
                    ..attrs()
                },
                "VNI",
            ),
            (
                VxlanAttrs {
                    underlay: Some(3),
                    ..attrs()
                },
                "underlay",
            ),
            (
                VxlanAttrs {
                    local: None,
                    ..attrs()
                },
                "local",
            ),
            (
                VxlanAttrs {
                    port: Some(4789),
                    ..attrs()
                },
                "dstport",
            ),
            (
                VxlanAttrs {
                    gbp: true,
                    ..attrs()
                },
                "gbp",
            ),
            (
                VxlanAttrs {
                    learning: Some(true),
                    ..attrs()
                },
                "learning",
            ),
            (
                VxlanAttrs {
                    group: true,
                    ..attrs()
                },
                "group",
            ),
        ];
        for (a, word) in cases {
            let reason = vxlan_incompatibility(&a, &spec()).unwrap();
            assert!(reason.contains(word), "{reason} should mention {word}");
        }
        let explicit = VxlanDeviceSpec {
            port: 4789,
            ..spec()
        };
        assert!(vxlan_incompatibility(&attrs(), &explicit).is_some());
    }
}
