//! The VXLAN backend's keys in the network config's `Backend` object.

use subnet::config::BackendConfig;
use subnet::json::FieldError;

/// The kernel's default VXLAN port when none is given (flannel leaves it to the kernel).
pub const KERNEL_DEFAULT_PORT: u16 = 8472;

/// Bytes a VXLAN packet adds on an IPv4 underlay: outer IPv4 (20), UDP (8),
/// VXLAN (8) and the inner Ethernet header (14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// `Backend` options of `"Type": "vxlan"` (keys case-insensitive, as flannel reads them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanOptions {
    /// `VNI` (default 1): the device is `flannel.<VNI>`.
    pub vni: u32,
    /// `Port` (default 0: the kernel's 8472).
    pub port: u16,
    /// `MTU`: the underlay MTU to assume instead of the interface's.
    pub mtu: Option<u32>,
    /// `GBP` (default false): VXLAN group policy extension.
    pub gbp: bool,
    /// `Learning` (default false): kernel FDB learning.
    pub learning: bool,
    /// `DirectRouting` (default false): route to peers on the same L2 segment
    /// over the underlay, without the tunnel.
    pub direct_routing: bool,
    /// `TxChecksumOffload` (ours, default true). `false` turns off TX checksum
    /// offload on the device (`ethtool -K flannel.1 tx-checksum-ip-generic
    /// off`), the workaround for flannel's 63-second delays behind NAT.
    pub tx_checksum_offload: bool,
}

impl Default for VxlanOptions {
    fn default() -> Self {
        Self {
            vni: 1,
            port: 0,
            mtu: None,
            gbp: false,
            learning: false,
            direct_routing: false,
            tx_checksum_offload: true,
        }
    }
}

/// A `Backend` option with a bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// A key of the wrong type.
    #[error("Backend.{}", .0)]
    Field(FieldError),
    /// A value out of range.
    #[error("Backend.{field} {value} is out of range: {reason}")]
    Range {
        /// The key.
        field: &'static str,
        /// The value given.
        value: u64,
        /// The allowed range, in words.
        reason: &'static str,
    },
}

impl VxlanOptions {
    /// Reads the options from the `Backend` object.
    pub fn from_config(backend: &BackendConfig) -> Result<Self, OptionError> {
        let o = &backend.options;
        let defaults = Self::default();
        let get_u64 = |name| {
            o.get::<u64>(name, "a non-negative integer")
                .map_err(OptionError::Field)
        };
        let get_bool = |name, default| {
            o.get::<bool>(name, "a boolean")
                .map(|v| v.unwrap_or(default))
                .map_err(OptionError::Field)
        };
        let vni = match get_u64("VNI")? {
            None | Some(0) => defaults.vni,
            Some(v) if v < (1 << 24) => u32::try_from(v).unwrap_or(defaults.vni),
            Some(v) => {
                return Err(OptionError::Range {
                    field: "VNI",
                    value: v,
                    reason: "a VNI has 24 bits (1..16777215)",
                });
            }
        };
        let port = match get_u64("Port")? {
            None => 0,
            Some(v) => u16::try_from(v).map_err(|_| OptionError::Range {
                field: "Port",
                value: v,
                reason: "a UDP port is 0..65535",
            })?,
        };
        let mtu = match get_u64("MTU")? {
            None | Some(0) => None,
            Some(v) if (u64::from(VXLAN_OVERHEAD) + 68..=65535).contains(&v) => {
                u32::try_from(v).ok()
            }
            Some(v) => {
                return Err(OptionError::Range {
                    field: "MTU",
                    value: v,
                    reason: "the underlay MTU must leave at least 68 bytes after 50 bytes of VXLAN overhead (118..65535)",
                });
            }
        };
        Ok(Self {
            vni,
            port,
            mtu,
            gbp: get_bool("GBP", false)?,
            learning: get_bool("Learning", false)?,
            direct_routing: get_bool("DirectRouting", false)?,
            tx_checksum_offload: get_bool("TxChecksumOffload", true)?,
        })
    }

    /// The device name, `flannel.<VNI>`.
    pub fn device_name(&self) -> String {
        format!("flannel.{}", self.vni)
    }

    /// The UDP port packets are sent to.
    pub fn effective_port(&self) -> u16 {
        if self.port == 0 {
            KERNEL_DEFAULT_PORT
        } else {
            self.port
        }
    }

    /// The overlay MTU for an underlay interface of `iface_mtu`.
    pub fn overlay_mtu(&self, iface_mtu: u32) -> u32 {
        self.mtu.unwrap_or(iface_mtu).saturating_sub(VXLAN_OVERHEAD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use subnet::NetworkConfig;

    fn options(backend: &str) -> Result<VxlanOptions, OptionError> {
        let text = format!(r#"{{"Network":"10.244.0.0/16","Backend":{backend}}}"#);
        VxlanOptions::from_config(&NetworkConfig::parse(&text).unwrap().backend)
    }

    #[test]
    fn defaults_match_flannel() {
        let o = options(r#"{"Type":"vxlan"}"#).unwrap();
        assert_eq!(o, VxlanOptions::default());
        assert_eq!(o.device_name(), "flannel.1");
        assert_eq!(o.effective_port(), 8472);
        assert_eq!(o.overlay_mtu(1500), 1450);
    }

    #[test]
    fn keys_are_case_insensitive() {
        let o = options(r#"{"type":"vxlan","vni":42,"port":4789,"mtu":9000,"directrouting":true,"TxChecksumOffload":false}"#)
            .unwrap();
        assert_eq!(o.vni, 42);
        assert_eq!(o.device_name(), "flannel.42");
        assert_eq!(o.effective_port(), 4789);
        assert_eq!(o.overlay_mtu(1500), 8950);
        assert!(o.direct_routing);
        assert!(!o.tx_checksum_offload);
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = options(r#"{"Type":"vxlan","VNI":16777216}"#).unwrap_err();
        assert!(err.to_string().contains("Backend.VNI 16777216"), "{err}");
        let err = options(r#"{"Type":"vxlan","Port":70000}"#).unwrap_err();
        assert!(err.to_string().contains("Backend.Port 70000"), "{err}");
        let err = options(r#"{"Type":"vxlan","MTU":100}"#).unwrap_err();
        assert!(err.to_string().contains("Backend.MTU 100"), "{err}");
        let err = options(r#"{"Type":"vxlan","DirectRouting":"yes"}"#).unwrap_err();
        assert!(err.to_string().contains("DirectRouting"), "{err}");
    }
}
