//! The ADD result, rendered in the version the runtime asked for, and
//! `prevResult` parsed from any supported version.

use std::net::Ipv4Addr;

use ipnetwork::{IpNetwork, Ipv4Network};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::{CniError, CniResult, ErrorCode};
use crate::version::Version;

/// One interface of the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Interface name.
    pub name: String,
    /// Hardware address (`aa:bb:..`), may be empty.
    pub mac: String,
    /// MTU (rendered from 1.1.0 on).
    pub mtu: Option<u32>,
    /// The netns path for the container's interface, `None` on the host.
    pub sandbox: Option<String>,
}

/// One address of the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpConfig {
    /// Address with prefix length (`10.244.1.5/24`).
    pub address: Ipv4Network,
    /// Gateway of that address.
    pub gateway: Option<Ipv4Addr>,
    /// Index into the interfaces the address is on.
    pub interface: Option<usize>,
}

/// One route of the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Destination.
    pub dst: Ipv4Network,
    /// Next hop; `None` means "via the IP config's gateway".
    pub gw: Option<Ipv4Addr>,
}

/// A successful ADD result (the spec's "Success" object).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AddResult {
    /// Interfaces created or used.
    pub interfaces: Vec<Interface>,
    /// Addresses assigned.
    pub ips: Vec<IpConfig>,
    /// Routes installed in the container.
    pub routes: Vec<Route>,
    /// DNS settings, passed through from the config when given.
    pub dns: Option<Value>,
}

impl AddResult {
    /// The result JSON in `version`'s format.
    pub fn to_value(&self, version: Version) -> Value {
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut m = Map::new();
                m.insert("name".into(), json!(i.name));
                if !i.mac.is_empty() {
                    m.insert("mac".into(), json!(i.mac));
                }
                if let (Some(mtu), true) = (i.mtu, version.has_interface_mtu()) {
                    m.insert("mtu".into(), json!(mtu));
                }
                if let Some(sandbox) = &i.sandbox {
                    m.insert("sandbox".into(), json!(sandbox));
                }
                Value::Object(m)
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut m = Map::new();
                if version.ip_configs_have_version() {
                    m.insert("version".into(), json!("4"));
                }
                if let Some(index) = ip.interface {
                    m.insert("interface".into(), json!(index));
                }
                m.insert("address".into(), json!(ip.address.to_string()));
                if let Some(gw) = ip.gateway {
                    m.insert("gateway".into(), json!(gw.to_string()));
                }
                Value::Object(m)
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| match r.gw {
                Some(gw) => json!({"dst": r.dst.to_string(), "gw": gw.to_string()}),
                None => json!({"dst": r.dst.to_string()}),
            })
            .collect();
        let mut m = Map::new();
        m.insert("cniVersion".into(), json!(version.as_str()));
        m.insert("interfaces".into(), Value::Array(interfaces));
        m.insert("ips".into(), Value::Array(ips));
        m.insert("routes".into(), Value::Array(routes));
        m.insert("dns".into(), self.dns.clone().unwrap_or_else(|| json!({})));
        Value::Object(m)
    }

    /// Parses a `prevResult` of any supported version. IPv6 entries (from
    /// another plugin of a dual-stack chain) are skipped.
    pub fn from_prev(value: &Value) -> CniResult<Self> {
        let wire: WireResult = serde_json::from_value(value.clone()).map_err(|e| {
            CniError::new(ErrorCode::Decode, "prevResult is not a CNI result").with_details(e)
        })?;
        let mut ips = Vec::new();
        for ip in wire.ips {
            let address: IpNetwork = ip.address.parse().map_err(|_| {
                CniError::new(
                    ErrorCode::Decode,
                    format!("prevResult ips[].address {:?} is not a CIDR", ip.address),
                )
            })?;
            let IpNetwork::V4(address) = address else {
                continue;
            };
            let gateway = match ip.gateway {
                None => None,
                Some(gw) => Some(gw.parse().map_err(|_| {
                    CniError::new(
                        ErrorCode::Decode,
                        format!("prevResult ips[].gateway {gw:?} is not an IPv4 address"),
                    )
                })?),
            };
            ips.push(IpConfig {
                address,
                gateway,
                interface: ip.interface,
            });
        }
        let mut routes = Vec::new();
        for r in wire.routes {
            let Ok(IpNetwork::V4(dst)) = r.dst.parse::<IpNetwork>() else {
                if r.dst.contains(':') {
                    continue;
                }
                return Err(CniError::new(
                    ErrorCode::Decode,
                    format!("prevResult routes[].dst {:?} is not a CIDR", r.dst),
                ));
            };
            let gw = r.gw.and_then(|g| g.parse().ok());
            routes.push(Route { dst, gw });
        }
        Ok(Self {
            interfaces: wire
                .interfaces
                .into_iter()
                .map(|i| Interface {
                    name: i.name,
                    mac: i.mac,
                    mtu: i.mtu,
                    sandbox: i.sandbox.filter(|s| !s.is_empty()),
                })
                .collect(),
            ips,
            routes,
            dns: wire.dns,
        })
    }
}

#[derive(Deserialize)]
struct WireResult {
    #[serde(default)]
    interfaces: Vec<WireInterface>,
    #[serde(default)]
    ips: Vec<WireIp>,
    #[serde(default)]
    routes: Vec<WireRoute>,
    #[serde(default)]
    dns: Option<Value>,
}

#[derive(Deserialize)]
struct WireInterface {
    name: String,
    #[serde(default)]
    mac: String,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    sandbox: Option<String>,
}

#[derive(Deserialize)]
struct WireIp {
    address: String,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    interface: Option<usize>,
}

#[derive(Deserialize)]
struct WireRoute {
    dst: String,
    #[serde(default)]
    gw: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::SUPPORTED_VERSIONS;

    fn sample() -> AddResult {
        AddResult {
            interfaces: vec![
                Interface {
                    name: "cni0".into(),
                    mac: "0a:58:0a:f4:01:01".into(),
                    mtu: Some(1450),
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: "0a:58:0a:f4:01:05".into(),
                    mtu: Some(1450),
                    sandbox: Some("/run/netns/x".into()),
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.1.5/24".parse().unwrap(),
                gateway: Some(Ipv4Addr::new(10, 244, 1, 1)),
                interface: Some(1),
            }],
            routes: vec![
                Route {
                    dst: "10.244.0.0/16".parse().unwrap(),
                    gw: None,
                },
                Route {
                    dst: "0.0.0.0/0".parse().unwrap(),
                    gw: Some(Ipv4Addr::new(10, 244, 1, 1)),
                },
            ],
            dns: None,
        }
    }

    #[test]
    fn old_versions_have_ip_version_and_new_ones_do_not() {
        let r = sample();
        let v03 = r.to_value(Version::V0_3_1);
        assert_eq!(v03["cniVersion"], "0.3.1");
        assert_eq!(v03["ips"][0]["version"], "4");
        assert!(v03["interfaces"][0].get("mtu").is_none());
        let v10 = r.to_value(Version::V1_0_0);
        assert!(v10["ips"][0].get("version").is_none());
        assert!(v10["interfaces"][1].get("mtu").is_none());
        let v11 = r.to_value(Version::V1_1_0);
        assert_eq!(v11["interfaces"][1]["mtu"], 1450);
        assert_eq!(v11["interfaces"][1]["sandbox"], "/run/netns/x");
        assert_eq!(v11["routes"][0], json!({"dst": "10.244.0.0/16"}));
        assert_eq!(v11["routes"][1]["gw"], "10.244.1.1");
    }

    #[test]
    fn every_version_round_trips_through_prev_result() {
        let r = sample();
        for v in SUPPORTED_VERSIONS {
            let version = Version::parse(v).unwrap();
            let mut back = AddResult::from_prev(&r.to_value(version)).unwrap();
            if !version.has_interface_mtu() {
                for i in &mut back.interfaces {
                    i.mtu = Some(1450);
                }
            }
            assert_eq!(back.ips, r.ips, "{v}");
            assert_eq!(back.routes, r.routes, "{v}");
            assert_eq!(back.interfaces, r.interfaces, "{v}");
        }
    }

    #[test]
    fn bad_prev_results_are_decode_errors_naming_the_field() {
        let e = AddResult::from_prev(&json!({"ips": [{"address": "nope"}]})).unwrap_err();
        assert_eq!(e.code, ErrorCode::Decode);
        assert!(e.msg.contains("address"), "{}", e.msg);
        let e = AddResult::from_prev(&json!({"ips": "x"})).unwrap_err();
        assert_eq!(e.code, ErrorCode::Decode);
        let dual = AddResult::from_prev(&json!({"ips": [
            {"address": "fd00::5/64"}, {"address": "10.0.0.5/24"}
        ]}))
        .unwrap();
        assert_eq!(dual.ips.len(), 1);
    }
}
