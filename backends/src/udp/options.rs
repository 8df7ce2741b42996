//! The UDP backend's keys in the network config's `Backend` object.

use subnet::config::BackendConfig;

use crate::vxlan::options::OptionError;

/// flannel's UDP port.
pub const DEFAULT_PORT: u16 = 8285;

/// Bytes the encapsulation adds on an IPv4 underlay: outer IPv4 (20) and UDP (8).
pub const UDP_OVERHEAD: u32 = 28;

/// The TUN device flannel's udp backend creates.
pub const DEVICE_NAME: &str = "flannel0";

/// `Backend` options of `"Type": "udp"` (keys case-insensitive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpOptions {
    /// `Port` (default 8285): every node listens on it and sends to it.
    pub port: u16,
}

impl Default for UdpOptions {
    fn default() -> Self {
        Self { port: DEFAULT_PORT }
    }
}

impl UdpOptions {
    /// Reads the options from the `Backend` object.
    pub fn from_config(backend: &BackendConfig) -> Result<Self, OptionError> {
        let port = backend
            .options
            .get::<u64>("Port", "a non-negative integer")
            .map_err(OptionError::Field)?;
        let port = match port {
            None | Some(0) => DEFAULT_PORT,
            Some(v) => u16::try_from(v).map_err(|_| OptionError::Range {
                field: "Port",
                value: v,
                reason: "a UDP port is 1..65535",
            })?,
        };
        Ok(Self { port })
    }

    /// The overlay MTU for an underlay interface of `iface_mtu` (flannel: - 28).
    pub fn overlay_mtu(iface_mtu: u32) -> u32 {
        iface_mtu.saturating_sub(UDP_OVERHEAD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use subnet::NetworkConfig;

    fn options(backend: &str) -> Result<UdpOptions, OptionError> {
        let text = format!(r#"{{"Network":"10.244.0.0/16","Backend":{backend}}}"#);
        UdpOptions::from_config(&NetworkConfig::parse(&text).unwrap().backend)
    }

    #[test]
    fn defaults_and_keys_match_flannel() {
        assert_eq!(options(r#"{"Type":"udp"}"#).unwrap().port, 8285);
        assert_eq!(options(r#"{"type":"udp","port":7890}"#).unwrap().port, 7890);
        assert_eq!(UdpOptions::overlay_mtu(1500), 1472);
        let err = options(r#"{"Type":"udp","Port":70000}"#).unwrap_err();
        assert!(err.to_string().contains("Backend.Port 70000"), "{err}");
        let err = options(r#"{"Type":"udp","Port":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("Port"), "{err}");
    }
}
