//! The VXLAN backend: owns the `flannel.<VNI>` device and keeps the kernel's
//! per-peer entries equal to the peer set it is given.

use std::collections::BTreeMap;
use std::time::Instant;

use ipnetwork::Ipv4Network;
use subnet::lease::{Lease, LeaseAttrs, MacAddr, SubnetKey, VxlanData};
use subnet::watch::{LeaseEvent, SharedLease};
use tracing::{debug, info, warn};

use super::netlink::{self, ApplyReport, Netlink, NetlinkError, VxlanDevice, VxlanDeviceSpec};
use super::options::VxlanOptions;
use super::plan::{self, KernelState, NetOp, PlanContext, Skipped};
use crate::{Backend, BackendError, Underlay};

/// The VXLAN backend of one node.
#[derive(Debug)]
pub struct VxlanBackend {
    netlink: Netlink,
    options: VxlanOptions,
    /// The flannel network (routes inside it on other devices may be ours).
    network: Ipv4Network,
    subnet_len: u8,
    underlay: Underlay,
    device: VxlanDevice,
    ctx: PlanContext,
    /// Our own subnet, once we hold a lease.
    own: Option<Ipv4Network>,
    /// Every peer lease as last given to us (programmed or skipped).
    peers: BTreeMap<SubnetKey, SharedLease>,
}

impl VxlanBackend {
    /// Creates (or reuses) the device on `underlay`. The VTEP MAC is random
    /// for a new device and kept for a reused one, so a restart is hitless.
    pub async fn prepare(
        netlink: Netlink,
        options: VxlanOptions,
        network: Ipv4Network,
        subnet_len: u8,
        underlay: Underlay,
    ) -> Result<Self, BackendError> {
        let mac = netlink::random_mac();
        let device = ensure_device(&netlink, &options, &underlay, mac).await?;
        info!(
            device = %device.name,
            index = device.index,
            mac = %device.mac,
            mtu = device.mtu,
            reused = !device.created,
            "VXLAN config: VNI={} Port={} GBP={} Learning={} DirectRouting={}",
            options.vni, options.port, options.gbp, options.learning, options.direct_routing
        );
        let onlink = netlink
            .connected_prefixes(underlay.index)
            .await
            .map_err(|e| BackendError::netlink("list connected prefixes", e))?;
        let ctx = PlanContext {
            direct_routing: options.direct_routing,
            onlink,
        };
        Ok(Self {
            netlink,
            options,
            network,
            subnet_len,
            underlay,
            device,
            ctx,
            own: None,
            peers: BTreeMap::new(),
        })
    }

    /// The attributes to publish in our lease.
    pub fn lease_attrs(&self) -> LeaseAttrs {
        LeaseAttrs {
            backend_type: "vxlan".into(),
            backend_data: Some(
                VxlanData {
                    vni: self.options.vni,
                    vtep_mac: self.device.mac,
                }
                .encode(),
            ),
            ..LeaseAttrs::new(self.underlay.public_ip)
        }
    }

    /// The MTU containers should use (underlay MTU minus VXLAN overhead).
    pub fn mtu(&self) -> u32 {
        self.device.mtu
    }

    async fn program(&self, ops: &[NetOp]) -> Result<usize, BackendError> {
        if ops.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        let ApplyReport { applied, failed } = self.netlink.apply(self.device.index, ops).await;
        if ops.len() >= 100 {
            info!(ops = ops.len(), applied, elapsed = ?started.elapsed(), "programmed peers");
        } else {
            debug!(ops = ops.len(), applied, elapsed = ?started.elapsed(), "programmed peers");
        }
        if failed.is_empty() {
            return Ok(applied);
        }
        for (op, error) in &failed {
            warn!(?op, %error, "kernel operation failed");
        }
        Err(BackendError::Apply {
            failed: failed.len(),
            total: ops.len(),
            first: failed
                .into_iter()
                .next()
                .map(|(op, e)| format!("{op:?}: {e}"))
                .unwrap_or_default(),
        })
    }

    fn log_skipped(skipped: &[Skipped]) {
        for skip in skipped {
            warn!(subnet = %skip.key, reason = %skip.reason, "not programming a peer lease");
        }
    }

    /// Puts our subnet's base address on the device as a /32.
    async fn set_address(&mut self, subnet: Ipv4Network) -> Result<(), BackendError> {
        let address = Ipv4Network::new(subnet.network(), 32)
            .map_err(|e| BackendError::Invalid(format!("own subnet {subnet}: {e}")))?;
        self.netlink
            .ensure_address(self.device.index, address, self.network)
            .await
            .map_err(|e| BackendError::netlink("set the device address", e))?;
        self.own = Some(subnet);
        Ok(())
    }

    async fn kernel_state(&self) -> Result<KernelState, BackendError> {
        self.netlink
            .kernel_state(self.device.index, self.network, self.subnet_len)
            .await
            .map_err(|e| BackendError::netlink("read kernel state", e))
    }
}

async fn ensure_device(
    netlink: &Netlink,
    options: &VxlanOptions,
    underlay: &Underlay,
    mac: MacAddr,
) -> Result<VxlanDevice, BackendError> {
    let spec = VxlanDeviceSpec {
        name: options.device_name(),
        vni: options.vni,
        local: underlay.public_ip,
        underlay_index: underlay.index,
        port: options.port,
        learning: options.learning,
        gbp: options.gbp,
        mtu: options.overlay_mtu(underlay.mtu),
        mac,
    };
    let device = netlink
        .ensure_vxlan(&spec)
        .await
        .map_err(|e| BackendError::netlink("create the VXLAN device", e))?;
    if !options.tx_checksum_offload {
        netlink::set_tx_checksum_offload(&device.name, false)
            .await
            .map_err(|e| BackendError::netlink("turn off TX checksum offload", e))?;
        info!(device = %device.name, "TX checksum offload turned off (TxChecksumOffload=false)");
    }
    Ok(device)
}

impl Backend for VxlanBackend {
    async fn activate(&mut self, own: &Lease) -> Result<(), BackendError> {
        self.set_address(own.key.ipv4).await
    }

    async fn resync(&mut self, peers: Vec<SharedLease>) -> Result<usize, BackendError> {
        self.peers = peers.into_iter().map(|l| (l.key, l)).collect();
        self.replay().await
    }

    async fn replay(&mut self) -> Result<usize, BackendError> {
        let current = self.kernel_state().await?;
        let (ops, skipped) =
            plan::plan_resync(self.peers.values().map(AsRef::as_ref), &current, &self.ctx);
        // Only the operations are needed from here on; free the dump first.
        drop(current);
        Self::log_skipped(&skipped);
        let removed = ops
            .iter()
            .filter(|op| matches!(op, NetOp::DeleteRoute { .. }))
            .count();
        if removed > 0 {
            info!(
                removed,
                "resync removed routes of peers that no longer exist"
            );
        }
        self.program(&ops).await
    }

    async fn apply(&mut self, events: &[LeaseEvent]) -> Result<usize, BackendError> {
        let mut ops = Vec::new();
        for event in events {
            let (event_ops, skipped) = plan::plan_event(event, &self.ctx);
            Self::log_skipped(&skipped);
            ops.extend(event_ops);
            match event {
                LeaseEvent::Added(lease) | LeaseEvent::Changed { new: lease, .. } => {
                    self.peers.insert(lease.key, lease.clone());
                }
                LeaseEvent::Removed(lease) => {
                    self.peers.remove(&lease.key);
                }
            }
        }
        self.program(&ops).await
    }

    async fn recover(&mut self) -> Result<bool, BackendError> {
        let present = self
            .netlink
            .link_by_index(self.device.index)
            .await
            .map_err(|e| BackendError::netlink("look up the device", e))?
            .is_some_and(|link| link.name == self.device.name);
        if present {
            return Ok(false);
        }
        warn!(device = %self.device.name, "the VXLAN device was deleted; recreating it and replaying every peer");
        // Keep the published MAC so peers' FDB entries stay right.
        self.device = ensure_device(
            &self.netlink,
            &self.options,
            &self.underlay,
            self.device.mac,
        )
        .await?;
        if let Some(own) = self.own {
            self.set_address(own).await?;
        }
        self.replay().await?;
        Ok(true)
    }

    fn device_index(&self) -> u32 {
        self.device.index
    }
}

impl BackendError {
    fn netlink(what: &'static str, error: NetlinkError) -> Self {
        Self::Kernel {
            what,
            error: error.to_string(),
        }
    }
}
