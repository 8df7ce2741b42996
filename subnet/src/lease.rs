//! Leases: the etcd key naming a subnet and the JSON value a node publishes.
//!
//! Both are byte-compatible with flannel. The key's last path segment is
//! `10.244.1.0-24` (dual stack: `10.244.1.0-24&2001:cafe:42:1::-64`) and the
//! value is Go's `LeaseAttrs` in its field order:
//!
//! ```json
//! {"PublicIP":"198.18.0.2","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"6a:5e:0b:33:58:7c"}}
//! ```

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde_json::value::RawValue;

use crate::json::{FieldError, GoObject};

/// The subnet(s) a lease names: its identity in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubnetKey {
    /// The IPv4 subnet (always present in etcd mode).
    pub ipv4: Ipv4Network,
    /// The IPv6 subnet of a dual-stack lease.
    pub ipv6: Option<Ipv6Network>,
}

/// Why a lease key or value could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseDecodeError {
    /// The key's last segment is not `<a.b.c.d>-<len>[&<ipv6>-<len>]`.
    #[error("lease key {key:?} is not a subnet key like 10.244.1.0-24: {reason}")]
    Key {
        /// The offending key (or key segment).
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The value is not a JSON object.
    #[error("lease value is not a JSON object: {0}")]
    Json(String),
    /// A field of the value has the wrong type or format.
    #[error("lease value: {0}")]
    Field(#[from] FieldError),
}

impl SubnetKey {
    /// A key for an IPv4-only lease.
    pub fn v4(ipv4: Ipv4Network) -> Self {
        Self { ipv4, ipv6: None }
    }

    /// Parses the last segment of a lease key (`10.244.1.0-24`, or with
    /// `&<ipv6>-<len>`). The subnet must be a network address (no host bits),
    /// which is what every flannel node writes.
    pub fn parse(segment: &str) -> Result<Self, LeaseDecodeError> {
        let bad = |reason| LeaseDecodeError::Key {
            key: segment.to_owned(),
            reason,
        };
        let (v4_part, v6_part) = match segment.split_once('&') {
            Some((v4, v6)) => (v4, Some(v6)),
            None => (segment, None),
        };
        let (addr, len) = v4_part.rsplit_once('-').ok_or(bad("no '-<len>'"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad("bad IPv4 address"))?;
        let len: u8 = parse_prefix(len, 32).ok_or(bad("bad IPv4 prefix length"))?;
        let ipv4 = Ipv4Network::new(addr, len).map_err(|_| bad("bad IPv4 prefix length"))?;
        if ipv4.network() != addr {
            return Err(bad("IPv4 address has host bits set"));
        }
        let ipv6 = match v6_part {
            None => None,
            Some(part) => {
                // flannel's key regex only accepts lower-case hex for IPv6.
                if part.bytes().any(|b| b.is_ascii_uppercase()) {
                    return Err(bad("IPv6 part must be lower case"));
                }
                let (addr, len) = part.rsplit_once('-').ok_or(bad("no IPv6 '-<len>'"))?;
                let addr: Ipv6Addr = addr.parse().map_err(|_| bad("bad IPv6 address"))?;
                let len = parse_prefix(len, 128).ok_or(bad("bad IPv6 prefix length"))?;
                let net = Ipv6Network::new(addr, len).map_err(|_| bad("bad IPv6 prefix length"))?;
                if net.network() != addr {
                    return Err(bad("IPv6 address has host bits set"));
                }
                Some(net)
            }
        };
        Ok(Self { ipv4, ipv6 })
    }
}

/// A decimal prefix length no larger than `max`, without sign or padding tricks.
fn parse_prefix(text: &str, max: u8) -> Option<u8> {
    if text.is_empty() || text.len() > 3 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u8>().ok().filter(|len| *len <= max)
}

impl fmt::Display for SubnetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ipv4.ip(), self.ipv4.prefix())?;
        if let Some(v6) = self.ipv6 {
            write!(f, "&{}-{}", v6.ip(), v6.prefix())?;
        }
        Ok(())
    }
}

impl FromStr for SubnetKey {
    type Err = LeaseDecodeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// What a node publishes about itself in its lease (Go's `LeaseAttrs`).
#[derive(Debug, Clone)]
pub struct LeaseAttrs {
    /// The node's public (underlay) IPv4 address; its identity for lease reuse.
    pub public_ip: Ipv4Addr,
    /// The node's public IPv6 address, if any.
    pub public_ipv6: Option<Ipv6Addr>,
    /// The backend type name (`vxlan`, `host-gw`, ...); empty for `udp`, as flannel writes it.
    pub backend_type: String,
    /// Backend-specific data for IPv4, kept byte for byte.
    pub backend_data: Option<Box<RawValue>>,
    /// Backend-specific data for IPv6, kept byte for byte.
    pub backend_v6_data: Option<Box<RawValue>>,
}

impl PartialEq for LeaseAttrs {
    fn eq(&self, other: &Self) -> bool {
        fn raw(v: &Option<Box<RawValue>>) -> Option<&str> {
            v.as_deref().map(RawValue::get)
        }
        self.public_ip == other.public_ip
            && self.public_ipv6 == other.public_ipv6
            && self.backend_type == other.backend_type
            && raw(&self.backend_data) == raw(&other.backend_data)
            && raw(&other.backend_v6_data) == raw(&self.backend_v6_data)
    }
}

impl Eq for LeaseAttrs {}

impl LeaseAttrs {
    /// Attributes with only a public IP (what the `udp` backend publishes).
    pub fn new(public_ip: Ipv4Addr) -> Self {
        Self {
            public_ip,
            public_ipv6: None,
            backend_type: String::new(),
            backend_data: None,
            backend_v6_data: None,
        }
    }

    /// Encodes the value exactly as flannel's Go code marshals it.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(160);
        out.push_str("{\"PublicIP\":\"");
        out.push_str(&self.public_ip.to_string());
        out.push_str("\",\"PublicIPv6\":");
        match self.public_ipv6 {
            Some(ip) => {
                out.push('"');
                out.push_str(&ip.to_string());
                out.push('"');
            }
            None => out.push_str("null"),
        }
        if !self.backend_type.is_empty() {
            out.push_str(",\"BackendType\":");
            out.push_str(&json_string(&self.backend_type));
        }
        if let Some(data) = &self.backend_data {
            out.push_str(",\"BackendData\":");
            out.push_str(data.get());
        }
        if let Some(data) = &self.backend_v6_data {
            out.push_str(",\"BackendV6Data\":");
            out.push_str(data.get());
        }
        out.push('}');
        out
    }

    /// Decodes a lease value the way Go's decoder reads it: keys match
    /// case-insensitively, unknown keys are ignored, a missing `PublicIP` is
    /// `0.0.0.0`, and `null` is the same as absent.
    pub fn decode(value: &str) -> Result<Self, LeaseDecodeError> {
        let obj = GoObject::parse(value).map_err(|e| LeaseDecodeError::Json(e.to_string()))?;
        let public_ip = obj
            .get::<Ipv4Addr>("PublicIP", "an IPv4 address string")?
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        let public_ipv6 = obj.get::<Ipv6Addr>("PublicIPv6", "an IPv6 address string or null")?;
        let backend_type = obj
            .get::<String>("BackendType", "a string")?
            .unwrap_or_default();
        let raw_data = |name| {
            obj.raw(name)
                .filter(|raw| raw.get() != "null")
                .map(|raw| raw.to_owned())
        };
        Ok(Self {
            public_ip,
            public_ipv6,
            backend_type,
            backend_data: raw_data("BackendData"),
            backend_v6_data: raw_data("BackendV6Data"),
        })
    }

    /// The VXLAN backend data (`{"VNI":1,"VtepMAC":"..."}`), if present.
    pub fn vxlan_data(&self) -> Option<Result<VxlanData, LeaseDecodeError>> {
        self.backend_data.as_deref().map(VxlanData::decode)
    }
}

/// A JSON string literal for `s`.
fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("serializing a str to JSON cannot fail")
}

/// One node's lease: the subnet(s) it holds and what it publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The leased subnet(s).
    pub key: SubnetKey,
    /// The node's published attributes.
    pub attrs: LeaseAttrs,
}

impl Lease {
    /// The IPv4 subnet of this lease.
    pub fn subnet(&self) -> Ipv4Network {
        self.key.ipv4
    }

    /// Decodes a lease from its key's last segment and its value.
    pub fn decode(key_segment: &str, value: &str) -> Result<Self, LeaseDecodeError> {
        Ok(Self {
            key: SubnetKey::parse(key_segment)?,
            attrs: LeaseAttrs::decode(value)?,
        })
    }
}

/// A MAC address as flannel publishes it (lower case, colon separated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = &'static str;

    /// Accepts `aa:bb:cc:dd:ee:ff` and `aa-bb-cc-dd-ee-ff` in either case (the
    /// 6-byte forms of Go's `net.ParseMAC`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let sep = if s.contains('-') { '-' } else { ':' };
        let mut out = [0u8; 6];
        let mut parts = s.split(sep);
        for byte in &mut out {
            let part = parts.next().ok_or("too few octets")?;
            if part.len() != 2 {
                return Err("each octet must be two hex digits");
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| "bad hex digit")?;
        }
        if parts.next().is_some() {
            return Err("too many octets");
        }
        Ok(Self(out))
    }
}

/// The VXLAN backend's lease data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanData {
    /// The VXLAN network identifier.
    pub vni: u32,
    /// The MAC address of the node's VTEP device (`flannel.<VNI>`).
    pub vtep_mac: MacAddr,
}

impl VxlanData {
    /// Encodes `{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}` as flannel does.
    pub fn encode(&self) -> Box<RawValue> {
        let text = format!(r#"{{"VNI":{},"VtepMAC":"{}"}}"#, self.vni, self.vtep_mac);
        RawValue::from_string(text).expect("a number and a hex MAC always form valid JSON")
    }

    /// Decodes VXLAN backend data (keys case-insensitive, as Go reads them).
    pub fn decode(raw: &RawValue) -> Result<Self, LeaseDecodeError> {
        let obj = GoObject::from_raw(raw).map_err(|e| LeaseDecodeError::Json(e.to_string()))?;
        let vni = obj.get::<u32>("VNI", "an unsigned integer")?.unwrap_or(0);
        let mac_text = obj
            .get::<String>("VtepMAC", "a MAC address string")?
            .unwrap_or_default();
        let vtep_mac = mac_text.parse::<MacAddr>().map_err(|_| FieldError {
            field: "VtepMAC".to_owned(),
            expected: "a MAC address string",
            found: mac_text.clone(),
        })?;
        Ok(Self { vni, vtep_mac })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLANNEL_VXLAN: &str = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;

    #[test]
    fn key_round_trips() {
        for text in [
            "10.244.1.0-24",
            "10.0.0.16-28",
            "10.244.1.0-24&2001:cafe:42:1::-64",
        ] {
            let key = SubnetKey::parse(text).unwrap();
            assert_eq!(key.to_string(), text);
        }
    }

    #[test]
    fn bad_keys_are_rejected_with_reason() {
        for text in [
            "",
            "config",
            "10.244.1.0",
            "10.244.1.0-",
            "10.244.1.0-33",
            "10.244.1.0-+4",
            "10.244.1.5-24",
            "10.244.1.0-24&2001:CAFE::-64",
            "10.244.1.0-24&2001:cafe::",
            "300.1.1.0-24",
        ] {
            let err = SubnetKey::parse(text).unwrap_err();
            assert!(err.to_string().contains(&format!("{text:?}")), "{err}");
        }
    }

    #[test]
    fn flannel_vxlan_value_decodes_and_reencodes_byte_for_byte() {
        let attrs = LeaseAttrs::decode(FLANNEL_VXLAN).unwrap();
        assert_eq!(attrs.public_ip, Ipv4Addr::new(192, 168, 64, 3));
        assert_eq!(attrs.backend_type, "vxlan");
        let vx = attrs.vxlan_data().unwrap().unwrap();
        assert_eq!(vx.vni, 1);
        assert_eq!(vx.vtep_mac.to_string(), "c6:d2:32:6f:8f:44");
        assert_eq!(attrs.encode(), FLANNEL_VXLAN);
    }

    #[test]
    fn our_vxlan_value_matches_flannel_bytes() {
        let attrs = LeaseAttrs {
            backend_type: "vxlan".into(),
            backend_data: Some(
                VxlanData {
                    vni: 1,
                    vtep_mac: "c6:d2:32:6f:8f:44".parse().unwrap(),
                }
                .encode(),
            ),
            ..LeaseAttrs::new(Ipv4Addr::new(192, 168, 64, 3))
        };
        assert_eq!(attrs.encode(), FLANNEL_VXLAN);
    }

    #[test]
    fn udp_value_has_only_addresses() {
        let attrs = LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(
            attrs.encode(),
            r#"{"PublicIP":"198.18.0.2","PublicIPv6":null}"#
        );
    }

    #[test]
    fn decode_is_case_insensitive_and_tolerant() {
        let attrs = LeaseAttrs::decode(
            r#"{"publicip":"10.1.1.1","PUBLICIPV6":"2001:db8::1","backendtype":"host-gw","Extra":7}"#,
        )
        .unwrap();
        assert_eq!(attrs.public_ip, Ipv4Addr::new(10, 1, 1, 1));
        assert_eq!(attrs.public_ipv6, Some("2001:db8::1".parse().unwrap()));
        assert_eq!(attrs.backend_type, "host-gw");
        assert!(attrs.backend_data.is_none());
        let empty = LeaseAttrs::decode("{}").unwrap();
        assert_eq!(empty.public_ip, Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn dual_stack_value_keeps_v6_data() {
        let text = r#"{"PublicIP":"10.0.0.1","PublicIPv6":"2001:db8::1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"},"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:02"}}"#;
        let attrs = LeaseAttrs::decode(text).unwrap();
        assert_eq!(attrs.encode(), text);
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = LeaseAttrs::decode(r#"{"PublicIP":"nope"}"#).unwrap_err();
        assert!(err.to_string().contains("PublicIP"), "{err}");
        assert!(err.to_string().contains("nope"), "{err}");
        assert!(LeaseAttrs::decode("not json").is_err());
        assert!(LeaseAttrs::decode("[]").is_err());
        let attrs =
            LeaseAttrs::decode(r#"{"PublicIP":"1.2.3.4","BackendData":{"VNI":1,"VtepMAC":"zz"}}"#)
                .unwrap();
        let err = attrs.vxlan_data().unwrap().unwrap_err();
        assert!(err.to_string().contains("VtepMAC"), "{err}");
    }

    #[test]
    fn mac_forms() {
        let mac: MacAddr = "C6-D2-32-6F-8F-44".parse().unwrap();
        assert_eq!(mac.to_string(), "c6:d2:32:6f:8f:44");
        assert!("c6:d2:32:6f:8f".parse::<MacAddr>().is_err());
        assert!("c6:d2:32:6f:8f:44:00".parse::<MacAddr>().is_err());
        assert!("c6:d2:32:6f:8f:4".parse::<MacAddr>().is_err());
    }
}
