//! `/run/flannel/subnet.env`: the file flanneld writes once it holds a lease
//! and that the CNI plugin (and `mk-docker-opts.sh`) read.
//!
//! Writing produces flannel's exact bytes, atomically, so a reader never sees
//! a half-written file. Reading is deliberately more tolerant than flannel's
//! own line scanner (comments, `export`, quotes, CRLF) so that a file edited by
//! hand or produced by a shell-style tool still reads, but a known key with a
//! bad value is an error rather than being silently dropped: a silently
//! missing MTU or subnet only resurfaces later as a far more confusing failure.

use std::ffi::OsStr;
use std::fmt::Display;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnetwork::{Ipv4Network, Ipv6Network};

/// flannel's default location of the file (`--subnet-file`).
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";

const NETWORK: &str = "FLANNEL_NETWORK";
const SUBNET: &str = "FLANNEL_SUBNET";
const IPV6_NETWORK: &str = "FLANNEL_IPV6_NETWORK";
const IPV6_SUBNET: &str = "FLANNEL_IPV6_SUBNET";
const MTU: &str = "FLANNEL_MTU";
const IPMASQ: &str = "FLANNEL_IPMASQ";

/// Mode of the written file: readers (CNI plugin, docker helpers) may not run
/// as the writer, so it must be world-readable whatever the umask.
const FILE_MODE: u32 = 0o644;
/// Mode of a parent directory we create.
const DIR_MODE: u32 = 0o755;

/// The values of a subnet.env file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`: the cluster network(s); de-duplicated, order kept.
    pub networks: Vec<Ipv4Network>,
    /// `FLANNEL_SUBNET` exactly as written: the gateway address with the
    /// subnet's prefix (`10.244.1.1/24`), not masked. See
    /// [`SubnetEnv::subnet_network`] for the subnet itself.
    pub subnet: Option<Ipv4Network>,
    /// `FLANNEL_IPV6_NETWORK`: the IPv6 cluster network(s).
    pub ipv6_networks: Vec<Ipv6Network>,
    /// `FLANNEL_IPV6_SUBNET` as written (`2001:cafe:42:1::1/64`), not masked.
    pub ipv6_subnet: Option<Ipv6Network>,
    /// `FLANNEL_MTU`: the MTU pods on this node must use.
    pub mtu: Option<u32>,
    /// `FLANNEL_IPMASQ`: `Some(true)` iff the value is exactly `true`,
    /// `Some(false)` for any other present value (flannel's rule).
    pub ipmasq: Option<bool>,
}

impl SubnetEnv {
    /// The leased subnet itself (`FLANNEL_SUBNET` masked:
    /// `10.244.1.1/24` -> `10.244.1.0/24`).
    pub fn subnet_network(&self) -> Option<Ipv4Network> {
        self.subnet
            .and_then(|s| Ipv4Network::new(s.network(), s.prefix()).ok())
    }

    /// The leased IPv6 subnet itself (`FLANNEL_IPV6_SUBNET` masked:
    /// `2001:cafe:42:1::1/64` -> `2001:cafe:42:1::/64`).
    pub fn ipv6_subnet_network(&self) -> Option<Ipv6Network> {
        self.ipv6_subnet
            .and_then(|s| Ipv6Network::new(s.network(), s.prefix()).ok())
    }

    /// Renders flannel's exact format: one `KEY=value` line per present value,
    /// in flannel's order, `\n` endings, no quoting, lists comma-separated.
    pub fn render(&self) -> String {
        let mut out = String::new();
        push_list(&mut out, NETWORK, &self.networks);
        push_opt(&mut out, SUBNET, self.subnet);
        push_list(&mut out, IPV6_NETWORK, &self.ipv6_networks);
        push_opt(&mut out, IPV6_SUBNET, self.ipv6_subnet);
        push_opt(&mut out, MTU, self.mtu);
        push_opt(&mut out, IPMASQ, self.ipmasq);
        out
    }

    /// Tolerant parse of file contents. `source` names the file in errors.
    ///
    /// Accepts flannel's own output and the usual shell/dotenv variations:
    /// blank lines, `#` comments, an `export ` prefix, whitespace around key
    /// and value, one pair of matching surrounding quotes, CRLF endings,
    /// spaces and duplicates in comma lists. Unknown keys and lines without
    /// `=` are ignored; a later duplicate key wins; an empty value means the
    /// key is absent. A known key whose value does not parse is
    /// [`SubnetEnvError::Invalid`].
    pub fn parse(text: &str, source: &Path) -> Result<Self, SubnetEnvError> {
        let mut env = SubnetEnv::default();
        for (index, raw) in text.lines().enumerate() {
            let Some((key, value)) = split_line(raw) else {
                continue;
            };
            env.apply(key, value)
                .map_err(|reason| SubnetEnvError::Invalid {
                    path: source.to_path_buf(),
                    line: index + 1,
                    key: key.to_owned(),
                    value: value.to_owned(),
                    reason,
                })?;
        }
        Ok(env)
    }

    /// Reads and parses `path`, then checks what the CNI plugin requires
    /// (flannel's rule: at least one network, at least one subnet, MTU and
    /// IPMASQ present); otherwise [`SubnetEnvError::Missing`] lists every
    /// missing key.
    pub fn read_complete(path: &Path) -> Result<Self, SubnetEnvError> {
        let text = read_text(path)?;
        let env = Self::parse(&text, path)?;
        let keys = env.missing_keys();
        if keys.is_empty() {
            Ok(env)
        } else {
            Err(SubnetEnvError::Missing {
                path: path.to_path_buf(),
                keys,
            })
        }
    }

    /// Reads and parses `path` without the completeness check (flanneld uses
    /// this at startup to find its previous subnet). A missing file is
    /// `Ok(None)`: on a fresh node there simply is no previous subnet.
    pub fn read_if_present(path: &Path) -> Result<Option<Self>, SubnetEnvError> {
        match read_text(path) {
            Ok(text) => Self::parse(&text, path).map(Some),
            Err(SubnetEnvError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stores one known key's value; unknown keys are ignored. The error is
    /// the reason the value is unusable.
    fn apply(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            NETWORK => self.networks = parse_list(value)?,
            SUBNET => self.subnet = parse_opt(value, parse_cidr)?,
            IPV6_NETWORK => self.ipv6_networks = parse_list(value)?,
            IPV6_SUBNET => self.ipv6_subnet = parse_opt(value, parse_cidr)?,
            MTU => self.mtu = parse_opt(value, parse_mtu)?,
            // flannel treats anything but the exact string `true` as false.
            IPMASQ => self.ipmasq = parse_opt(value, |v| Ok(v == "true"))?,
            _ => {}
        }
        Ok(())
    }

    /// The keys the CNI plugin needs but this file lacks, worded as flannel
    /// words them (either family satisfies the network and subnet rules, so
    /// both names are listed when neither is present).
    fn missing_keys(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.networks.is_empty() && self.ipv6_networks.is_empty() {
            keys.extend([NETWORK, IPV6_NETWORK]);
        }
        if self.subnet.is_none() && self.ipv6_subnet.is_none() {
            keys.extend([SUBNET, IPV6_SUBNET]);
        }
        if self.mtu.is_none() {
            keys.push(MTU);
        }
        if self.ipmasq.is_none() {
            keys.push(IPMASQ);
        }
        keys
    }
}

/// Why a subnet.env file could not be read, used or written.
#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    /// The file does not exist, normally because flanneld has not (yet)
    /// acquired a lease on this node. The CNI plugin reports this as
    /// "try again later".
    #[error(
        "failed to load flannel subnet.env file {}: no such file \
         (flanneld has not written it yet: is flanneld running on this node? \
         Check the flanneld log for this node)",
        .path.display()
    )]
    NotFound {
        /// The file that was looked for.
        path: PathBuf,
    },
    /// Any other failure reading or writing the file or its directory.
    #[error("flannel subnet.env file {}: {source}", .path.display())]
    Io {
        /// The file (or directory) being accessed.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A known key has a value that does not parse.
    #[error(
        "flannel subnet.env file {}, line {line}: invalid {key} value {value:?}: {reason}",
        .path.display()
    )]
    Invalid {
        /// The file read.
        path: PathBuf,
        /// 1-based line number of the offending line.
        line: usize,
        /// The key, e.g. `FLANNEL_MTU`.
        key: String,
        /// The value as found (after trimming and unquoting).
        value: String,
        /// Why the value is unusable.
        reason: String,
    },
    /// The file parses but lacks values the CNI plugin requires.
    #[error("{} is missing {}", .path.display(), .keys.join(", "))]
    Missing {
        /// The file read.
        path: PathBuf,
        /// Every missing key, in flannel's order.
        keys: Vec<&'static str>,
    },
}

/// Writes `env` to `path` atomically: creates the parent directory (mode
/// 0755) if missing, writes a temporary file in the same directory, fsyncs
/// it, sets mode 0644 regardless of umask, renames it over `path` and fsyncs
/// the directory. A crash never leaves a partial file at `path`, and a
/// failure leaves no temporary file behind.
pub fn write_atomic(path: &Path, env: &SubnetEnv) -> Result<(), SubnetEnvError> {
    let dir = parent_dir(path);
    ensure_dir(dir)?;
    let io_err = |source| SubnetEnvError::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path.file_name().ok_or_else(|| {
        io_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path does not name a file",
        ))
    })?;
    let temp = TempFile::create(dir, name).map_err(io_err)?;
    temp.fill(env.render().as_bytes()).map_err(io_err)?;
    temp.persist(path).map_err(io_err)?;
    // Without this the rename itself may be lost on power failure.
    sync_dir(dir).map_err(|source| SubnetEnvError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Reads the whole file, telling "not there" apart from other failures.
fn read_text(path: &Path) -> Result<String, SubnetEnvError> {
    fs::read_to_string(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => SubnetEnvError::NotFound {
            path: path.to_path_buf(),
        },
        _ => SubnetEnvError::Io {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Splits one line into a trimmed key and value, or `None` for lines that
/// carry no assignment (blank, comment, no `=`).
fn split_line(raw: &str) -> Option<(&str, &str)> {
    // `lines` strips `\r\n`; `trim` also catches a lone trailing `\r`.
    let line = raw.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (key, value) = line.split_once('=')?;
    Some((strip_export(key.trim()), unquote(value.trim()).trim()))
}

/// Drops a shell `export ` prefix from a key.
fn strip_export(key: &str) -> &str {
    key.strip_prefix("export")
        .filter(|rest| rest.starts_with(char::is_whitespace))
        .map_or(key, str::trim_start)
}

/// Removes one pair of matching surrounding quotes, if present.
fn unquote(value: &str) -> &str {
    ['"', '\'']
        .into_iter()
        .find_map(|q| value.strip_prefix(q)?.strip_suffix(q))
        .unwrap_or(value)
}

/// Applies `parse` to a non-empty value; an empty value means "absent".
fn parse_opt<T>(
    value: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<T>, String> {
    if value.is_empty() {
        Ok(None)
    } else {
        parse(value).map(Some)
    }
}

/// Parses a CIDR (`addr/prefix`). A bare address is refused: the parser
/// would read it as a host route, which is never what this file means.
fn parse_cidr<N: FromStr<Err: Display>>(value: &str) -> Result<N, String> {
    if !value.contains('/') {
        return Err("expected CIDR notation (address/prefix-length)".to_owned());
    }
    value.parse().map_err(|e: N::Err| e.to_string())
}

/// Parses a comma-separated CIDR list, skipping empty items and dropping
/// duplicates while keeping first-seen order.
fn parse_list<N: FromStr<Err: Display> + PartialEq>(value: &str) -> Result<Vec<N>, String> {
    let mut out: Vec<N> = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let net = parse_cidr(item).map_err(|e| format!("{item:?}: {e}"))?;
        if !out.contains(&net) {
            out.push(net);
        }
    }
    Ok(out)
}

fn parse_mtu(value: &str) -> Result<u32, String> {
    value
        .parse()
        .map_err(|e| format!("expected an unsigned integer: {e}"))
}

fn push_opt(out: &mut String, key: &str, value: Option<impl Display>) {
    if let Some(v) = value {
        out.push_str(&format!("{key}={v}\n"));
    }
}

fn push_list(out: &mut String, key: &str, values: &[impl Display]) {
    if values.is_empty() {
        return;
    }
    let joined: Vec<String> = values.iter().map(ToString::to_string).collect();
    out.push_str(&format!("{key}={}\n", joined.join(",")));
}

/// The directory holding `path`; `.` for a bare file name.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Creates `dir` (and its ancestors) if missing. The leaf gets 0755
/// explicitly because `DirBuilder` modes are filtered by the umask.
fn ensure_dir(dir: &Path) -> Result<(), SubnetEnvError> {
    if dir.is_dir() {
        return Ok(());
    }
    let io_err = |source| SubnetEnvError::Io {
        path: dir.to_path_buf(),
        source,
    };
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(io_err)?;
    fs::set_permissions(dir, Permissions::from_mode(DIR_MODE)).map_err(io_err)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A temporary file next to the target, removed on drop unless persisted,
/// so that no error path leaves debris in the directory.
#[derive(Debug)]
struct TempFile {
    path: PathBuf,
    file: File,
    persisted: bool,
}

impl TempFile {
    /// Creates a fresh hidden file in `dir`. `create_new` guarantees we never
    /// write into a file someone else (or a crashed earlier run) owns; on a
    /// name clash we simply pick another name.
    fn create(dir: &Path, target: &OsStr) -> io::Result<Self> {
        const ATTEMPTS: usize = 16;
        for _ in 0..ATTEMPTS {
            let path = dir.join(temp_name(target));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(Self {
                        path,
                        file,
                        persisted: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "could not choose an unused temporary file name",
        ))
    }

    /// Writes the contents, fixes the mode (the create mode was reduced by
    /// the umask) and flushes everything to disk before any rename.
    fn fill(&self, contents: &[u8]) -> io::Result<()> {
        (&self.file).write_all(contents)?;
        self.file
            .set_permissions(Permissions::from_mode(FILE_MODE))?;
        self.file.sync_all()
    }

    /// Atomically replaces `target` with this file.
    fn persist(mut self, target: &Path) -> io::Result<()> {
        fs::rename(&self.path, target)?;
        // The temporary name no longer exists (it is now `target`).
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            // Best effort: the error being returned matters more than this.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A name unlikely to clash: hidden, tied to the target, and unique per
/// process, call and moment (the time guards against stale files left by a
/// crashed process that had the same pid).
fn temp_name(target: &OsStr) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        ".{}.tmp-{}-{n}-{nanos}",
        target.to_string_lossy(),
        std::process::id()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const IPV4_FILE: &str = "FLANNEL_NETWORK=10.244.0.0/16\n\
                             FLANNEL_SUBNET=10.244.1.1/24\n\
                             FLANNEL_MTU=1450\n\
                             FLANNEL_IPMASQ=true\n";

    fn v4(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn v6(s: &str) -> Ipv6Network {
        s.parse().unwrap()
    }

    fn src() -> &'static Path {
        Path::new("/run/flannel/subnet.env")
    }

    fn ipv4_env() -> SubnetEnv {
        SubnetEnv {
            networks: vec![v4("10.244.0.0/16")],
            subnet: Some(v4("10.244.1.1/24")),
            mtu: Some(1450),
            ipmasq: Some(true),
            ..SubnetEnv::default()
        }
    }

    fn dual_env() -> SubnetEnv {
        SubnetEnv {
            ipv6_networks: vec![v6("2001:cafe:42::/56")],
            ipv6_subnet: Some(v6("2001:cafe:42:1::1/64")),
            ..ipv4_env()
        }
    }

    #[test]
    fn render_ipv4_only_is_byte_exact() {
        assert_eq!(ipv4_env().render(), IPV4_FILE);
    }

    #[test]
    fn render_dual_stack_is_byte_exact() {
        let expected = "FLANNEL_NETWORK=10.244.0.0/16\n\
                        FLANNEL_SUBNET=10.244.1.1/24\n\
                        FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\n\
                        FLANNEL_IPV6_SUBNET=2001:cafe:42:1::1/64\n\
                        FLANNEL_MTU=1450\n\
                        FLANNEL_IPMASQ=true\n";
        assert_eq!(dual_env().render(), expected);
    }

    #[test]
    fn render_lists_ipmasq_false_and_omits_absent() {
        let env = SubnetEnv {
            networks: vec![v4("10.244.0.0/16"), v4("10.245.0.0/16")],
            ipmasq: Some(false),
            ..SubnetEnv::default()
        };
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.244.0.0/16,10.245.0.0/16\nFLANNEL_IPMASQ=false\n"
        );
        assert_eq!(SubnetEnv::default().render(), "");
    }

    #[test]
    fn round_trip() {
        for env in [ipv4_env(), dual_env(), SubnetEnv::default()] {
            assert_eq!(SubnetEnv::parse(&env.render(), src()).unwrap(), env);
        }
    }

    #[test]
    fn parses_flannel_written_file() {
        let env = SubnetEnv::parse(IPV4_FILE, src()).unwrap();
        assert_eq!(env, ipv4_env());
        assert_eq!(env.subnet_network(), Some(v4("10.244.1.0/24")));
    }

    #[test]
    fn tolerant_reader() {
        let text = "# written by hand\r\n\
                    \r\n\
                    export FLANNEL_NETWORK = \"10.244.0.0/16, 10.245.0.0/16 ,10.244.0.0/16,\"\r\n\
                    \t  # indented comment\r\n\
                    FLANNEL_SUBNET='10.244.9.1/24'\r\n\
                    FLANNEL_SUBNET = 10.244.1.1/24 \r\n\
                    SOMETHING_ELSE=whatever\r\n\
                    not an assignment\r\n\
                    FLANNEL_IPV6_NETWORK=\r\n\
                    export\tFLANNEL_MTU=\" 1400 \"\r\n\
                    FLANNEL_IPMASQ=\"true\"";
        let env = SubnetEnv::parse(text, src()).unwrap();
        assert_eq!(env.networks, vec![v4("10.244.0.0/16"), v4("10.245.0.0/16")]);
        assert_eq!(env.subnet, Some(v4("10.244.1.1/24")));
        assert!(env.ipv6_networks.is_empty());
        assert_eq!(env.mtu, Some(1400));
        assert_eq!(env.ipmasq, Some(true));
    }

    #[test]
    fn mismatched_quotes_are_kept_and_rejected() {
        let err = SubnetEnv::parse("FLANNEL_MTU=\"1450'\n", src()).unwrap_err();
        assert!(matches!(err, SubnetEnvError::Invalid { ref value, .. } if value == "\"1450'"));
    }

    #[test]
    fn later_empty_duplicate_makes_key_absent() {
        let env = SubnetEnv::parse("FLANNEL_MTU=1450\nFLANNEL_MTU=\n", src()).unwrap();
        assert_eq!(env.mtu, None);
    }

    #[test]
    fn ipmasq_is_true_only_for_exact_true() {
        for (value, expected) in [
            ("true", Some(true)),
            ("True", Some(false)),
            ("1", Some(false)),
            ("false", Some(false)),
            ("", None),
        ] {
            let env = SubnetEnv::parse(&format!("FLANNEL_IPMASQ={value}"), src()).unwrap();
            assert_eq!(env.ipmasq, expected, "{value:?}");
        }
    }

    #[test]
    fn subnet_network_masks() {
        let env = dual_env();
        assert_eq!(env.subnet_network(), Some(v4("10.244.1.0/24")));
        assert_eq!(env.ipv6_subnet_network(), Some(v6("2001:cafe:42:1::/64")));
        assert_eq!(SubnetEnv::default().subnet_network(), None);
        assert_eq!(SubnetEnv::default().ipv6_subnet_network(), None);
    }

    #[test]
    fn invalid_names_file_line_key_and_value() {
        let text = "FLANNEL_NETWORK=10.244.0.0/16\n# comment\nFLANNEL_MTU=fourteen\n";
        let err = SubnetEnv::parse(text, src()).unwrap_err();
        let SubnetEnvError::Invalid {
            line, key, value, ..
        } = &err
        else {
            panic!("expected Invalid, got {err:?}");
        };
        assert_eq!(
            (*line, key.as_str(), value.as_str()),
            (3, "FLANNEL_MTU", "fourteen")
        );
        let msg = err.to_string();
        for part in [
            "/run/flannel/subnet.env",
            "line 3",
            "FLANNEL_MTU",
            "fourteen",
        ] {
            assert!(msg.contains(part), "{msg:?} lacks {part:?}");
        }
    }

    #[test]
    fn bad_values_are_invalid() {
        for line in [
            "FLANNEL_MTU=-1",
            "FLANNEL_MTU=1450 # comment",
            "FLANNEL_SUBNET=10.244.1.1",
            "FLANNEL_SUBNET=10.244.1.1/33",
            "FLANNEL_NETWORK=10.244.0.0/16,bogus",
            "FLANNEL_IPV6_NETWORK=10.0.0.0/8",
            "FLANNEL_IPV6_SUBNET=2001:cafe:42:1::1/129",
        ] {
            let err = SubnetEnv::parse(line, src()).unwrap_err();
            assert!(
                matches!(err, SubnetEnvError::Invalid { line: 1, .. }),
                "{line}: {err:?}"
            );
        }
    }

    #[test]
    fn read_complete_missing_file_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        let err = SubnetEnv::read_complete(&path).unwrap_err();
        assert!(matches!(err, SubnetEnvError::NotFound { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("flanneld"), "{msg}");
    }

    #[test]
    fn read_if_present() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        assert_eq!(SubnetEnv::read_if_present(&path).unwrap(), None);
        fs::write(&path, "FLANNEL_SUBNET=10.244.1.1/24\n").unwrap();
        let env = SubnetEnv::read_if_present(&path).unwrap().unwrap();
        assert_eq!(env.subnet_network(), Some(v4("10.244.1.0/24")));
    }

    #[test]
    fn read_of_a_directory_is_io() {
        let dir = tempfile::tempdir().unwrap();
        let err = SubnetEnv::read_complete(dir.path()).unwrap_err();
        assert!(matches!(err, SubnetEnvError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }

    #[test]
    fn missing_lists_every_missing_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        fs::write(&path, "# nothing\n").unwrap();
        let err = SubnetEnv::read_complete(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} is missing FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK, FLANNEL_SUBNET, \
                 FLANNEL_IPV6_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ",
                path.display()
            )
        );

        fs::write(
            &path,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n",
        )
        .unwrap();
        let err = SubnetEnv::read_complete(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{} is missing FLANNEL_MTU, FLANNEL_IPMASQ", path.display())
        );
    }

    #[test]
    fn read_complete_accepts_either_family() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        let v6_only = SubnetEnv {
            networks: Vec::new(),
            subnet: None,
            ..dual_env()
        };
        for env in [ipv4_env(), v6_only, dual_env()] {
            fs::write(&path, env.render()).unwrap();
            assert_eq!(SubnetEnv::read_complete(&path).unwrap(), env);
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn write_atomic_creates_parent_and_sets_modes() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("run").join("flannel");
        let path = dir.join("subnet.env");
        write_atomic(&path, &dual_env()).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), dual_env().render());
        assert_eq!(mode(&path), 0o644);
        assert_eq!(mode(&dir), 0o755);
        assert_eq!(names_in(&dir), ["subnet.env"]);
    }

    #[test]
    fn write_atomic_overwrites_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        fs::write(
            &path,
            "old contents that are longer than the new ones ....\n",
        )
        .unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o600)).unwrap();
        write_atomic(&path, &ipv4_env()).unwrap();
        write_atomic(&path, &ipv4_env()).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), IPV4_FILE);
        assert_eq!(mode(&path), 0o644);
        assert_eq!(names_in(dir.path()), ["subnet.env"]);
        assert_eq!(SubnetEnv::read_complete(&path).unwrap(), ipv4_env());
    }

    #[test]
    fn write_atomic_failure_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming a file over a non-empty directory fails.
        let path = dir.path().join("subnet.env");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("keep"), "").unwrap();
        let err = write_atomic(&path, &ipv4_env()).unwrap_err();
        assert!(matches!(err, SubnetEnvError::Io { .. }), "{err:?}");
        assert_eq!(names_in(dir.path()), ["subnet.env"]);
    }

    fn arb_v4() -> impl Strategy<Value = Ipv4Network> {
        (any::<u32>(), 0u8..=32).prop_map(|(a, p)| Ipv4Network::new(Ipv4Addr::from(a), p).unwrap())
    }

    fn arb_v6() -> impl Strategy<Value = Ipv6Network> {
        (any::<u128>(), 0u8..=128)
            .prop_map(|(a, p)| Ipv6Network::new(Ipv6Addr::from(a), p).unwrap())
    }

    fn dedup<T: PartialEq>(items: Vec<T>) -> Vec<T> {
        let mut out = Vec::new();
        for item in items {
            if !out.contains(&item) {
                out.push(item);
            }
        }
        out
    }

    fn arb_env() -> impl Strategy<Value = SubnetEnv> {
        (
            prop::collection::vec(arb_v4(), 0..4),
            prop::option::of(arb_v4()),
            prop::collection::vec(arb_v6(), 0..4),
            prop::option::of(arb_v6()),
            prop::option::of(any::<u32>()),
            prop::option::of(any::<bool>()),
        )
            .prop_map(
                |(networks, subnet, ipv6_networks, ipv6_subnet, mtu, ipmasq)| SubnetEnv {
                    networks: dedup(networks),
                    subnet,
                    ipv6_networks: dedup(ipv6_networks),
                    ipv6_subnet,
                    mtu,
                    ipmasq,
                },
            )
    }

    proptest! {
        #[test]
        fn render_parse_round_trips(env in arb_env()) {
            prop_assert_eq!(SubnetEnv::parse(&env.render(), src()).unwrap(), env);
        }

        #[test]
        fn parse_never_panics(text in ".{0,200}") {
            let _ = SubnetEnv::parse(&text, src());
        }
    }
}
