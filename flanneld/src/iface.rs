//! Choosing the external interface and the public IP, as flannel does.
//!
//! Order: `--iface` (names or IPs, first match wins), else `--iface-regex`
//! (tried against interface IPs, then names), else the interface holding
//! `--public-ip`, else the interface of the default route. The interface's
//! first IPv4 address is its address; `--public-ip` overrides what is
//! published. An explicit selector that matches nothing is an error.

use std::net::Ipv4Addr;

use backends::Underlay;
use backends::vxlan::netlink::{LinkInfo, Netlink};
use ipnetwork::Ipv4Network;
use regex::Regex;

/// Why no interface could be chosen.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IfaceError {
    /// Reading links or addresses failed.
    #[error("cannot list interfaces: {0}")]
    Netlink(String),
    /// No interface matched the selector.
    #[error("no interface matches {selector}")]
    NoMatch {
        /// The selector, as the user gave it.
        selector: String,
    },
    /// The chosen interface has no IPv4 address.
    #[error("interface {name} has no IPv4 address")]
    NoAddress {
        /// The interface.
        name: String,
    },
    /// The chosen interface reports MTU 0.
    #[error("interface {name} has MTU 0")]
    NoMtu {
        /// The interface.
        name: String,
    },
}

/// What the selection needs from the flags.
#[derive(Debug, Clone, Default)]
pub(crate) struct Selector {
    /// `--iface` values.
    pub(crate) ifaces: Vec<String>,
    /// `--iface-regex` values.
    pub(crate) regexes: Vec<String>,
    /// `--public-ip`.
    pub(crate) public_ip: Option<Ipv4Addr>,
}

/// An interface and its IPv4 addresses, in the kernel's order.
#[derive(Debug, Clone)]
struct Candidate {
    link: LinkInfo,
    addresses: Vec<Ipv4Network>,
}

/// Picks the external interface and the public IP.
pub(crate) async fn select(netlink: &Netlink, selector: &Selector) -> Result<Underlay, IfaceError> {
    let links = netlink
        .links()
        .await
        .map_err(|e| IfaceError::Netlink(e.to_string()))?;
    let addresses = netlink
        .ipv4_addresses()
        .await
        .map_err(|e| IfaceError::Netlink(e.to_string()))?;
    let candidates: Vec<Candidate> = links
        .into_iter()
        .map(|link| Candidate {
            addresses: addresses
                .iter()
                .filter(|(index, _)| *index == link.index)
                .map(|(_, net)| *net)
                .collect(),
            link,
        })
        .collect();
    let default_index = netlink
        .default_route_interface()
        .await
        .map_err(|e| IfaceError::Netlink(e.to_string()))?;
    let chosen = choose(&candidates, selector, default_index)?;
    underlay(chosen, selector.public_ip)
}

/// The pure part of [`select`].
fn choose<'a>(
    candidates: &'a [Candidate],
    selector: &Selector,
    default_index: Option<u32>,
) -> Result<&'a Candidate, IfaceError> {
    if !selector.ifaces.is_empty() {
        return selector
            .ifaces
            .iter()
            .find_map(|wanted| match wanted.parse::<Ipv4Addr>() {
                Ok(ip) => candidates
                    .iter()
                    .find(|c| c.addresses.iter().any(|a| a.ip() == ip)),
                Err(_) => candidates.iter().find(|c| c.link.name == *wanted),
            })
            .ok_or_else(|| IfaceError::NoMatch {
                selector: format!("--iface {}", selector.ifaces.join(",")),
            });
    }
    if !selector.regexes.is_empty() {
        for pattern in &selector.regexes {
            // Validated when the flags were parsed.
            let Ok(re) = Regex::new(pattern) else {
                continue;
            };
            let by_ip = candidates
                .iter()
                .find(|c| c.addresses.iter().any(|a| re.is_match(&a.ip().to_string())));
            if let Some(found) =
                by_ip.or_else(|| candidates.iter().find(|c| re.is_match(&c.link.name)))
            {
                return Ok(found);
            }
        }
        return Err(IfaceError::NoMatch {
            selector: format!("--iface-regex {}", selector.regexes.join(",")),
        });
    }
    if let Some(ip) = selector.public_ip {
        return candidates
            .iter()
            .find(|c| c.addresses.iter().any(|a| a.ip() == ip))
            .ok_or_else(|| IfaceError::NoMatch {
                selector: format!(
                    "--public-ip {ip} (as a local address; add --iface for a NAT address)"
                ),
            });
    }
    default_index
        .and_then(|index| candidates.iter().find(|c| c.link.index == index))
        .ok_or_else(|| IfaceError::NoMatch {
            selector: "the default route (no --iface given and no default route)".into(),
        })
}

fn underlay(chosen: &Candidate, public_ip: Option<Ipv4Addr>) -> Result<Underlay, IfaceError> {
    let name = chosen.link.name.clone();
    let address = chosen
        .addresses
        .first()
        .map(|a| a.ip())
        .ok_or_else(|| IfaceError::NoAddress { name: name.clone() })?;
    if chosen.link.mtu == 0 {
        return Err(IfaceError::NoMtu { name });
    }
    Ok(Underlay {
        index: chosen.link.index,
        name,
        mtu: chosen.link.mtu,
        public_ip: public_ip.unwrap_or(address),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(index: u32, name: &str, addrs: &[&str]) -> Candidate {
        Candidate {
            link: LinkInfo {
                index,
                name: name.into(),
                mtu: 1500,
                mac: None,
                up: true,
                kind: None,
            },
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    fn world() -> Vec<Candidate> {
        vec![
            candidate(1, "lo", &["127.0.0.1/8"]),
            candidate(2, "eth0", &["198.18.0.10/24"]),
            candidate(3, "eth1", &["198.19.0.10/24", "198.19.0.11/24"]),
        ]
    }

    fn pick(selector: Selector, default: Option<u32>) -> Result<String, IfaceError> {
        let all = world();
        choose(&all, &selector, default).map(|c| c.link.name.clone())
    }

    #[test]
    fn iface_by_name_or_ip_first_match_wins() {
        let s = |v: &[&str]| Selector {
            ifaces: v.iter().map(|x| x.to_string()).collect(),
            ..Selector::default()
        };
        assert_eq!(pick(s(&["eth1"]), Some(2)).unwrap(), "eth1");
        assert_eq!(pick(s(&["198.18.0.10"]), None).unwrap(), "eth0");
        assert_eq!(pick(s(&["nope", "eth1", "eth0"]), None).unwrap(), "eth1");
        let err = pick(s(&["nope"]), Some(2)).unwrap_err().to_string();
        assert!(err.contains("--iface nope"), "{err}");
    }

    #[test]
    fn regex_tries_ips_then_names() {
        let s = |v: &str| Selector {
            regexes: vec![v.into()],
            ..Selector::default()
        };
        assert_eq!(pick(s(r"^198\.19\."), None).unwrap(), "eth1");
        assert_eq!(pick(s("^eth0$"), None).unwrap(), "eth0");
        assert!(pick(s("^wlan"), None).is_err());
    }

    #[test]
    fn default_route_and_public_ip() {
        assert_eq!(pick(Selector::default(), Some(3)).unwrap(), "eth1");
        assert!(pick(Selector::default(), None).is_err());
        let by_ip = Selector {
            public_ip: Some("198.19.0.11".parse().unwrap()),
            ..Selector::default()
        };
        assert_eq!(pick(by_ip, Some(2)).unwrap(), "eth1");
    }

    #[test]
    fn public_ip_overrides_the_published_address() {
        let all = world();
        let u = underlay(&all[2], None).unwrap();
        assert_eq!(u.public_ip, "198.19.0.10".parse::<Ipv4Addr>().unwrap());
        let nat = underlay(&all[2], Some("198.19.255.7".parse().unwrap())).unwrap();
        assert_eq!(nat.public_ip, "198.19.255.7".parse::<Ipv4Addr>().unwrap());
        assert!(underlay(&candidate(9, "x", &[]), None).is_err());
    }
}
