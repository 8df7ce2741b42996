//! The plugin's network config (flannel's format) and what it resolves to
//! once `subnet.env` is known: an in-process bridge attachment, or a
//! flannel-style delegation to another plugin.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnetwork::Ipv4Network;
use serde_json::{Map, Value, json};
use subnet::subnet_env::{DEFAULT_SUBNET_FILE, SubnetEnv};

use crate::args::{Mac, parse_mac};
use crate::error::{CniError, CniResult, ErrorCode};
use crate::result::Route;
use crate::version::Version;

/// flannel's default state directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";

/// The bridge name the reference bridge plugin defaults to.
pub const DEFAULT_BRIDGE: &str = "cni0";

/// Delegate keys the in-process bridge implements. Any other key means the
/// user wants a feature of the real `bridge` plugin, so we delegate to it.
const IN_PROCESS_DELEGATE_KEYS: [&str; 9] = [
    "type",
    "bridge",
    "mtu",
    "ipMasq",
    "isGateway",
    "isDefaultGateway",
    "hairpinMode",
    "forceAddress",
    "cniVersion",
];

/// `ipam` keys the in-process IPAM implements (host-local's, minus what
/// flannel replaces anyway).
const IN_PROCESS_IPAM_KEYS: [&str; 8] = [
    "type",
    "routes",
    "ranges",
    "dataDir",
    "subnet",
    "rangeStart",
    "rangeEnd",
    "gateway",
];

/// One entry of `cni.dev/valid-attachments` (GC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The container ID.
    pub container_id: String,
    /// The interface name.
    pub ifname: String,
}

/// The config on stdin, as flannel's CNI plugin reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    /// `cniVersion`.
    pub version: Version,
    /// `name`: the network name.
    pub name: String,
    /// `subnetFile` (default `/run/flannel/subnet.env`).
    pub subnet_file: PathBuf,
    /// `dataDir` (default `/var/lib/cni/flannel`).
    pub data_dir: PathBuf,
    /// `delegate`: the delegated plugin's config (minus what flannel fills in).
    pub delegate: Map<String, Value>,
    /// `ipam`: a base for the delegate's IPAM.
    pub ipam: Map<String, Value>,
    /// `runtimeConfig`, passed to the delegate.
    pub runtime_config: Option<Value>,
    /// `runtimeConfig.ips`: addresses the runtime asks for.
    pub requested_ips: Vec<Ipv4Addr>,
    /// `runtimeConfig.mac`.
    pub requested_mac: Option<Mac>,
    /// `prevResult` (DEL, CHECK).
    pub prev_result: Option<Value>,
    /// `cni.dev/valid-attachments` (GC).
    pub valid_attachments: Option<Vec<Attachment>>,
    /// `dns`, passed through to the result.
    pub dns: Option<Value>,
}

fn invalid(msg: String) -> CniError {
    CniError::new(ErrorCode::InvalidConfig, msg)
}

/// Reads the `cniVersion` of whatever came on stdin, for error messages
/// before the config is known to be valid.
pub fn sniff_version(stdin: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(stdin).ok()?;
    value.get("cniVersion")?.as_str().map(str::to_owned)
}

impl PluginConfig {
    /// Parses stdin. Bad JSON is error 6, bad fields error 7, each naming the field.
    pub fn parse(stdin: &[u8]) -> CniResult<Self> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                ErrorCode::Decode,
                "the network config on stdin is not valid JSON",
            )
            .with_details(e)
        })?;
        let Value::Object(mut obj) = value else {
            return Err(CniError::new(
                ErrorCode::Decode,
                "the network config on stdin is not a JSON object",
            ));
        };
        let version = match obj.get("cniVersion") {
            Some(Value::String(v)) => Version::parse(v)?,
            Some(_) => return Err(invalid("cniVersion must be a string".into())),
            None => {
                return Err(invalid(
                    "cniVersion is missing from the network config".into(),
                ));
            }
        };
        let name = string_field(&obj, "name")?
            .ok_or_else(|| invalid("name is missing from the network config".into()))?;
        validate_network_name(&name)?;
        let subnet_file = string_field(&obj, "subnetFile")?
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_SUBNET_FILE.into());
        let data_dir = string_field(&obj, "dataDir")?
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_DATA_DIR.into());
        let delegate = object_field(&mut obj, "delegate")?.unwrap_or_default();
        for forbidden in ["name", "ipam"] {
            if delegate.contains_key(forbidden) {
                return Err(invalid(format!(
                    "delegate must not contain {forbidden:?} (flannel sets it)"
                )));
            }
        }
        if delegate.get("type").is_some_and(|t| !t.is_string()) {
            return Err(invalid("delegate.type must be a string".into()));
        }
        let ipam = object_field(&mut obj, "ipam")?.unwrap_or_default();
        let runtime_config = obj.remove("runtimeConfig");
        let (requested_ips, requested_mac) = match &runtime_config {
            Some(rc) => parse_runtime_config(rc)?,
            None => (Vec::new(), None),
        };
        // `cni.dev/attachments` is the key's name in early CNI 1.1 drafts
        // and libcni versions; accept both.
        let attachments = obj
            .remove("cni.dev/valid-attachments")
            .filter(|v| !v.is_null())
            .or_else(|| obj.remove("cni.dev/attachments").filter(|v| !v.is_null()));
        let valid_attachments = attachments.map(|v| parse_attachments(&v)).transpose()?;
        Ok(Self {
            version,
            name,
            subnet_file: subnet_file.into(),
            data_dir: data_dir.into(),
            delegate,
            ipam,
            runtime_config,
            requested_ips,
            requested_mac,
            prev_result: obj.remove("prevResult").filter(|v| !v.is_null()),
            valid_attachments,
            dns: obj.remove("dns").filter(|v| !v.is_null()),
        })
    }

    /// `delegate.type`, default `bridge`.
    pub fn delegate_type(&self) -> &str {
        self.delegate
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("bridge")
    }

    /// What ADD must do with this config on a node whose subnet.env is `env`.
    pub fn plan(&self, env: &SubnetEnv) -> CniResult<Plan> {
        let subnet = env.subnet_network().ok_or_else(|| {
            CniError::plugin(format!(
                "{} has no IPv4 FLANNEL_SUBNET (this plugin attaches IPv4 only)",
                self.subnet_file.display()
            ))
        })?;
        let mtu = match self.delegate.get("mtu") {
            Some(v) => json_mtu(v)?,
            None => env.mtu.ok_or_else(|| {
                CniError::plugin(format!("{} has no FLANNEL_MTU", self.subnet_file.display()))
            })?,
        };
        let ip_masq = match self.delegate.get("ipMasq") {
            Some(v) => json_bool(v, "delegate.ipMasq")?,
            None => !env.ipmasq.unwrap_or(false),
        };
        let mut routes = ipam_routes(&self.ipam)?;
        routes.extend(env.networks.iter().map(|&dst| Route { dst, gw: None }));

        let ipam_type = self.ipam.get("type").and_then(Value::as_str);
        let in_process = self.delegate_type() == "bridge"
            && self
                .delegate
                .keys()
                .all(|k| IN_PROCESS_DELEGATE_KEYS.contains(&k.as_str()))
            && matches!(ipam_type, None | Some("host-local"))
            && self
                .ipam
                .keys()
                .all(|k| IN_PROCESS_IPAM_KEYS.contains(&k.as_str()));
        if !in_process {
            return Ok(Plan::Delegate(
                self.render_delegate(env, subnet, mtu, ip_masq),
            ));
        }

        let bool_or = |key: &str, default: bool| -> CniResult<bool> {
            match self.delegate.get(key) {
                Some(v) => json_bool(v, &format!("delegate.{key}")),
                None => Ok(default),
            }
        };
        let is_default_gateway = bool_or("isDefaultGateway", false)?;
        // The bridge plugin forces isGateway on with isDefaultGateway.
        let is_gateway = bool_or("isGateway", true)? || is_default_gateway;
        let bridge = match self.delegate.get("bridge") {
            None => DEFAULT_BRIDGE.to_owned(),
            Some(Value::String(b)) => {
                crate::args::validate_ifname(b).map_err(|_| {
                    invalid(format!(
                        "delegate.bridge {b:?} is not a valid interface name"
                    ))
                })?;
                b.clone()
            }
            Some(_) => return Err(invalid("delegate.bridge must be a string".into())),
        };
        let gateway = first_host(subnet).ok_or_else(|| {
            CniError::plugin(format!(
                "the node subnet {subnet} is too small for a gateway and containers"
            ))
        })?;
        if is_default_gateway {
            routes.push(Route {
                dst: Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0)
                    .map_err(|e| CniError::plugin(e.to_string()))?,
                gw: Some(gateway),
            });
        }
        Ok(Plan::Bridge(BridgeSettings {
            bridge,
            mtu,
            ip_masq,
            is_gateway,
            hairpin: bool_or("hairpinMode", false)?,
            subnet,
            gateway,
            networks: env.networks.clone(),
            routes,
        }))
    }

    /// flannel's delegate config (section 9.3 of the compatibility notes).
    fn render_delegate(
        &self,
        env: &SubnetEnv,
        subnet: Ipv4Network,
        mtu: u32,
        ip_masq: bool,
    ) -> Value {
        let mut d = self.delegate.clone();
        d.insert("name".into(), json!(self.name));
        d.entry("type").or_insert_with(|| json!("bridge"));
        d.entry("ipMasq").or_insert_with(|| json!(ip_masq));
        d.entry("mtu").or_insert_with(|| json!(mtu));
        if d.get("type").and_then(Value::as_str) == Some("bridge") {
            d.entry("isGateway").or_insert_with(|| json!(true));
        }
        d.insert("cniVersion".into(), json!(self.version.as_str()));
        let mut ipam = self.ipam.clone();
        ipam.entry("type").or_insert_with(|| json!("host-local"));
        ipam.insert("ranges".into(), json!([[{"subnet": subnet.to_string()}]]));
        let mut routes = match ipam.get("routes") {
            Some(Value::Array(r)) => r.clone(),
            _ => Vec::new(),
        };
        routes.extend(env.networks.iter().map(|n| json!({"dst": n.to_string()})));
        ipam.insert("routes".into(), Value::Array(routes));
        d.insert("ipam".into(), Value::Object(ipam));
        if let Some(rc) = &self.runtime_config {
            d.insert("runtimeConfig".into(), rc.clone());
        }
        Value::Object(d)
    }
}

/// What ADD does.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// The common case: bridge, veth and IPAM in this process.
    Bridge(BridgeSettings),
    /// Execute `delegate.type` with this config, as flannel does.
    Delegate(Value),
}

/// The resolved settings of an in-process bridge attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeSettings {
    /// Bridge name (`cni0`).
    pub bridge: String,
    /// MTU of the bridge and both veth ends.
    pub mtu: u32,
    /// Masquerade traffic leaving the node subnet (flanneld does not).
    pub ip_masq: bool,
    /// Put the gateway address on the bridge.
    pub is_gateway: bool,
    /// Hairpin mode on the host veth.
    pub hairpin: bool,
    /// The node subnet (masked).
    pub subnet: Ipv4Network,
    /// The subnet's first host: the bridge address and containers' gateway.
    pub gateway: Ipv4Addr,
    /// The cluster networks (`FLANNEL_NETWORK`).
    pub networks: Vec<Ipv4Network>,
    /// Routes for the container: `ipam.routes`, the cluster networks, and
    /// the default route with `isDefaultGateway`.
    pub routes: Vec<Route>,
}

/// The first host address of `subnet` (`.1`), if the subnet has room for it
/// and at least one container.
pub fn first_host(subnet: Ipv4Network) -> Option<Ipv4Addr> {
    (subnet.prefix() <= 30).then(|| Ipv4Addr::from(u32::from(subnet.network()) + 1))
}

/// Network names as libcni validates them (they also name state files).
fn validate_network_name(name: &str) -> CniResult<()> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "name {name:?} is invalid: use letters, digits, '_', '.' and '-', starting with a \
             letter or digit"
        )))
    }
}

fn string_field(obj: &Map<String, Value>, key: &str) -> CniResult<Option<String>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(invalid(format!("{key} must be a string"))),
    }
}

fn object_field(obj: &mut Map<String, Value>, key: &str) -> CniResult<Option<Map<String, Value>>> {
    match obj.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(invalid(format!("{key} must be a JSON object"))),
    }
}

fn json_bool(v: &Value, field: &str) -> CniResult<bool> {
    v.as_bool()
        .ok_or_else(|| invalid(format!("{field} must be true or false, not {v}")))
}

fn json_mtu(v: &Value) -> CniResult<u32> {
    v.as_u64()
        .and_then(|m| u32::try_from(m).ok())
        .filter(|m| (68..=65535).contains(m))
        .ok_or_else(|| invalid(format!("delegate.mtu {v} is not an MTU (68-65535)")))
}

fn ipam_routes(ipam: &Map<String, Value>) -> CniResult<Vec<Route>> {
    let Some(routes) = ipam.get("routes") else {
        return Ok(Vec::new());
    };
    let routes = routes
        .as_array()
        .ok_or_else(|| invalid("ipam.routes must be an array".into()))?;
    let mut out = Vec::new();
    for r in routes {
        let dst = r
            .get("dst")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(format!("ipam.routes entry {r} has no \"dst\" string")))?;
        if dst.contains(':') {
            continue; // IPv6 routes belong to an IPv6 range we do not allocate.
        }
        let dst: Ipv4Network = dst
            .parse()
            .map_err(|_| invalid(format!("ipam.routes dst {dst:?} is not an IPv4 CIDR")))?;
        let gw =
            match r.get("gw").and_then(Value::as_str) {
                None => None,
                Some(gw) => Some(gw.parse().map_err(|_| {
                    invalid(format!("ipam.routes gw {gw:?} is not an IPv4 address"))
                })?),
            };
        out.push(Route { dst, gw });
    }
    Ok(out)
}

fn parse_runtime_config(rc: &Value) -> CniResult<(Vec<Ipv4Addr>, Option<Mac>)> {
    let mut ips = Vec::new();
    if let Some(list) = rc.get("ips").filter(|v| !v.is_null()) {
        let list = list
            .as_array()
            .ok_or_else(|| invalid("runtimeConfig.ips must be an array of strings".into()))?;
        for item in list {
            let text = item.as_str().ok_or_else(|| {
                invalid(format!("runtimeConfig.ips entry {item} is not a string"))
            })?;
            let addr = text.split_once('/').map_or(text, |(ip, _)| ip);
            if addr.contains(':') {
                continue; // IPv6: not allocated by this plugin.
            }
            ips.push(addr.parse().map_err(|_| {
                invalid(format!(
                    "runtimeConfig.ips entry {text:?} is not an IP address"
                ))
            })?);
        }
    }
    let mac = match rc.get("mac").filter(|v| !v.is_null()) {
        None => None,
        Some(v) => {
            let text = v
                .as_str()
                .ok_or_else(|| invalid("runtimeConfig.mac must be a string".into()))?;
            Some(parse_mac(text).ok_or_else(|| {
                invalid(format!(
                    "runtimeConfig.mac {text:?} is not a unicast MAC address"
                ))
            })?)
        }
    };
    Ok((ips, mac))
}

fn parse_attachments(v: &Value) -> CniResult<Vec<Attachment>> {
    let list = v
        .as_array()
        .ok_or_else(|| invalid("cni.dev/valid-attachments must be an array".into()))?;
    list.iter()
        .map(|a| {
            let field = |k: &str| {
                a.get(k)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        invalid(format!(
                            "cni.dev/valid-attachments entry {a} has no {k:?} string"
                        ))
                    })
            };
            Ok(Attachment {
                container_id: field("containerID")?,
                ifname: field("ifname")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn env() -> SubnetEnv {
        SubnetEnv::parse(
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n",
            Path::new("subnet.env"),
        )
        .unwrap()
    }

    fn parse(v: Value) -> CniResult<PluginConfig> {
        PluginConfig::parse(v.to_string().as_bytes())
    }

    #[test]
    fn flannel_conflist_entry_gets_the_defaults() {
        let c = parse(json!({"cniVersion":"0.3.1","name":"cbr0","type":"flannel",
            "delegate":{"hairpinMode":true,"isDefaultGateway":true}}))
        .unwrap();
        assert_eq!(c.subnet_file, Path::new("/run/flannel/subnet.env"));
        assert_eq!(c.data_dir, Path::new("/var/lib/cni/flannel"));
        let Plan::Bridge(b) = c.plan(&env()).unwrap() else {
            panic!("expected the in-process bridge");
        };
        assert_eq!(b.bridge, "cni0");
        assert_eq!(b.mtu, 1472);
        assert!(!b.ip_masq, "flanneld masquerades, so the bridge must not");
        assert!(b.is_gateway && b.hairpin);
        assert_eq!(b.subnet.to_string(), "10.1.17.0/24");
        assert_eq!(b.gateway, Ipv4Addr::new(10, 1, 17, 1));
        assert_eq!(b.routes.len(), 2);
        assert_eq!(b.routes[0].dst.to_string(), "10.1.0.0/16");
        assert_eq!(b.routes[1].dst.to_string(), "0.0.0.0/0");
    }

    #[test]
    fn other_delegates_get_flannels_rendered_config() {
        let c = parse(
            json!({"cniVersion":"1.0.0","name":"cni-flannel","type":"flannel",
            "delegate":{"type":"ptp"},"runtimeConfig":{"portMappings":[]}}),
        )
        .unwrap();
        let Plan::Delegate(d) = c.plan(&env()).unwrap() else {
            panic!("expected delegation");
        };
        assert_eq!(d["type"], "ptp");
        assert_eq!(d["name"], "cni-flannel");
        assert_eq!(d["mtu"], 1472);
        assert_eq!(d["ipMasq"], false);
        assert!(d.get("isGateway").is_none());
        assert_eq!(d["ipam"]["type"], "host-local");
        assert_eq!(d["ipam"]["ranges"], json!([[{"subnet":"10.1.17.0/24"}]]));
        assert_eq!(d["ipam"]["routes"], json!([{"dst":"10.1.0.0/16"}]));
        assert_eq!(d["runtimeConfig"], json!({"portMappings":[]}));
    }

    #[test]
    fn bridge_features_we_do_not_implement_delegate_to_the_real_bridge() {
        let c = parse(json!({"cniVersion":"1.0.0","name":"n","delegate":{"vlan":5}})).unwrap();
        let Plan::Delegate(d) = c.plan(&env()).unwrap() else {
            panic!("expected delegation");
        };
        // flannel's documented example, field for field.
        assert_eq!(d["type"], "bridge");
        assert_eq!(d["isGateway"], true);
        let c = parse(json!({"cniVersion":"1.0.0","name":"n","ipam":{"type":"static"}})).unwrap();
        assert!(matches!(c.plan(&env()).unwrap(), Plan::Delegate(_)));
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            (json!({"name":"n"}), "cniVersion"),
            (json!({"cniVersion":"1.0.0"}), "name"),
            (json!({"cniVersion":"1.0.0","name":"a/b"}), "name"),
            (
                json!({"cniVersion":"1.0.0","name":"n","delegate":{"name":"x"}}),
                "\"name\"",
            ),
            (
                json!({"cniVersion":"1.0.0","name":"n","delegate":{"ipam":{}}}),
                "\"ipam\"",
            ),
            (
                json!({"cniVersion":"1.0.0","name":"n","delegate":{"type":5}}),
                "delegate.type",
            ),
            (
                json!({"cniVersion":"1.0.0","name":"n","delegate":[]}),
                "delegate",
            ),
            (
                json!({"cniVersion":"1.0.0","name":"n","subnetFile":1}),
                "subnetFile",
            ),
            (
                json!({"cniVersion":"1.0.0","name":"n","runtimeConfig":{"ips":["x"]}}),
                "runtimeConfig.ips",
            ),
            (
                json!({"cniVersion":"1.0.0","name":"n","runtimeConfig":{"mac":"q"}}),
                "runtimeConfig.mac",
            ),
            (
                json!({"cniVersion":"1.0.0","name":"n","cni.dev/valid-attachments":[{}]}),
                "valid-attachments",
            ),
        ];
        for (config, needle) in cases {
            let e = parse(config.clone()).unwrap_err();
            assert!(e.msg.contains(needle), "{config}: {}", e.msg);
        }
        let e = PluginConfig::parse(b"{not json").unwrap_err();
        assert_eq!(e.code, ErrorCode::Decode);
        let e = parse(json!({"cniVersion":"9.9.9","name":"n"})).unwrap_err();
        assert_eq!(e.code, ErrorCode::IncompatibleVersion);
    }

    #[test]
    fn plan_errors_name_the_field() {
        for (delegate, needle) in [
            (json!({"mtu": 10}), "delegate.mtu"),
            (json!({"mtu": "big"}), "delegate.mtu"),
            (json!({"hairpinMode": "yes"}), "delegate.hairpinMode"),
            (json!({"bridge": "a/b"}), "delegate.bridge"),
        ] {
            let c = parse(json!({"cniVersion":"1.0.0","name":"n","delegate":delegate})).unwrap();
            let e = c.plan(&env()).unwrap_err();
            assert!(e.msg.contains(needle), "{}", e.msg);
        }
        let c = parse(json!({"cniVersion":"1.0.0","name":"n","ipam":{"routes":[{"dst":"x"}]}}))
            .unwrap();
        assert!(c.plan(&env()).unwrap_err().msg.contains("ipam.routes"));
    }

    #[test]
    fn runtime_config_and_gc_fields_parse() {
        let c = parse(json!({"cniVersion":"1.1.0","name":"n",
            "runtimeConfig":{"ips":["10.1.17.9/24","fd00::9/64"],"mac":"0a:00:00:00:00:01"},
            "cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}))
        .unwrap();
        assert_eq!(c.requested_ips, vec![Ipv4Addr::new(10, 1, 17, 9)]);
        assert_eq!(c.requested_mac, Some([0x0a, 0, 0, 0, 0, 1]));
        assert_eq!(
            c.valid_attachments,
            Some(vec![Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into()
            }])
        );
    }
}
