//! Containers: a namespace with `eth0` on the node's `cni0` bridge, attached
//! by the real CNI plugin ([`crate::Node::add_container`]) or by hand for
//! subnets no flanneld of ours leased ([`crate::Node::add_container_in`]).

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::Output;
use std::time::Duration;

use ipnetwork::Ipv4Network;

use crate::cmd::{EXEC_TIMEOUT, ip};
use crate::error::{HarnessError, Result};
use crate::netns::netns_exec;
use crate::node::NodeConfig;
use crate::ping::{PingStats, ping};

/// The container bridge in every node namespace.
pub const BRIDGE: &str = "cni0";

/// One container namespace. A cheap handle: the namespace belongs to the
/// cluster, which deletes it on drop (or [`crate::Node::remove_container`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// Its namespace, `<node netns>c<j>`.
    netns: String,
    /// Its address on `eth0`.
    ip: Ipv4Addr,
    /// The prefix length of that address.
    prefix_len: u8,
    /// The gateway (`cni0`'s address).
    gateway: Ipv4Addr,
    /// The MTU of `eth0`.
    mtu: u32,
    /// The host end of the veth, in the node namespace.
    host_veth: String,
    /// Attached by the CNI plugin (so removal calls its DEL).
    by_plugin: bool,
}

impl Container {
    /// The container's network namespace.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The container's address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The container's address with its prefix length (`10.244.5.2/24`).
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.ip, self.prefix_len)
    }

    /// The default gateway: the node's `cni0` address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The MTU of the container's `eth0`.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// The name of the veth's host end in the node namespace.
    pub fn host_veth(&self) -> &str {
        &self.host_veth
    }

    /// True if the CNI plugin attached it.
    pub fn attached_by_plugin(&self) -> bool {
        self.by_plugin
    }

    /// Runs `ip netns exec <container> <args...>` (60 s timeout); the exit
    /// status is not checked.
    pub fn exec<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        netns_exec(&self.netns, args, EXEC_TIMEOUT)
    }

    /// Pings `to` from the container (`count` packets, 0.1 s apart).
    pub fn ping(&self, to: Ipv4Addr, count: u32) -> Result<PingStats> {
        ping(&self.netns, to, count, Duration::from_millis(100))
    }
}

/// A node's `cni0`: one subnet, one MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bridge {
    /// The subnet (masked).
    subnet: Ipv4Network,
    /// The bridge's address, the subnet's first host.
    gateway: Ipv4Addr,
    /// The MTU of the bridge and every container.
    mtu: u32,
}

impl Bridge {
    /// The bridge for `subnet` (any address inside it; it is masked).
    pub(crate) fn new(subnet: Ipv4Network, mtu: u32) -> Result<Self> {
        if subnet.prefix() > 30 {
            return Err(HarnessError::Invalid(format!(
                "container subnet {subnet} is too small (at most /30)"
            )));
        }
        let subnet = Ipv4Network::new(subnet.network(), subnet.prefix())
            .map_err(|e| HarnessError::Invalid(format!("container subnet {subnet}: {e}")))?;
        let gateway = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        Ok(Self {
            subnet,
            gateway,
            mtu,
        })
    }

    /// An error unless `subnet` and `mtu` are this bridge's.
    pub(crate) fn check_same(&self, subnet: Ipv4Network, mtu: u32) -> Result<()> {
        let other = Self::new(subnet, mtu)?;
        if other == *self {
            Ok(())
        } else {
            Err(HarnessError::Invalid(format!(
                "{BRIDGE} exists with {}/{} MTU {}; cannot add a container in {} MTU {mtu}",
                self.gateway,
                self.subnet.prefix(),
                self.mtu,
                other.subnet
            )))
        }
    }

    /// Host number `n` of the subnet (`n = 2` is `.2`), short of broadcast.
    pub(crate) fn host(&self, n: usize) -> Result<Ipv4Addr> {
        let full = || HarnessError::Invalid(format!("container subnet {} is full", self.subnet));
        let n = u32::try_from(n).map_err(|_| full())?;
        // `size()` of a /0 does not fit u32; but prefixes are at most /30 here
        // and at least /0, so use u64 arithmetic.
        let size = 1u64 << (32 - u32::from(self.subnet.prefix()));
        if u64::from(n) >= size - 1 {
            return Err(full());
        }
        Ok(Ipv4Addr::from(u32::from(self.subnet.network()) + n))
    }

    /// A fixed locally administered MAC from the gateway address (the
    /// kubernetes `0a:58:` convention). Setting it explicitly stops the
    /// bridge from taking over a port's MAC when ports come and go, which
    /// would leave containers with a stale gateway neighbour entry.
    fn mac(&self) -> String {
        let [a, b, c, d] = self.gateway.octets();
        format!("0a:58:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
    }

    /// Creates the bridge in `netns`: address, MTU, up.
    pub(crate) fn create(&self, netns: &str) -> Result<()> {
        let mtu = self.mtu.to_string();
        ip([
            "-n",
            netns,
            "link",
            "add",
            BRIDGE,
            "address",
            &self.mac(),
            "mtu",
            &mtu,
            "type",
            "bridge",
        ])?;
        ip([
            "-n",
            netns,
            "addr",
            "add",
            &format!("{}/{}", self.gateway, self.subnet.prefix()),
            "dev",
            BRIDGE,
        ])?;
        ip(["-n", netns, "link", "set", BRIDGE, "up"]).map(drop)
    }
}

/// Creates container `j` of a node with address `addr` on `bridge`.
pub(crate) fn create(
    node: &NodeConfig,
    bridge: &Bridge,
    j: usize,
    addr: Ipv4Addr,
) -> Result<Container> {
    let c = Container {
        netns: format!("{}c{j}", node.netns),
        ip: addr,
        prefix_len: bridge.subnet.prefix(),
        gateway: bridge.gateway,
        mtu: bridge.mtu,
        host_veth: format!("vc{j}"),
        by_plugin: false,
    };
    let mtu = c.mtu.to_string();
    node.netns_set.create(&c.netns)?;
    ip([
        "link",
        "add",
        &c.host_veth,
        "netns",
        &node.netns,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &c.netns,
    ])?;
    ip([
        "-n",
        &node.netns,
        "link",
        "set",
        &c.host_veth,
        "master",
        BRIDGE,
        "mtu",
        &mtu,
        "up",
    ])?;
    ip(["-n", &c.netns, "link", "set", "eth0", "mtu", &mtu, "up"])?;
    ip(["-n", &c.netns, "addr", "add", &c.cidr(), "dev", "eth0"])?;
    ip([
        "-n",
        &c.netns,
        "route",
        "add",
        "default",
        "via",
        &c.gateway.to_string(),
        "dev",
        "eth0",
    ])?;
    Ok(c)
}

/// The container the CNI plugin attached in `netns`, from its ADD result
/// (CNI 1.1.0: interfaces `[bridge, host veth, eth0 with mtu]`, one IPv4
/// address with its gateway).
pub(crate) fn from_cni_result(netns: String, result: &serde_json::Value) -> Result<Container> {
    let bad = |what: &str| HarnessError::Invalid(format!("CNI result has no {what}: {result}"));
    let ip = &result["ips"][0];
    let address: Ipv4Network = ip["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| bad("ips[0].address"))?;
    let gateway = ip["gateway"]
        .as_str()
        .and_then(|g| g.parse().ok())
        .ok_or_else(|| bad("ips[0].gateway"))?;
    let host_veth = result["interfaces"][1]["name"]
        .as_str()
        .ok_or_else(|| bad("interfaces[1].name"))?
        .to_owned();
    let mtu = result["interfaces"][2]["mtu"]
        .as_u64()
        .and_then(|m| u32::try_from(m).ok())
        .ok_or_else(|| bad("interfaces[2].mtu"))?;
    Ok(Container {
        netns,
        ip: address.ip(),
        prefix_len: address.prefix(),
        gateway,
        mtu,
        host_veth,
        by_plugin: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    #[test]
    fn bridge_addresses() {
        let b = Bridge::new(net("10.244.5.1/24"), 1450).unwrap();
        assert_eq!(b.gateway, Ipv4Addr::new(10, 244, 5, 1));
        assert_eq!(b.host(2).unwrap(), Ipv4Addr::new(10, 244, 5, 2));
        assert_eq!(b.host(254).unwrap(), Ipv4Addr::new(10, 244, 5, 254));
        assert!(b.host(255).is_err(), "broadcast");
        assert_eq!(b.mac(), "0a:58:0a:f4:05:01");
        b.check_same(net("10.244.5.0/24"), 1450).unwrap();
        assert!(b.check_same(net("10.244.6.0/24"), 1450).is_err());
        assert!(b.check_same(net("10.244.5.0/24"), 1500).is_err());
        assert!(Bridge::new(net("10.0.0.0/31"), 1500).is_err());
    }
}
