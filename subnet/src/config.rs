//! The network config JSON stored at `<prefix>/config`, read, defaulted and
//! validated the way flannel's `CheckNetworkConfig` does it.
//!
//! Fields are read through [`GoObject`], so keys match case-insensitively,
//! unknown keys are ignored and the last duplicate wins, as with Go.
//!
//! Deliberate differences from flannel:
//! - a missing, `null` or empty `Backend` selects vxlan (flannel's code picks
//!   udp, its docs say vxlan); [`BackendConfig::defaulted`] tells the caller so
//!   it can log the choice;
//! - `SubnetMin` greater than `SubnetMax` is rejected instead of only showing
//!   up later as "out of subnets";
//! - at least one of `EnableIPv4` / `EnableIPv6` must be true.
//!
//! Every error names the offending field and value next to flannel's wording.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnetwork::{IpNetworkError, Ipv4Network, Ipv6Network};

use crate::json::{FieldError, GoObject};

/// IPv4 part of the config after defaulting and validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4Settings {
    /// `Network`, with host bits masked off.
    pub network: Ipv4Network,
    /// `SubnetLen`: prefix length of each host's subnet.
    pub subnet_len: u8,
    /// `SubnetMin`: first allocatable subnet address.
    pub subnet_min: Ipv4Addr,
    /// `SubnetMax`: last allocatable subnet address (inclusive).
    pub subnet_max: Ipv4Addr,
}

/// IPv6 part of the config after defaulting and validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6Settings {
    /// `IPv6Network`, with host bits masked off.
    pub network: Ipv6Network,
    /// `IPv6SubnetLen`: prefix length of each host's subnet.
    pub subnet_len: u8,
    /// `IPv6SubnetMin`: first allocatable subnet address.
    pub subnet_min: Ipv6Addr,
    /// `IPv6SubnetMax`: last allocatable subnet address (inclusive).
    pub subnet_max: Ipv6Addr,
}

/// The backend types flannel registers, named by `Backend.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// `vxlan`
    Vxlan,
    /// `host-gw`
    HostGw,
    /// `udp`
    Udp,
    /// `ipip`
    IpIp,
    /// `wireguard`
    WireGuard,
    /// `ipsec`
    IpSec,
    /// `alloc`
    Alloc,
    /// `extension`
    Extension,
    /// `tencent-vpc`
    TencentVpc,
}

impl BackendKind {
    /// Every backend kind, in the order error messages list them.
    pub const ALL: [BackendKind; 9] = [
        Self::Vxlan,
        Self::HostGw,
        Self::Udp,
        Self::IpIp,
        Self::WireGuard,
        Self::IpSec,
        Self::Alloc,
        Self::Extension,
        Self::TencentVpc,
    ];

    /// flannel's name for the backend (`host-gw`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vxlan => "vxlan",
            Self::HostGw => "host-gw",
            Self::Udp => "udp",
            Self::IpIp => "ipip",
            Self::WireGuard => "wireguard",
            Self::IpSec => "ipsec",
            Self::Alloc => "alloc",
            Self::Extension => "extension",
            Self::TencentVpc => "tencent-vpc",
        }
    }

    /// Looks a backend up by name after lower-casing it, like flannel
    /// (`"VXLAN"` is vxlan).
    pub fn from_name(name: &str) -> Option<Self> {
        let name = name.to_lowercase();
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = ConfigError;

    fn from_str(name: &str) -> Result<Self, ConfigError> {
        Self::from_name(name).ok_or_else(|| ConfigError::UnknownBackend {
            name: name.to_owned(),
        })
    }
}

/// The config's `Backend` object.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// The backend selected by `Backend.Type`.
    pub kind: BackendKind,
    /// Every key of the `Backend` object (including `Type`), for the backend
    /// to read its own options (`VNI`, `Port`, ...).
    pub options: GoObject,
    /// True when the config had no `Backend` (absent, `null` or `{}`) and
    /// vxlan was chosen for it.
    pub defaulted: bool,
}

impl BackendConfig {
    fn read(config: &GoObject) -> Result<Self, ConfigError> {
        let options = config
            .get::<GoObject>("Backend", "a JSON object")?
            .filter(|options| !options.is_empty());
        let Some(options) = options else {
            return Ok(Self {
                kind: BackendKind::Vxlan,
                options: GoObject::default(),
                defaulted: true,
            });
        };
        // A Backend object without Type gives Go the empty string, which no
        // backend is registered under.
        let name = options
            .get::<String>("Type", "a string")
            .map_err(|err| FieldError {
                field: format!("Backend.{}", err.field),
                ..err
            })?
            .unwrap_or_default();
        Ok(Self {
            kind: name.parse()?,
            options,
            defaulted: false,
        })
    }
}

/// The validated network config.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// IPv4 settings; `Some` iff `EnableIPv4` (default true).
    pub ipv4: Option<Ipv4Settings>,
    /// IPv6 settings; `Some` iff `EnableIPv6` (default false).
    pub ipv6: Option<Ipv6Settings>,
    /// `EnableNFTables` (default false): nftables instead of iptables.
    pub enable_nftables: bool,
    /// The `Backend` object.
    pub backend: BackendConfig,
}

impl NetworkConfig {
    /// Parses and validates the JSON text of `<prefix>/config` (flannel's
    /// `CheckNetworkConfig`), filling in the derived defaults.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config = GoObject::parse(text).map_err(|err| ConfigError::Json(err.to_string()))?;
        // Like Go's decoder, reject any malformed field before validating, even
        // one that belongs to a disabled address family.
        let flag =
            |name, default| Ok::<_, FieldError>(config.get(name, "a boolean")?.unwrap_or(default));
        let enable_ipv4 = flag("EnableIPv4", true)?;
        let enable_ipv6 = flag("EnableIPv6", false)?;
        let enable_nftables = flag("EnableNFTables", false)?;
        let ipv4 = Input::<Ipv4Addr>::read(&config)?;
        let ipv6 = Input::<Ipv6Addr>::read(&config)?;
        let backend = BackendConfig::read(&config)?;

        if !enable_ipv4 && !enable_ipv6 {
            return Err(ConfigError::NoFamilyEnabled);
        }
        Ok(Self {
            ipv4: enable_ipv4
                .then(|| ipv4.check())
                .transpose()?
                .map(Ipv4Settings::from),
            ipv6: enable_ipv6
                .then(|| ipv6.check())
                .transpose()?
                .map(Ipv6Settings::from),
            enable_nftables,
            backend,
        })
    }

    /// The IPv4 network, `None` when IPv4 is disabled.
    pub fn network(&self) -> Option<Ipv4Network> {
        self.ipv4.as_ref().map(|settings| settings.network)
    }
}

/// Why a network config was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The text is not a JSON object.
    #[error("the network config is not valid JSON: {0}")]
    Json(String),
    /// A field holds a value of the wrong JSON type.
    #[error("invalid network config: {0}")]
    Field(#[from] FieldError),
    /// `Network` / `IPv6Network` is missing or empty for an enabled family.
    #[error(
        "please define a correct {field} parameter in the flannel config ({field} is missing or empty)"
    )]
    MissingNetwork {
        /// `Network` or `IPv6Network`.
        field: &'static str,
    },
    /// `Network` / `IPv6Network` is not a CIDR.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidCidr {
        /// `Network` or `IPv6Network`.
        field: &'static str,
        /// The text found.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `Network` holds an IPv6 CIDR or `IPv6Network` an IPv4 one.
    #[error("{field} must be an {family} network ({field}={value})")]
    WrongFamily {
        /// `Network` or `IPv6Network`.
        field: &'static str,
        /// The text found.
        value: String,
        /// `IPv4` or `IPv6`.
        family: &'static str,
    },
    /// A `SubnetMin` / `SubnetMax` (or IPv6 one) that is not an address.
    #[error("invalid {field} {value:?}: not an {family} address")]
    InvalidAddress {
        /// The field name.
        field: &'static str,
        /// The text found.
        value: String,
        /// `IPv4` or `IPv6`.
        family: &'static str,
    },
    /// The subnet length leaves fewer than four addresses per subnet.
    #[error("SubnetLen must be less than /{limit} ({field}={len})")]
    SubnetLenTooLarge {
        /// `SubnetLen` or `IPv6SubnetLen`.
        field: &'static str,
        /// The length given.
        len: u64,
        /// The first length refused (31 or 127).
        limit: u8,
    },
    /// The subnet length leaves the network fewer than four subnets.
    #[error(
        "network must be able to accommodate at least four subnets ({field}={len}, {network_field}={network})"
    )]
    TooFewSubnets {
        /// `SubnetLen` or `IPv6SubnetLen`.
        field: &'static str,
        /// The length given.
        len: u64,
        /// `Network` or `IPv6Network`.
        network_field: &'static str,
        /// The network, masked.
        network: String,
    },
    /// No subnet length was given and the network is too small to derive one.
    #[error(
        "{subject} is too small. Minimum useful network prefix is /{min_prefix} ({field}={network})"
    )]
    NetworkTooSmall {
        /// How flannel's message names the network (`network`, `IPv6Network`).
        subject: &'static str,
        /// `Network` or `IPv6Network`.
        field: &'static str,
        /// The network, masked.
        network: String,
        /// The longest prefix accepted (28 or 124).
        min_prefix: u8,
    },
    /// A range bound outside the network.
    #[error(
        "{field} is not in the range of the {network_field} ({field}={value}, {network_field}={network})"
    )]
    OutOfRange {
        /// `SubnetMin`, `SubnetMax` or an IPv6 one.
        field: &'static str,
        /// The address given.
        value: String,
        /// `Network` or `IPv6Network`.
        network_field: &'static str,
        /// The network, masked.
        network: String,
    },
    /// A range bound that is not the start of a subnet.
    #[error("{field} is not on a SubnetLen boundary: {value} ({len_field}={len})")]
    Misaligned {
        /// `SubnetMin`, `SubnetMax` or an IPv6 one.
        field: &'static str,
        /// The address given.
        value: String,
        /// `SubnetLen` or `IPv6SubnetLen`.
        len_field: &'static str,
        /// The subnet length in effect.
        len: u8,
    },
    /// The range is inverted (ours: flannel does not check this).
    #[error(
        "{min_field} must not be greater than {max_field} ({min_field}={min}, {max_field}={max})"
    )]
    InvertedRange {
        /// `SubnetMin` or `IPv6SubnetMin`.
        min_field: &'static str,
        /// Its value, given or derived.
        min: String,
        /// `SubnetMax` or `IPv6SubnetMax`.
        max_field: &'static str,
        /// Its value, given or derived.
        max: String,
    },
    /// Both address families are disabled.
    #[error(
        "at least one of EnableIPv4 and EnableIPv6 must be true (EnableIPv4=false, EnableIPv6=false)"
    )]
    NoFamilyEnabled,
    /// `Backend.Type` names no known backend.
    #[error(
        "unknown backend type {name:?} in Backend.Type (valid types: {})",
        valid_backend_names()
    )]
    UnknownBackend {
        /// The type as given.
        name: String,
    },
}

fn valid_backend_names() -> String {
    let names: Vec<_> = BackendKind::ALL.iter().map(|kind| kind.as_str()).collect();
    names.join(", ")
}

/// Field names and limits of one address family.
struct Rules {
    family: &'static str,
    bits: u32,
    network: &'static str,
    subnet_len: &'static str,
    subnet_min: &'static str,
    subnet_max: &'static str,
    /// What flannel's "is too small" message calls the network.
    too_small_subject: &'static str,
    /// The longest subnet length: a subnet needs at least four addresses.
    max_len: u8,
    /// The longest network prefix for which a length can be derived.
    max_prefix: u8,
    /// The derived subnet length for networks large enough.
    default_len: u8,
}

/// An address family, with addresses handled as `u128` so that one algorithm
/// serves both (IPv4 uses the low 32 bits).
trait Family: Copy + fmt::Display + FromStr {
    type Network: Copy + fmt::Display;
    const RULES: Rules;
    fn to_u128(self) -> u128;
    fn from_u128(bits: u128) -> Self;
    fn network(base: Self, prefix: u8) -> Result<Self::Network, IpNetworkError>;
}

impl Family for Ipv4Addr {
    type Network = Ipv4Network;
    const RULES: Rules = Rules {
        family: "IPv4",
        bits: 32,
        network: "Network",
        subnet_len: "SubnetLen",
        subnet_min: "SubnetMin",
        subnet_max: "SubnetMax",
        too_small_subject: "network",
        max_len: 30,
        max_prefix: 28,
        default_len: 24,
    };

    fn to_u128(self) -> u128 {
        u128::from(u32::from(self))
    }

    fn from_u128(bits: u128) -> Self {
        let [.., a, b, c, d] = bits.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    }

    fn network(base: Self, prefix: u8) -> Result<Ipv4Network, IpNetworkError> {
        Ipv4Network::new(base, prefix)
    }
}

impl Family for Ipv6Addr {
    type Network = Ipv6Network;
    const RULES: Rules = Rules {
        family: "IPv6",
        bits: 128,
        network: "IPv6Network",
        subnet_len: "IPv6SubnetLen",
        subnet_min: "IPv6SubnetMin",
        subnet_max: "IPv6SubnetMax",
        too_small_subject: "IPv6Network",
        max_len: 126,
        max_prefix: 124,
        default_len: 64,
    };

    fn to_u128(self) -> u128 {
        u128::from(self)
    }

    fn from_u128(bits: u128) -> Self {
        Ipv6Addr::from(bits)
    }

    fn network(base: Self, prefix: u8) -> Result<Ipv6Network, IpNetworkError> {
        Ipv6Network::new(base, prefix)
    }
}

/// The host bits of a `/len` in a family of `bits` bits (`len` <= `bits`).
fn host_mask(bits: u32, len: u8) -> u128 {
    (u128::MAX >> (128 - bits))
        .checked_shr(u32::from(len))
        .unwrap_or(0)
}

/// A network as parsed: the ipnetwork value plus its base and prefix.
struct Net<A: Family> {
    network: A::Network,
    base: u128,
    prefix: u8,
}

/// One family's fields as read from the JSON, before validation.
struct Input<A: Family> {
    network: Option<Net<A>>,
    /// `None` when absent or 0 (Go's zero value).
    len: Option<u64>,
    /// `None` when absent or the all-zero address (Go's zero value).
    min: Option<A>,
    max: Option<A>,
}

/// One family's validated values.
struct Checked<A: Family> {
    network: A::Network,
    len: u8,
    min: A,
    max: A,
}

impl From<Checked<Ipv4Addr>> for Ipv4Settings {
    fn from(checked: Checked<Ipv4Addr>) -> Self {
        Self {
            network: checked.network,
            subnet_len: checked.len,
            subnet_min: checked.min,
            subnet_max: checked.max,
        }
    }
}

impl From<Checked<Ipv6Addr>> for Ipv6Settings {
    fn from(checked: Checked<Ipv6Addr>) -> Self {
        Self {
            network: checked.network,
            subnet_len: checked.len,
            subnet_min: checked.min,
            subnet_max: checked.max,
        }
    }
}

impl<A: Family> Input<A> {
    fn read(config: &GoObject) -> Result<Self, ConfigError> {
        let rules = &A::RULES;
        let network = config
            .get::<String>(rules.network, "a CIDR string")?
            .filter(|text| !text.is_empty())
            .map(|text| parse_cidr::<A>(rules.network, &text))
            .transpose()?;
        let len = config
            .get::<u64>(rules.subnet_len, "a non-negative integer")?
            .filter(|len| *len != 0);
        Ok(Self {
            network,
            len,
            min: read_addr(config, rules.subnet_min)?,
            max: read_addr(config, rules.subnet_max)?,
        })
    }

    /// Applies flannel's defaults and checks, in flannel's order.
    fn check(self) -> Result<Checked<A>, ConfigError> {
        let rules = &A::RULES;
        let net = self.network.ok_or(ConfigError::MissingNetwork {
            field: rules.network,
        })?;
        let len = subnet_len(&net, self.len)?;
        // len >= prefix + 2 >= 2, so the size is at most 2^126: no overflow, and
        // OR-ing it into the prefix-aligned base is the same as adding it.
        let size = host_mask(rules.bits, len) + 1;
        let min = match self.min {
            // The first subnet is skipped so no host gets the network's base.
            None => net.base | size,
            Some(addr) => in_range(&net, rules.subnet_min, addr)?,
        };
        let max = match self.max {
            None => net.base | (host_mask(rules.bits, net.prefix) & !(size - 1)),
            Some(addr) => in_range(&net, rules.subnet_max, addr)?,
        };
        aligned::<A>(rules.subnet_min, min, len)?;
        aligned::<A>(rules.subnet_max, max, len)?;
        if min > max {
            return Err(ConfigError::InvertedRange {
                min_field: rules.subnet_min,
                min: A::from_u128(min).to_string(),
                max_field: rules.subnet_max,
                max: A::from_u128(max).to_string(),
            });
        }
        Ok(Checked {
            network: net.network,
            len,
            min: A::from_u128(min),
            max: A::from_u128(max),
        })
    }
}

/// The subnet length: the given one checked, or flannel's derived default.
fn subnet_len<A: Family>(net: &Net<A>, given: Option<u64>) -> Result<u8, ConfigError> {
    let rules = &A::RULES;
    let Some(given) = given else {
        if net.prefix > rules.max_prefix {
            return Err(ConfigError::NetworkTooSmall {
                subject: rules.too_small_subject,
                field: rules.network,
                network: net.network.to_string(),
                min_prefix: rules.max_prefix,
            });
        }
        // flannel: the default length up to a prefix two shorter than it,
        // else prefix + 2 (four subnets). That is the larger of the two.
        return Ok(rules.default_len.max(net.prefix + 2));
    };
    let len = u8::try_from(given)
        .ok()
        .filter(|len| *len <= rules.max_len)
        .ok_or(ConfigError::SubnetLenTooLarge {
            field: rules.subnet_len,
            len: given,
            limit: rules.max_len + 1,
        })?;
    if u16::from(len) < u16::from(net.prefix) + 2 {
        return Err(ConfigError::TooFewSubnets {
            field: rules.subnet_len,
            len: given,
            network_field: rules.network,
            network: net.network.to_string(),
        });
    }
    Ok(len)
}

/// `addr` as `u128` if it lies in `net`, else the out-of-range error.
fn in_range<A: Family>(net: &Net<A>, field: &'static str, addr: A) -> Result<u128, ConfigError> {
    let bits = addr.to_u128();
    if bits & !host_mask(A::RULES.bits, net.prefix) == net.base {
        return Ok(bits);
    }
    Err(ConfigError::OutOfRange {
        field,
        value: addr.to_string(),
        network_field: A::RULES.network,
        network: net.network.to_string(),
    })
}

fn aligned<A: Family>(field: &'static str, addr: u128, len: u8) -> Result<(), ConfigError> {
    if addr & host_mask(A::RULES.bits, len) == 0 {
        return Ok(());
    }
    Err(ConfigError::Misaligned {
        field,
        value: A::from_u128(addr).to_string(),
        len_field: A::RULES.subnet_len,
        len,
    })
}

/// Parses a CIDR the way Go's `net.ParseCIDR` does (an explicit decimal
/// prefix is required) and masks off the host bits.
fn parse_cidr<A: Family>(field: &'static str, text: &str) -> Result<Net<A>, ConfigError> {
    let rules = &A::RULES;
    let invalid = |reason| ConfigError::InvalidCidr {
        field,
        value: text.to_owned(),
        reason,
    };
    let (addr, prefix) = text
        .split_once('/')
        .ok_or_else(|| invalid("a CIDR needs a /prefix length"))?;
    let addr: A = match addr.parse() {
        Ok(addr) => addr,
        // A valid address of the other family deserves a clearer message.
        Err(_) if addr.parse::<IpAddr>().is_ok() => {
            return Err(ConfigError::WrongFamily {
                field,
                value: text.to_owned(),
                family: rules.family,
            });
        }
        Err(_) => return Err(invalid("not an IP address")),
    };
    // Go accepts leading zeros but no sign; Rust's parser would take a '+'.
    let prefix = Some(prefix)
        .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|digits| digits.parse::<u8>().ok())
        .filter(|prefix| u32::from(*prefix) <= rules.bits)
        .ok_or_else(|| invalid("bad prefix length"))?;
    let base = addr.to_u128() & !host_mask(rules.bits, prefix);
    let network =
        A::network(A::from_u128(base), prefix).map_err(|_| invalid("bad prefix length"))?;
    Ok(Net {
        network,
        base,
        prefix,
    })
}

/// Reads an address field; the all-zero address counts as unset, as it is
/// Go's zero value.
fn read_addr<A: Family>(config: &GoObject, field: &'static str) -> Result<Option<A>, ConfigError> {
    let Some(text) = config.get::<String>(field, "an address string")? else {
        return Ok(None);
    };
    let addr: A = text.parse().map_err(|_| ConfigError::InvalidAddress {
        field,
        value: text.clone(),
        family: A::RULES.family,
    })?;
    Ok((addr.to_u128() != 0).then_some(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(text: &str) -> Ipv4Settings {
        NetworkConfig::parse(text).unwrap().ipv4.unwrap()
    }

    fn addr4(text: &str) -> Ipv4Addr {
        text.parse().unwrap()
    }

    #[test]
    fn defaults_for_a_16() {
        let settings = v4(r#"{"Network":"10.244.0.0/16"}"#);
        assert_eq!(settings.network, "10.244.0.0/16".parse().unwrap());
        assert_eq!(settings.subnet_len, 24);
        assert_eq!(settings.subnet_min, addr4("10.244.1.0"));
        assert_eq!(settings.subnet_max, addr4("10.244.255.0"));
    }

    #[test]
    fn defaults_for_small_networks() {
        let settings = v4(r#"{"Network":"10.0.0.0/26"}"#);
        assert_eq!(settings.subnet_len, 28);
        assert_eq!(settings.subnet_min, addr4("10.0.0.16"));
        assert_eq!(settings.subnet_max, addr4("10.0.0.48"));
        assert_eq!(v4(r#"{"Network":"10.0.0.0/22"}"#).subnet_len, 24);
        assert_eq!(v4(r#"{"Network":"10.0.0.0/23"}"#).subnet_len, 25);
        assert_eq!(v4(r#"{"Network":"10.0.0.0/28"}"#).subnet_len, 30);
    }

    #[test]
    fn whole_address_space_does_not_overflow() {
        let settings = v4(r#"{"Network":"0.0.0.0/0"}"#);
        assert_eq!(settings.subnet_min, addr4("0.0.1.0"));
        assert_eq!(settings.subnet_max, addr4("255.255.255.0"));
        let config =
            NetworkConfig::parse(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"::/0"}"#)
                .unwrap();
        let settings = config.ipv6.unwrap();
        assert_eq!(settings.subnet_len, 64);
        assert_eq!(
            settings.subnet_min,
            "0:0:0:1::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            settings.subnet_max,
            "ffff:ffff:ffff:ffff::".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn host_bits_are_masked() {
        let settings = v4(r#"{"Network":"10.1.2.3/16"}"#);
        assert_eq!(settings.network.to_string(), "10.1.0.0/16");
        assert_eq!(settings.subnet_min, addr4("10.1.1.0"));
    }

    #[test]
    fn keys_are_case_insensitive() {
        let config = NetworkConfig::parse(
            r#"{"network":"10.5.0.0/16","SUBNETLEN":20,"backend":{"type":"host-gw"},"enablenftables":true}"#,
        )
        .unwrap();
        assert_eq!(config.network(), Some("10.5.0.0/16".parse().unwrap()));
        assert_eq!(config.ipv4.unwrap().subnet_len, 20);
        assert_eq!(config.backend.kind, BackendKind::HostGw);
        assert!(config.enable_nftables);
    }

    #[test]
    fn flannel_doc_example() {
        let config = NetworkConfig::parse(
            r#"{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.10.0.0","SubnetMax":"10.99.0.0","Backend":{"Type":"udp","Port":7890}}"#,
        )
        .unwrap();
        let settings = config.ipv4.as_ref().unwrap();
        assert_eq!(settings.subnet_len, 20);
        assert_eq!(settings.subnet_min, addr4("10.10.0.0"));
        assert_eq!(settings.subnet_max, addr4("10.99.0.0"));
        assert!(config.ipv6.is_none());
        assert!(!config.enable_nftables);
        assert_eq!(config.backend.kind, BackendKind::Udp);
        assert!(!config.backend.defaulted);
        assert_eq!(
            config.backend.options.get::<u16>("Port", "a port").unwrap(),
            Some(7890)
        );
    }

    #[test]
    fn backend_type_is_lower_cased() {
        let config =
            NetworkConfig::parse(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"VXLAN","VNI":4}}"#)
                .unwrap();
        assert_eq!(config.backend.kind, BackendKind::Vxlan);
        assert!(!config.backend.defaulted);
    }

    #[test]
    fn missing_null_or_empty_backend_defaults_to_vxlan() {
        for backend in ["", r#","Backend":null"#, r#","Backend":{}"#] {
            let text = format!(r#"{{"Network":"10.0.0.0/8"{backend}}}"#);
            let config = NetworkConfig::parse(&text).unwrap();
            assert_eq!(config.backend.kind, BackendKind::Vxlan, "{text}");
            assert!(config.backend.defaulted, "{text}");
        }
    }

    #[test]
    fn backend_names_round_trip() {
        for kind in BackendKind::ALL {
            assert_eq!(kind.to_string().parse::<BackendKind>(), Ok(kind));
        }
        assert_eq!(BackendKind::from_name("Host-GW"), Some(BackendKind::HostGw));
        assert!(BackendKind::from_name("gre").is_none());
    }

    #[test]
    fn unknown_keys_ignored_and_last_duplicate_wins() {
        let settings = v4(r#"{"Network":"10.0.0.0/8","Network":"10.7.0.0/16","Foo":[1]}"#);
        assert_eq!(settings.network.to_string(), "10.7.0.0/16");
    }

    #[test]
    fn dual_stack() {
        let config = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:cafe:42::/56"}"#,
        )
        .unwrap();
        assert_eq!(config.ipv4.unwrap().subnet_len, 24);
        let v6 = config.ipv6.unwrap();
        assert_eq!(v6.network.to_string(), "2001:cafe:42::/56");
        assert_eq!(v6.subnet_len, 64);
        assert_eq!(
            v6.subnet_min,
            "2001:cafe:42:1::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            v6.subnet_max,
            "2001:cafe:42:ff::".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn ipv6_only_ignores_network() {
        let config = NetworkConfig::parse(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/120"}"#,
        )
        .unwrap();
        assert!(config.ipv4.is_none());
        assert!(config.network().is_none());
        let v6 = config.ipv6.unwrap();
        assert_eq!(v6.subnet_len, 122);
        assert_eq!(v6.subnet_min, "fd00::40".parse::<Ipv6Addr>().unwrap());
        assert_eq!(v6.subnet_max, "fd00::c0".parse::<Ipv6Addr>().unwrap());
    }

    /// Every rejection: the config and the substrings its message must hold
    /// (flannel's wording, then the offending field and value).
    const INVALID: &[(&str, &[&str])] = &[
        (
            "{}",
            &["please define a correct Network parameter in the flannel config"],
        ),
        (
            r#"{"Network":""}"#,
            &["please define a correct Network parameter in the flannel config"],
        ),
        (r#"{"Network":"10.0.0.0"}"#, &["Network", r#""10.0.0.0""#]),
        (
            r#"{"Network":"10.0.0.0/33"}"#,
            &["Network", r#""10.0.0.0/33""#],
        ),
        (
            r#"{"Network":"10.0.0.0/+8"}"#,
            &["Network", r#""10.0.0.0/+8""#],
        ),
        (r#"{"Network":"10.0.0/8"}"#, &["Network", r#""10.0.0/8""#]),
        (r#"{"Network":10}"#, &["Network", "10"]),
        (
            r#"{"Network":"fd00::/64"}"#,
            &["Network must be an IPv4 network", "fd00::/64"],
        ),
        (
            r#"{"Network":"10.0.0.0/8","SubnetLen":31}"#,
            &["SubnetLen must be less than /31", "SubnetLen=31"],
        ),
        (
            r#"{"Network":"10.0.0.0/8","SubnetLen":300}"#,
            &["SubnetLen must be less than /31", "SubnetLen=300"],
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetLen":17}"#,
            &[
                "network must be able to accommodate at least four subnets",
                "SubnetLen=17",
                "Network=10.244.0.0/16",
            ],
        ),
        (
            r#"{"Network":"10.0.0.0/29"}"#,
            &[
                "network is too small. Minimum useful network prefix is /28",
                "Network=10.0.0.0/29",
            ],
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.9.0.0"}"#,
            &[
                "SubnetMin is not in the range of the Network",
                "SubnetMin=10.9.0.0",
                "Network=10.244.0.0/16",
            ],
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetMax":"10.245.0.0"}"#,
            &[
                "SubnetMax is not in the range of the Network",
                "SubnetMax=10.245.0.0",
            ],
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.5"}"#,
            &[
                "SubnetMin is not on a SubnetLen boundary: 10.244.1.5",
                "SubnetLen=24",
            ],
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.9.128"}"#,
            &["SubnetMax is not on a SubnetLen boundary: 10.244.9.128"],
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.9.0","SubnetMax":"10.244.3.0"}"#,
            &[
                "SubnetMin must not be greater than SubnetMax",
                "SubnetMin=10.244.9.0",
                "SubnetMax=10.244.3.0",
            ],
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1"}"#,
            &["SubnetMin", r#""10.244.1""#, "IPv4 address"],
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetMax":""}"#,
            &["SubnetMax", r#""""#],
        ),
        (
            r#"{"Network":"10.0.0.0/8","SubnetLen":"24"}"#,
            &["SubnetLen", r#""24""#, "integer"],
        ),
        (
            r#"{"Network":"10.0.0.0/8","SubnetLen":24.5}"#,
            &["SubnetLen", "24.5"],
        ),
        (
            r#"{"Network":"10.0.0.0/8","SubnetLen":-1}"#,
            &["SubnetLen", "-1"],
        ),
        (
            r#"{"Network":"10.0.0.0/8","EnableIPv4":"true"}"#,
            &["EnableIPv4", r#""true""#, "boolean"],
        ),
        (
            r#"{"Network":"10.0.0.0/8","Backend":"vxlan"}"#,
            &["Backend", r#""vxlan""#, "object"],
        ),
        (
            r#"{"Network":"10.0.0.0/8","Backend":{"Port":8285}}"#,
            &[r#"unknown backend type """#, "Backend.Type"],
        ),
        (
            r#"{"Network":"10.0.0.0/8","Backend":{"Type":""}}"#,
            &[r#"unknown backend type """#, "Backend.Type"],
        ),
        (
            r#"{"Network":"10.0.0.0/8","Backend":{"Type":"foo"}}"#,
            &[
                r#"unknown backend type "foo""#,
                "Backend.Type",
                "vxlan, host-gw",
            ],
        ),
        (
            r#"{"Network":"10.0.0.0/8","Backend":{"Type":5}}"#,
            &["Backend.Type", "5", "string"],
        ),
        (
            r#"{"Network":"10.0.0.0/8","EnableIPv6":true}"#,
            &["please define a correct IPv6Network parameter in the flannel config"],
        ),
        (
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"10.0.0.0/8"}"#,
            &["IPv6Network must be an IPv6 network", "10.0.0.0/8"],
        ),
        (
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/125"}"#,
            &[
                "IPv6Network is too small. Minimum useful network prefix is /124",
                "IPv6Network=fd00::/125",
            ],
        ),
        (
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/64","IPv6SubnetLen":127}"#,
            &["SubnetLen must be less than /127", "IPv6SubnetLen=127"],
        ),
        (
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/64","IPv6SubnetLen":65}"#,
            &[
                "network must be able to accommodate at least four subnets",
                "IPv6SubnetLen=65",
            ],
        ),
        (
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetMin":"fd01::"}"#,
            &[
                "IPv6SubnetMin is not in the range of the IPv6Network",
                "IPv6SubnetMin=fd01::",
                "IPv6Network=fd00::/56",
            ],
        ),
        (
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetMax":"fd00:0:0:5::1"}"#,
            &["IPv6SubnetMax is not on a SubnetLen boundary: fd00:0:0:5::1"],
        ),
        (
            r#"{"Network":"10.0.0.0/8","EnableIPv4":false}"#,
            &["at least one of EnableIPv4 and EnableIPv6 must be true"],
        ),
        (r#"{"Network":"10.0.0.0/8""#, &["not valid JSON", "EOF"]),
        (r#"["Network"]"#, &["not valid JSON", "JSON object"]),
        ("", &["not valid JSON"]),
    ];

    #[test]
    fn invalid_configs_are_rejected_with_field_and_value() {
        for (text, expected) in INVALID {
            let err = match NetworkConfig::parse(text) {
                Ok(config) => panic!("{text} was accepted: {config:?}"),
                Err(err) => err.to_string(),
            };
            for part in *expected {
                assert!(err.contains(part), "{text}: {err:?} lacks {part:?}");
            }
        }
    }
}
