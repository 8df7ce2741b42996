//! The CNI environment: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`,
//! `CNI_IFNAME`, `CNI_ARGS` and `CNI_PATH`, parsed and validated.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::error::{CniError, CniResult, ErrorCode};

/// The operation the runtime asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach a container.
    Add,
    /// Detach a container (idempotent).
    Del,
    /// Verify an attachment.
    Check,
    /// Release resources of attachments the runtime no longer knows.
    Gc,
    /// Report whether ADD can succeed now.
    Status,
    /// Report the supported spec versions.
    Version,
}

impl Command {
    fn parse(s: &str) -> CniResult<Self> {
        Ok(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "GC" => Self::Gc,
            "STATUS" => Self::Status,
            "VERSION" => Self::Version,
            other => {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!(
                        "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION"
                    ),
                ));
            }
        })
    }
}

/// A hardware address from `MAC=` or the `mac` capability.
pub type Mac = [u8; 6];

/// The parsed environment of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID`, validated (no path separators).
    pub container_id: Option<String>,
    /// `CNI_NETNS`; `None` when unset or empty (containerd's second DEL).
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`, validated as a Linux interface name.
    pub ifname: Option<String>,
    /// `CNI_ARGS`.
    pub args: CniArgs,
    /// `CNI_PATH`, split on `:`.
    pub path: Vec<PathBuf>,
}

impl Env {
    /// Reads the environment through `var` (`std::env::var` in the binary).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> CniResult<Self> {
        let command = var("CNI_COMMAND").ok_or_else(|| {
            CniError::new(ErrorCode::InvalidEnvironment, "CNI_COMMAND is not set")
        })?;
        let command = Command::parse(&command)?;
        let non_empty = |name: &str| var(name).filter(|v| !v.is_empty());
        let container_id = non_empty("CNI_CONTAINERID")
            .map(|id| validate_container_id(&id).map(|()| id))
            .transpose()?;
        let ifname = non_empty("CNI_IFNAME")
            .map(|name| validate_ifname(&name).map(|()| name))
            .transpose()?;
        let path = var("CNI_PATH")
            .unwrap_or_default()
            .split(':')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect();
        Ok(Self {
            command,
            container_id,
            netns: non_empty("CNI_NETNS").map(PathBuf::from),
            ifname,
            args: CniArgs::parse(&var("CNI_ARGS").unwrap_or_default())?,
            path,
        })
    }

    /// `CNI_CONTAINERID`, required by ADD, DEL and CHECK.
    pub fn require_container_id(&self) -> CniResult<&str> {
        self.container_id
            .as_deref()
            .ok_or_else(|| missing("CNI_CONTAINERID"))
    }

    /// `CNI_IFNAME`, required by ADD, DEL and CHECK.
    pub fn require_ifname(&self) -> CniResult<&str> {
        self.ifname.as_deref().ok_or_else(|| missing("CNI_IFNAME"))
    }

    /// `CNI_NETNS`, required by ADD and CHECK.
    pub fn require_netns(&self) -> CniResult<&std::path::Path> {
        self.netns.as_deref().ok_or_else(|| missing("CNI_NETNS"))
    }
}

fn missing(name: &str) -> CniError {
    CniError::new(
        ErrorCode::InvalidEnvironment,
        format!("{name} is not set (the runtime must pass it for this command)"),
    )
}

/// The container ID must be usable as a file name: the spec's character set
/// (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`), so never a path separator or `..`.
pub fn validate_container_id(id: &str) -> CniResult<()> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!(
                "CNI_CONTAINERID {id:?} is invalid: it must start with a letter or digit and \
                 contain only letters, digits, '_', '.' and '-' (no path separators)"
            ),
        ))
    }
}

/// An interface name the kernel accepts: 1 to 15 bytes, no `/`, `:` or
/// whitespace, not `.` or `..`.
pub fn validate_ifname(name: &str) -> CniResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0');
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!(
                "CNI_IFNAME {name:?} is not a valid interface name (1-15 bytes, no '/', ':' or \
                 whitespace)"
            ),
        ))
    }
}

/// `CNI_ARGS`: `K=V` pairs separated by `;`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// `IP=`: the address the runtime asks for (`podman run --ip`).
    pub ip: Option<Ipv4Addr>,
    /// `MAC=`: the container interface's hardware address.
    pub mac: Option<Mac>,
}

/// Keys we know but do not use (the kubelet's and containerd's pod identity).
const KNOWN_IGNORED: [&str; 4] = [
    "K8S_POD_NAMESPACE",
    "K8S_POD_NAME",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
];

impl CniArgs {
    /// Parses `CNI_ARGS`. Unknown keys are an error unless `IgnoreUnknown`
    /// is `1` or `true` (anywhere in the list), as in libcni.
    pub fn parse(text: &str) -> CniResult<Self> {
        let invalid = |msg: String| CniError::new(ErrorCode::InvalidEnvironment, msg);
        let mut pairs = Vec::new();
        for item in text.split(';').filter(|s| !s.is_empty()) {
            let (key, value) = item.split_once('=').ok_or_else(|| {
                invalid(format!(
                    "CNI_ARGS item {item:?} is not of the form KEY=VALUE"
                ))
            })?;
            pairs.push((key, value));
        }
        let ignore_unknown = pairs
            .iter()
            .any(|(k, v)| *k == "IgnoreUnknown" && (v.eq_ignore_ascii_case("true") || *v == "1"));
        let mut args = Self::default();
        for (key, value) in pairs {
            match key {
                "IP" => {
                    let text = value.split_once('/').map_or(value, |(ip, _)| ip);
                    args.ip = Some(text.parse().map_err(|_| {
                        invalid(format!(
                            "CNI_ARGS IP={value:?} is not an IPv4 address (this network is IPv4)"
                        ))
                    })?);
                }
                "MAC" => {
                    args.mac = Some(parse_mac(value).ok_or_else(|| {
                        invalid(format!("CNI_ARGS MAC={value:?} is not a MAC address"))
                    })?);
                }
                "IgnoreUnknown" => {}
                k if KNOWN_IGNORED.contains(&k) || ignore_unknown => {}
                k => {
                    return Err(invalid(format!(
                        "CNI_ARGS has unknown key {k:?} (add IgnoreUnknown=1 to ignore it)"
                    )));
                }
            }
        }
        Ok(args)
    }
}

/// Parses `aa:bb:cc:dd:ee:ff` (also with `-`); rejects multicast addresses,
/// which no interface may use.
pub fn parse_mac(text: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = text.split([':', '-']);
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

/// Formats a MAC address as the CNI result does (`aa:bb:cc:dd:ee:ff`).
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> CniResult<Env> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn podman_and_containerd_args_parse() {
        let a =
            CniArgs::parse("IgnoreUnknown=1;K8S_POD_NAME=web;IP=10.244.1.9;MAC=0a:58:0a:f4:01:09")
                .unwrap();
        assert_eq!(a.ip, Some(Ipv4Addr::new(10, 244, 1, 9)));
        assert_eq!(a.mac, Some([0x0a, 0x58, 0x0a, 0xf4, 1, 9]));
        let b = CniArgs::parse(
            "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u;IgnoreUnknown=1",
        )
        .unwrap();
        assert_eq!(b, CniArgs::default());
    }

    #[test]
    fn unknown_keys_need_ignore_unknown() {
        let e = CniArgs::parse("FOO=bar").unwrap_err();
        assert!(e.msg.contains("\"FOO\""), "{}", e.msg);
        assert!(CniArgs::parse("FOO=bar;IgnoreUnknown=true").is_ok());
        assert!(CniArgs::parse("IgnoreUnknown=0;FOO=bar").is_err());
    }

    #[test]
    fn bad_values_name_the_key() {
        for (text, needle) in [
            ("IP=banana", "IP="),
            ("IP=fd00::1", "IP="),
            ("MAC=zz:00:00:00:00:00", "MAC="),
            ("MAC=01:00:00:00:00:00", "MAC="),
            ("novalue", "KEY=VALUE"),
        ] {
            let e = CniArgs::parse(text).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidEnvironment);
            assert!(e.msg.contains(needle), "{text}: {}", e.msg);
        }
    }

    #[test]
    fn container_ids_with_path_separators_are_refused() {
        for id in ["../etc", "a/b", ".hidden", "", "a b", "x\0"] {
            assert!(validate_container_id(id).is_err(), "{id:?}");
        }
        for id in ["abc", "0123456789abcdef", "pod_1.a-b"] {
            validate_container_id(id).unwrap();
        }
        let e = env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "../../x")]).unwrap_err();
        assert!(e.msg.contains("CNI_CONTAINERID"), "{}", e.msg);
    }

    #[test]
    fn interface_names_follow_the_kernel_rules() {
        for name in ["", ".", "..", "eth0:1", "a/b", "sixteen-chars-xx", "a b"] {
            assert!(validate_ifname(name).is_err(), "{name:?}");
        }
        validate_ifname("eth0").unwrap();
        validate_ifname("fifteen-chars-x").unwrap();
    }

    #[test]
    fn environment_parses_and_reports_what_is_missing() {
        let e = env(&[]).unwrap_err();
        assert!(e.msg.contains("CNI_COMMAND"));
        let e = env(&[("CNI_COMMAND", "FROB")]).unwrap_err();
        assert!(e.msg.contains("FROB"));
        let ok = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", ""),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ])
        .unwrap();
        assert_eq!(ok.command, Command::Del);
        assert_eq!(ok.netns, None);
        assert_eq!(ok.path.len(), 2);
        let e = ok.require_netns().unwrap_err();
        assert!(e.msg.contains("CNI_NETNS"));
    }

    #[test]
    fn mac_formatting_round_trips() {
        let mac = parse_mac("0A-58-0a-f4-01-09").unwrap();
        assert_eq!(format_mac(&mac), "0a:58:0a:f4:01:09");
        assert_eq!(parse_mac("0a:58:0a:f4:01"), None);
        assert_eq!(parse_mac("0a:58:0a:f4:01:09:00"), None);
    }
}
