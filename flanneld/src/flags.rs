//! flannel's command line, with the same names, defaults and environment
//! variables (`FLANNELD_<NAME>`; the command line wins).
//!
//! Go's `flag` package accepts `-name` as well as `--name`, and boolean flags
//! as `--x`, `--x=true` or `--x=false`; [`parse`] accepts the same.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

/// flanneld's flags.
#[derive(Parser, Clone)]
#[command(
    name = "flanneld",
    about = "flannel-compatible overlay network daemon",
    disable_version_flag = true
)]
pub(crate) struct Flags {
    /// Comma-separated etcd client URLs; requests fail over between them.
    #[arg(
        long,
        env = "FLANNELD_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    pub(crate) etcd_endpoints: Vec<String>,

    /// etcd prefix of the network config and leases.
    #[arg(
        long,
        env = "FLANNELD_ETCD_PREFIX",
        default_value = subnet::etcd::DEFAULT_PREFIX
    )]
    pub(crate) etcd_prefix: String,

    /// TLS client key for etcd.
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE", default_value = "")]
    pub(crate) etcd_keyfile: String,

    /// TLS client certificate for etcd.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE", default_value = "")]
    pub(crate) etcd_certfile: String,

    /// TLS CA bundle for etcd.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE", default_value = "")]
    pub(crate) etcd_cafile: String,

    /// etcd user name.
    #[arg(long, env = "FLANNELD_ETCD_USERNAME", default_value = "")]
    pub(crate) etcd_username: String,

    /// etcd password (never logged).
    #[arg(
        long,
        env = "FLANNELD_ETCD_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    pub(crate) etcd_password: String,

    /// Interface (name or IP) for inter-host traffic; repeatable, first match wins.
    #[arg(long, env = "FLANNELD_IFACE", value_delimiter = ',', action = ArgAction::Append)]
    pub(crate) iface: Vec<String>,

    /// Regex matched against interface IPs, then names; used if no --iface matched.
    #[arg(long, env = "FLANNELD_IFACE_REGEX", value_delimiter = ',', action = ArgAction::Append)]
    pub(crate) iface_regex: Vec<String>,

    /// IP published to peers (must be a local address unless combined with --iface).
    #[arg(long, env = "FLANNELD_PUBLIC_IP", default_value = "")]
    pub(crate) public_ip: String,

    /// Where to write the subnet file.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = subnet::subnet_env::DEFAULT_SUBNET_FILE
    )]
    pub(crate) subnet_file: PathBuf,

    /// Minutes before expiry to renew the lease (1..1439).
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60)]
    pub(crate) subnet_lease_renew_margin: u32,

    /// Lease lifetime in seconds (ours; flannel fixes it at 24 h). For tests.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_LEASE_TTL",
        default_value_t = 86_400,
        hide = true
    )]
    pub(crate) subnet_lease_ttl: u64,

    /// udp backend: packet worker threads (0: one per core, at most 8).
    /// Hidden: a tuning knob for benchmarks.
    #[arg(long, env = "FLANNELD_UDP_WORKERS", default_value_t = 0, hide = true)]
    pub(crate) udp_workers: usize,

    /// udp backend: packets per system call (1..=1024). Hidden: 1 gives the
    /// one-packet-per-syscall loop the benchmark compares against.
    #[arg(long, env = "FLANNELD_UDP_BATCH", default_value_t = 64, hide = true)]
    pub(crate) udp_batch: usize,

    /// udp backend: do not use TUN/UDP offloads (hidden; for benchmarks).
    #[arg(
        long,
        env = "FLANNELD_UDP_NO_OFFLOAD",
        default_value_t = false,
        hide = true
    )]
    pub(crate) udp_no_offload: bool,

    /// Install masquerade rules for traffic leaving the overlay.
    #[arg(long, env = "FLANNELD_IP_MASQ", num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = ArgAction::Set)]
    pub(crate) ip_masq: bool,

    /// Do not use --random-fully in masquerade rules.
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = ArgAction::Set)]
    pub(crate) ip_masq_fully_random_disable: bool,

    /// Seconds between checks that the iptables rules are still in place.
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5)]
    pub(crate) iptables_resync: u64,

    /// Install FORWARD accept rules for the flannel network.
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", num_args = 0..=1, default_missing_value = "true", default_value_t = true, action = ArgAction::Set)]
    pub(crate) iptables_forward_rules: bool,

    /// Address of the health server.
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub(crate) healthz_ip: IpAddr,

    /// Port of the health server (0 disables it).
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub(crate) healthz_port: u16,

    /// Log verbosity (0: info; 1 and more: debug; 5 and more: trace).
    #[arg(short = 'v', long = "v", env = "FLANNELD_V", default_value_t = 0)]
    pub(crate) verbosity: u8,

    /// Print the version and exit.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = ArgAction::Set)]
    pub(crate) version: bool,
}

impl std::fmt::Debug for Flags {
    // Hand-written: the password must never reach a log line (flannel prints it).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flags")
            .field("etcd_endpoints", &self.etcd_endpoints)
            .field("etcd_prefix", &self.etcd_prefix)
            .field("etcd_keyfile", &self.etcd_keyfile)
            .field("etcd_certfile", &self.etcd_certfile)
            .field("etcd_cafile", &self.etcd_cafile)
            .field("etcd_username", &self.etcd_username)
            .field(
                "etcd_password",
                &if self.etcd_password.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("iface", &self.iface)
            .field("iface_regex", &self.iface_regex)
            .field("public_ip", &self.public_ip)
            .field("subnet_file", &self.subnet_file)
            .field("subnet_lease_renew_margin", &self.subnet_lease_renew_margin)
            .field("ip_masq", &self.ip_masq)
            .field("iptables_forward_rules", &self.iptables_forward_rules)
            .field("healthz_ip", &self.healthz_ip)
            .field("healthz_port", &self.healthz_port)
            .finish_non_exhaustive()
    }
}

/// A flag value that parses but makes no sense.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FlagError {
    /// clap's own error (unknown flag, bad value), already formatted.
    #[error("{0}")]
    Syntax(String),
    /// A value out of range or inconsistent with another.
    #[error("invalid --{flag} {value:?}: {reason}")]
    Invalid {
        /// The flag name.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
}

/// What the command line asks for.
#[derive(Debug)]
pub(crate) enum Command {
    /// Run the daemon.
    Run(Box<Flags>),
    /// Print help (clap's text) and exit 0.
    Help(String),
    /// Print the version and exit 0.
    Version,
}

/// Rewrites Go-style `-name[=v]` arguments to `--name[=v]`; `-v` stays.
fn normalize(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    args.into_iter()
        .map(|arg| match arg.to_str() {
            Some(s)
                if s.starts_with('-')
                    && !s.starts_with("--")
                    && s.len() > 2
                    && !s.starts_with("-v=")
                    && s.as_bytes().get(1).is_some_and(u8::is_ascii_alphabetic) =>
            {
                OsString::from(format!("-{s}"))
            }
            _ => arg,
        })
        .collect()
}

/// Parses the command line (program name first) and the environment.
pub(crate) fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, FlagError> {
    let flags = match Flags::try_parse_from(normalize(args)) {
        Ok(flags) => flags,
        Err(error) => {
            use clap::error::ErrorKind;
            return match error.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    Ok(Command::Help(error.to_string()))
                }
                _ => Err(FlagError::Syntax(error.to_string())),
            };
        }
    };
    if flags.version {
        return Ok(Command::Version);
    }
    validate(&flags)?;
    Ok(Command::Run(Box::new(flags)))
}

fn validate(flags: &Flags) -> Result<(), FlagError> {
    let invalid = |flag, value: String, reason: &str| FlagError::Invalid {
        flag,
        value,
        reason: reason.to_owned(),
    };
    if !(1..=1439).contains(&flags.subnet_lease_renew_margin) {
        return Err(invalid(
            "subnet-lease-renew-margin",
            flags.subnet_lease_renew_margin.to_string(),
            "must be 1..1439 minutes",
        ));
    }
    if flags.subnet_lease_ttl == 0 || flags.renew_margin() >= flags.lease_ttl() {
        return Err(invalid(
            "subnet-lease-ttl",
            flags.subnet_lease_ttl.to_string(),
            "must be longer than the renew margin",
        ));
    }
    if !(1..=1024).contains(&flags.udp_batch) {
        return Err(invalid(
            "udp-batch",
            flags.udp_batch.to_string(),
            "must be 1..1024",
        ));
    }
    if flags.etcd_endpoints.iter().all(|e| e.trim().is_empty()) {
        return Err(invalid(
            "etcd-endpoints",
            String::new(),
            "no endpoint given",
        ));
    }
    for endpoint in &flags.etcd_endpoints {
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(invalid(
                "etcd-endpoints",
                endpoint.clone(),
                "each endpoint must be an http:// or https:// URL",
            ));
        }
    }
    if !flags.public_ip.is_empty() && flags.public_ip.parse::<Ipv4Addr>().is_err() {
        return Err(invalid(
            "public-ip",
            flags.public_ip.clone(),
            "not an IPv4 address",
        ));
    }
    for pattern in &flags.iface_regex {
        if let Err(error) = regex::Regex::new(pattern) {
            return Err(invalid("iface-regex", pattern.clone(), &error.to_string()));
        }
    }
    if flags.etcd_keyfile.is_empty() != flags.etcd_certfile.is_empty() {
        return Err(invalid(
            "etcd-certfile",
            flags.etcd_certfile.clone(),
            "--etcd-certfile and --etcd-keyfile go together",
        ));
    }
    if flags.uses_tls()
        && let Some(plain) = flags
            .etcd_endpoints
            .iter()
            .find(|e| e.starts_with("http://"))
    {
        return Err(invalid(
            "etcd-endpoints",
            plain.clone(),
            "with --etcd-certfile every endpoint must be an https:// URL",
        ));
    }
    if flags.etcd_username.is_empty() != flags.etcd_password.is_empty() {
        return Err(invalid(
            "etcd-username",
            flags.etcd_username.clone(),
            "--etcd-username and --etcd-password go together",
        ));
    }
    Ok(())
}

impl Flags {
    /// `--subnet-lease-renew-margin` as a duration.
    pub(crate) fn renew_margin(&self) -> Duration {
        Duration::from_secs(u64::from(self.subnet_lease_renew_margin) * 60)
    }

    /// The lease TTL.
    pub(crate) fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.subnet_lease_ttl)
    }

    /// Whether etcd is reached over TLS: both a client certificate and key
    /// are given (as with flannel; a CA file alone does not turn TLS on).
    pub(crate) fn uses_tls(&self) -> bool {
        !self.etcd_certfile.is_empty() && !self.etcd_keyfile.is_empty()
    }

    /// `--public-ip`, if given.
    pub(crate) fn public_ip(&self) -> Option<Ipv4Addr> {
        self.public_ip.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Flags, FlagError> {
        let argv = std::iter::once("flanneld")
            .chain(args.iter().copied())
            .map(OsString::from);
        match parse(argv)? {
            Command::Run(flags) => Ok(*flags),
            other => panic!("expected Run, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_flannels() {
        let flags = run(&[]).unwrap();
        assert_eq!(
            flags.etcd_endpoints,
            ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
        );
        assert_eq!(flags.etcd_prefix, "/coreos.com/network");
        assert_eq!(flags.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(flags.subnet_lease_renew_margin, 60);
        assert!(!flags.ip_masq);
        assert!(flags.iptables_forward_rules);
        assert_eq!(flags.healthz_port, 0);
    }

    #[test]
    fn go_style_flags_are_accepted() {
        let flags = run(&[
            "-etcd-endpoints=http://198.18.0.2:2379,http://198.18.0.3:2379",
            "--iface",
            "eth0",
            "-iface=eth1",
            "--ip-masq",
            "--iptables-forward-rules=false",
            "-v=2",
        ])
        .unwrap();
        assert_eq!(flags.etcd_endpoints.len(), 2);
        assert_eq!(flags.iface, ["eth0", "eth1"]);
        assert!(flags.ip_masq);
        assert!(!flags.iptables_forward_rules);
        assert_eq!(flags.verbosity, 2);
    }

    #[test]
    fn bad_flags_name_themselves() {
        let unknown = run(&["--no-such-flag"]).unwrap_err().to_string();
        assert!(unknown.contains("--no-such-flag"), "{unknown}");
        let margin = run(&["--subnet-lease-renew-margin=0"])
            .unwrap_err()
            .to_string();
        assert!(margin.contains("subnet-lease-renew-margin") && margin.contains("1..1439"));
        let ip = run(&["--public-ip=1.2.3"]).unwrap_err().to_string();
        assert!(ip.contains("public-ip") && ip.contains("1.2.3"));
        let endpoint = run(&["--etcd-endpoints=198.18.0.2:2379"])
            .unwrap_err()
            .to_string();
        assert!(endpoint.contains("198.18.0.2:2379"));
        let tls = run(&["--etcd-certfile=/c.pem"]).unwrap_err().to_string();
        assert!(tls.contains("--etcd-keyfile"), "{tls}");
        let plain = run(&[
            "--etcd-certfile=/c.pem",
            "--etcd-keyfile=/k.pem",
            "--etcd-endpoints=http://198.18.0.2:2379",
        ])
        .unwrap_err()
        .to_string();
        assert!(plain.contains("https://"), "{plain}");
        let regex = run(&["--iface-regex=("]).unwrap_err().to_string();
        assert!(regex.contains("iface-regex"));
        let port = run(&["--healthz-port=99999"]).unwrap_err().to_string();
        assert!(port.contains("99999"), "{port}");
    }

    #[test]
    fn password_is_never_in_debug_output() {
        let flags = run(&["--etcd-username=u", "--etcd-password=hunter2"]).unwrap();
        let text = format!("{flags:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("<redacted>"));
    }

    #[test]
    fn version_and_help() {
        let argv = |a: &str| ["flanneld", a].map(OsString::from);
        assert!(matches!(parse(argv("--version")), Ok(Command::Version)));
        assert!(matches!(parse(argv("-version")), Ok(Command::Version)));
        assert!(matches!(parse(argv("--help")), Ok(Command::Help(_))));
    }
}
