//! The thin netlink layer of the VXLAN backend: it creates the `flannel.<VNI>`
//! device, applies [`NetOp`]s, reads back the flannel-owned kernel state and
//! watches for the device's removal.
//!
//! Everything happens in the calling thread's network namespace at the time
//! the socket is opened ([`Netlink::connect`], [`Netlink::watch_link_removals`]):
//! flanneld runs inside its node's netns as a whole process, and tests open
//! the socket on a thread that entered a test netns.
//!
//! Each public method names its iproute2 equivalent. Replies are checked
//! message by message (see `conn`): an operation counts as done only when
//! the kernel acknowledged it.

mod conn;
mod device;
mod error;
mod ethtool;
mod msg;
mod watch;

use std::net::Ipv4Addr;
use std::sync::Arc;

use futures::StreamExt;
use ipnetwork::Ipv4Network;
use rtnetlink::packet_route::address::AddressMessage;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourMessage;
use rtnetlink::packet_route::route::RouteMessage;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use subnet::lease::MacAddr;
use tokio::sync::watch as signal;
use tokio::task::AbortHandle;

use self::conn::{Conn, Reply};
pub use self::error::NetlinkError;
pub use self::ethtool::set_tx_checksum_offload;
use crate::vxlan::plan::{KernelState, NetOp};

/// Batches unanswered at any time: enough to keep the kernel busy while we
/// read replies, and (with batches sized to the receive buffer, see `conn`)
/// never so many replies that they overrun it, which is how flannel#958
/// lost route updates. With the usual 64-message batches: 256 messages.
const BATCHES_IN_FLIGHT: usize = 4;

/// A link as `ip link show` lists it.
#[derive(Debug, Clone)]
pub struct LinkInfo {
    /// ifindex.
    pub index: u32,
    /// Name (`IFLA_IFNAME`).
    pub name: String,
    /// MTU.
    pub mtu: u32,
    /// Hardware address, if the link has a 6-byte one.
    pub mac: Option<MacAddr>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// `IFLA_INFO_KIND` (`vxlan`, `veth`, …); `None` for links without one
    /// (physical NICs, loopback).
    pub kind: Option<String>,
}

/// The VXLAN device to create, as flannel creates it.
#[derive(Debug, Clone)]
pub struct VxlanDeviceSpec {
    /// `flannel.<VNI>`.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// The local (source) underlay address.
    pub local: Ipv4Addr,
    /// ifindex of the underlay interface.
    pub underlay_index: u32,
    /// UDP destination port; 0 = the kernel's default (8472), the attribute is not sent.
    pub port: u16,
    /// Kernel FDB learning (flannel's default: off, `nolearning`).
    pub learning: bool,
    /// VXLAN group-based policy extension.
    pub gbp: bool,
    /// Device MTU.
    pub mtu: u32,
    /// MAC to give a newly created device (see [`random_mac`]).
    pub mac: MacAddr,
}

/// The VXLAN device in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanDevice {
    /// ifindex.
    pub index: u32,
    /// Name.
    pub name: String,
    /// Its MAC (the VTEP MAC peers program).
    pub mac: MacAddr,
    /// Its MTU.
    pub mtu: u32,
    /// `true`: created now; `false`: an existing compatible device was reused.
    pub created: bool,
}

/// The outcome of [`Netlink::apply`].
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Operations the kernel acknowledged (deletes of absent entries included).
    pub applied: usize,
    /// Operations that failed, each with why.
    pub failed: Vec<(NetOp, NetlinkError)>,
}

/// A route-netlink connection in the current network namespace. Cheap to
/// clone; the connection task ends when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Netlink {
    conn: Conn,
    inner: Arc<Inner>,
}

/// Shared by the clones of a [`Netlink`]: stops its tasks on the last drop.
#[derive(Debug)]
struct Inner {
    connection: AbortHandle,
    /// Dropped with `Inner`; the watchers see the channel close and stop.
    shutdown: signal::Sender<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Netlink {
    /// Opens a route-netlink socket in the calling thread's network namespace
    /// and spawns its connection task on the current tokio runtime.
    pub fn connect() -> Result<Self, NetlinkError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime)?;
        let (connection, conn, unsolicited) = conn::open(0)?;
        // Nothing is subscribed, so nothing but overrun markers would arrive
        // there; the connection drops them once the receiver is gone.
        drop(unsolicited);
        let task = runtime.spawn(connection);
        let (shutdown, _) = signal::channel(());
        Ok(Self {
            conn,
            inner: Arc::new(Inner {
                connection: task.abort_handle(),
                shutdown,
            }),
        })
    }

    /// `ip link show`: every link.
    pub async fn links(&self) -> Result<Vec<LinkInfo>, NetlinkError> {
        self.conn
            .dump_map(dump_links(), "ip link show", |m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(msg::link_info(&link)),
                _ => None,
            })
            .await
    }

    /// `ip link show <name>`; `None` if there is no such link.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        Ok(self
            .link_message_by_name(name)
            .await?
            .as_ref()
            .map(msg::link_info))
    }

    /// `ip link show` of ifindex `index`; `None` if there is no such link.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<LinkInfo>, NetlinkError> {
        Ok(self
            .link_message_by_index(index)
            .await?
            .as_ref()
            .map(msg::link_info))
    }

    async fn link_message_by_name(&self, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut request = LinkMessage::default();
        request
            .attributes
            .push(LinkAttribute::IfName(name.to_owned()));
        self.get_link(request, &format!("ip link show {name}"))
            .await
    }

    async fn link_message_by_index(&self, index: u32) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut request = LinkMessage::default();
        request.header.index = index;
        self.get_link(request, &format!("ip link show (ifindex {index})"))
            .await
    }

    async fn get_link(
        &self,
        request: LinkMessage,
        op: &str,
    ) -> Result<Option<LinkMessage>, NetlinkError> {
        match self
            .conn
            .get(RouteNetlinkMessage::GetLink(request), op)
            .await?
        {
            Ok(RouteNetlinkMessage::NewLink(link)) => Ok(Some(link)),
            Ok(other) => Err(NetlinkError::Protocol {
                op: op.to_owned(),
                detail: format!("unexpected reply {other:?}"),
            }),
            Err(Reply::Nack { errno, .. }) if errno == msg::ENODEV => Ok(None),
            Err(reply) => reply.into_result(op, &[]).map(|()| None),
        }
    }

    /// `ip -4 addr show`: (ifindex, address/prefix) of every IPv4 address,
    /// in the kernel's order.
    pub async fn ipv4_addresses(&self) -> Result<Vec<(u32, Ipv4Network)>, NetlinkError> {
        let mut request = AddressMessage::default();
        request.header.family = AddressFamily::Inet;
        let replies = self
            .conn
            .dump(RouteNetlinkMessage::GetAddress(request), "ip -4 addr show")
            .await?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => msg::ipv4_of(a),
                _ => None,
            })
            .collect())
    }

    /// The main table's IPv4 unicast routes (`ip route show table main`).
    async fn main_routes(&self) -> Result<Vec<msg::MainRoute>, NetlinkError> {
        let mut request = RouteMessage::default();
        request.header.address_family = AddressFamily::Inet;
        self.conn
            .dump_map(
                RouteNetlinkMessage::GetRoute(request),
                "ip -4 route show table main",
                |m| match m {
                    RouteNetlinkMessage::NewRoute(r) => msg::main_route(&r),
                    _ => None,
                },
            )
            .await
    }

    /// `ip route show default`: the ifindex of the main table's IPv4 default
    /// route (the one with the lowest metric if there are several).
    pub async fn default_route_interface(&self) -> Result<Option<u32>, NetlinkError> {
        Ok(self
            .main_routes()
            .await?
            .into_iter()
            .filter(|r| r.dst.prefix() == 0 && r.oif.is_some())
            .min_by_key(|r| r.priority)
            .and_then(|r| r.oif))
    }

    /// `ip route show dev <ifindex> scope link`, roughly: the directly
    /// connected IPv4 prefixes of `ifindex` (main-table routes on it without
    /// a gateway, host /32s excluded). A peer inside one is on our L2 segment.
    pub async fn connected_prefixes(&self, ifindex: u32) -> Result<Vec<Ipv4Network>, NetlinkError> {
        let mut prefixes: Vec<Ipv4Network> = self
            .main_routes()
            .await?
            .into_iter()
            .filter(|r| {
                r.oif == Some(ifindex)
                    && r.gateway.is_none()
                    && r.dst.prefix() < 32
                    && r.dst.prefix() > 0
            })
            .map(|r| r.dst)
            .collect();
        prefixes.sort();
        prefixes.dedup();
        Ok(prefixes)
    }

    /// The name of `index` for messages, or `ifindex N` if it has none.
    async fn device_label(&self, index: u32) -> String {
        match self.link_by_index(index).await {
            Ok(Some(link)) => link.name,
            _ => format!("(ifindex {index})"),
        }
    }

    /// Applies `ops` to the VXLAN device `index`, in order, with replace
    /// semantics for `Replace*` (`ip neigh replace`, `bridge fdb replace`,
    /// `ip route replace`) and idempotent deletes (an entry already gone
    /// counts as deleted).
    ///
    /// Messages go out in batches of up to 64 per datagram with four batches
    /// unanswered (256 messages), the way `ip -batch` streams them but with
    /// every reply checked. Never stops at a failure: the report lists each
    /// failed op.
    pub async fn apply(&self, index: u32, ops: &[NetOp]) -> ApplyReport {
        let mut report = ApplyReport::default();
        if ops.is_empty() {
            return report;
        }
        let dev = self.device_label(index).await;
        // Batches are handed to the connection in order as the stream is
        // polled, and the kernel handles one socket's datagrams in the order
        // they were sent, so ops take effect in order even with several
        // batches in flight.
        // Closures over indexes, not over `&[NetOp]` chunks: a closure taking
        // a reference makes the future not provably `Send` for callers that
        // need it (rustc's "FnOnce is not general enough").
        let batch = self.conn.batch_size();
        let mut outcomes = futures::stream::iter((0..ops.len()).step_by(batch))
            .map(|start| {
                let chunk = &ops[start..ops.len().min(start + batch)];
                let requests = chunk.iter().map(|op| msg::op_request(index, op)).collect();
                // `batch` queues the datagram now, not when first polled.
                let replies = self.conn.batch(requests);
                async move { (start, replies.await) }
            })
            .buffered(BATCHES_IN_FLIGHT);
        while let Some((start, outcome)) = outcomes.next().await {
            let chunk = &ops[start..ops.len().min(start + batch)];
            match outcome {
                Ok(replies) => {
                    for (op, reply) in chunk.iter().zip(replies) {
                        self::record(&mut report, op, reply, &dev);
                    }
                }
                Err(failure) => {
                    // Which of the batch's ops happened is unknown; report
                    // all of them (a resync re-reads the kernel and fixes it).
                    for op in chunk {
                        report
                            .failed
                            .push((*op, failure.into_error(&msg::describe(op, &dev))));
                    }
                }
            }
        }
        if !report.failed.is_empty() {
            tracing::debug!(
                device = %dev,
                applied = report.applied,
                failed = report.failed.len(),
                "netlink apply finished with failures"
            );
        }
        report
    }

    /// `ip neigh show dev <vxlan> nud permanent`, `bridge fdb show dev
    /// <vxlan>` and `ip route show table main`, reduced to what flannel owns:
    /// permanent IPv4 neighbours on `index`, permanent FDB entries on `index`
    /// with an IPv4 destination (not the all-zero flood entry), and main-table
    /// routes into `network` that are either on `index` with a gateway
    /// (tunnel) or via a gateway elsewhere with prefix length `subnet_len`
    /// (direct). Dumps cannot be filtered by device, so filtering is ours.
    pub async fn kernel_state(
        &self,
        index: u32,
        network: Ipv4Network,
        subnet_len: u8,
    ) -> Result<KernelState, NetlinkError> {
        // One dump at a time, each entry reduced to what we keep as it
        // arrives: with thousands of peers the parsed messages would
        // otherwise be the daemon's largest allocation.
        let neighbours = self
            .conn
            .dump_map(
                neighbour_dump(AddressFamily::Inet),
                "ip -4 neigh show",
                |m| match m {
                    RouteNetlinkMessage::NewNeighbour(n) => msg::permanent_neighbour(&n, index),
                    _ => None,
                },
            )
            .await?
            .into_iter()
            .collect();
        let fdb = self
            .conn
            .dump_map(
                neighbour_dump(AddressFamily::Bridge),
                "bridge fdb show",
                |m| match m {
                    RouteNetlinkMessage::NewNeighbour(n) => msg::fdb_entry(&n, index),
                    _ => None,
                },
            )
            .await?
            .into_iter()
            .collect();
        let routes = self
            .main_routes()
            .await?
            .iter()
            .filter_map(|route| msg::owned_route(route, index, network, subnet_len))
            .map(|r| (r.dst, r))
            .collect();
        Ok(KernelState {
            neighbours,
            fdb,
            routes,
        })
    }

    /// `ip link del <index>`; a link that is already gone counts as deleted.
    pub async fn delete_link(&self, index: u32) -> Result<(), NetlinkError> {
        let mut request = LinkMessage::default();
        request.header.index = index;
        let op = format!("ip link del (ifindex {index})");
        self.conn
            .ack(RouteNetlinkMessage::DelLink(request), 0, &op)
            .await?
            .into_result(&op, &[msg::ENODEV])
    }
}

/// The request behind `ip link show`.
pub(super) fn dump_links() -> RouteNetlinkMessage {
    RouteNetlinkMessage::GetLink(LinkMessage::default())
}

fn neighbour_dump(family: AddressFamily) -> RouteNetlinkMessage {
    let mut request = NeighbourMessage::default();
    request.header.family = family;
    RouteNetlinkMessage::GetNeighbour(request)
}

fn record(report: &mut ApplyReport, op: &NetOp, reply: Reply, dev: &str) {
    let absent_ok = msg::absent_errnos(op);
    match reply.into_result(&msg::describe(op, dev), absent_ok) {
        Ok(()) => report.applied += 1,
        Err(error) => report.failed.push((*op, error)),
    }
}

/// A random locally administered unicast MAC (first octet `(b & 0xfe) | 0x02`,
/// as flannel makes its VTEP MACs).
pub fn random_mac() -> MacAddr {
    let mut bytes = [0u8; 6];
    fastrand::fill(&mut bytes);
    bytes[0] = (bytes[0] & 0xfe) | 0x02;
    MacAddr(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_macs_are_local_unicast() {
        for _ in 0..100 {
            let mac = random_mac();
            assert_eq!(mac.0[0] & 0x01, 0, "unicast");
            assert_eq!(mac.0[0] & 0x02, 0x02, "locally administered");
        }
    }

    #[test]
    fn connect_needs_a_runtime() {
        assert!(matches!(Netlink::connect(), Err(NetlinkError::NoRuntime)));
    }
}
