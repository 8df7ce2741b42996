//! Unique names, the stale-namespace sweep, the underlay /24 locks and the
//! root check.
//!
//! Every cluster's names start with a prefix `ft<pid>x<n>`: the PID of the
//! test process and a per-process counter. The PID lets a later run tell a
//! leftover of a dead process (sweep it) from the namespace of a test that is
//! running right now in another process (never touch it).

use std::fs::{self, File, TryLockError};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

use ipnetwork::Ipv4Network;

use crate::cmd::{IP_TIMEOUT, ip, run};
use crate::error::{HarnessError, Result};
use crate::netns::list_netns;

/// What every name the harness creates starts with.
pub const NAME_PREFIX: &str = "ft";
/// Temporary directories are named `netns-tests-<prefix>-XXXXXX`.
pub(crate) const TEMP_DIR_PREFIX: &str = "netns-tests-";
/// Where the underlay /24 lock files live.
const UNDERLAY_LOCK_DIR: &str = "netns-tests-underlay";

/// Makes prefixes unique inside this process.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh prefix `ft<pid>x<n>`, unique among all live processes.
pub fn unique_prefix() -> String {
    format!(
        "{NAME_PREFIX}{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The PID embedded in a harness name `ft<pid>x<n>...`, or `None` if `name`
/// is not one of ours.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let digits = rest.find(|c: char| !c.is_ascii_digit())?;
    let (pid, rest) = rest.split_at(digits);
    let counter = rest.strip_prefix('x')?;
    if pid.is_empty() || !counter.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether a process with this PID exists (`/proc/<pid>`). A reused PID
/// counts as alive: the sweep errs on the side of leaving things alone.
fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes every network namespace (and temporary directory) named like
/// ours whose owning process is gone; returns the deleted namespaces.
/// Namespaces of live processes are never touched. Processes still inside a
/// stale namespace are reported, not killed: they are not this process's.
pub fn sweep_stale() -> Result<Vec<String>> {
    let mut deleted = Vec::new();
    for name in list_netns()? {
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid_alive(pid) {
            continue;
        }
        if let Ok(out) = run(
            Command::new("ip").args(["netns", "pids", &name]),
            IP_TIMEOUT,
        ) {
            let pids = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            if !pids.is_empty() {
                eprintln!(
                    "netns-tests: stale namespace {name} (owner pid {pid} is gone) still holds \
                     processes {pids}; deleting its name, not killing them"
                );
            }
        }
        match ip(["netns", "del", &name]) {
            Ok(_) => deleted.push(name),
            // Another process may be sweeping the same name right now.
            Err(e) if list_netns()?.contains(&name) => return Err(e),
            Err(_) => {}
        }
    }
    sweep_stale_temp_dirs();
    Ok(deleted)
}

/// Removes `/tmp/netns-tests-ft<pid>x<n>-*` directories of dead processes.
fn sweep_stale_temp_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|n| n.strip_prefix(TEMP_DIR_PREFIX))
            .and_then(owner_pid)
        else {
            continue;
        };
        if !pid_alive(owner) && entry.file_type().is_ok_and(|t| t.is_dir()) {
            // Best effort: a failure leaves it for the next sweep.
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Runs [`sweep_stale`] once per process (the first cluster start does it);
/// failures are printed, not fatal.
pub(crate) fn sweep_once() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| match sweep_stale() {
        Ok(deleted) if !deleted.is_empty() => {
            eprintln!("netns-tests: swept stale namespaces {deleted:?}");
        }
        Ok(_) => {}
        Err(e) => eprintln!("netns-tests: sweeping stale namespaces failed: {e}"),
    });
}

/// Whether this process runs as root (effective UID 0, from
/// `/proc/self/status`).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// [`HarnessError::NotRoot`] unless [`is_root`].
pub fn require_root() -> Result<()> {
    if is_root() {
        Ok(())
    } else {
        Err(HarnessError::NotRoot)
    }
}

/// One cluster's underlay `198.18.<k>.0/24`, held for as long as this value
/// lives by an exclusive lock on `/tmp/netns-tests-underlay/<k>.lock` (the
/// kernel drops the lock when the process dies, so a crash never leaks one).
#[derive(Debug)]
pub(crate) struct UnderlayLease {
    /// The third octet.
    k: u8,
    /// The locked file; dropping it releases the lock.
    _lock: File,
}

impl UnderlayLease {
    /// Locks the first free `k`, starting from one derived from the PID and
    /// `seed` so that parallel processes rarely even try the same one.
    pub(crate) fn acquire(seed: u32) -> Result<Self> {
        let dir: PathBuf = std::env::temp_dir().join(UNDERLAY_LOCK_DIR);
        fs::create_dir_all(&dir)
            .map_err(|e| HarnessError::io(format!("cannot create {}", dir.display()), e))?;
        let start = std::process::id().wrapping_mul(31).wrapping_add(seed);
        for step in 0..256u32 {
            let k = u8::try_from(start.wrapping_add(step) % 256).expect("a value % 256 fits in u8");
            let path = dir.join(format!("{k}.lock"));
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| HarnessError::io(format!("cannot open {}", path.display()), e))?;
            match file.try_lock() {
                Ok(()) => return Ok(Self { k, _lock: file }),
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(e)) => {
                    return Err(HarnessError::io(
                        format!("cannot lock {}", path.display()),
                        e,
                    ));
                }
            }
        }
        Err(HarnessError::UnderlayExhausted)
    }

    /// The underlay network `198.18.<k>.0/24`.
    pub(crate) fn network(&self) -> Ipv4Network {
        Ipv4Network::new(Ipv4Addr::new(198, 18, self.k, 0), 24)
            .expect("a /24 prefix length is valid")
    }

    /// The address `198.18.<k>.<host>`.
    pub(crate) fn addr(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.k, host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_our_names() {
        assert_eq!(owner_pid("ft123x0-sw"), Some(123));
        assert_eq!(owner_pid("ft7x12-n3c1"), Some(7));
        assert_eq!(owner_pid("ft7x12"), Some(7));
        assert_eq!(owner_pid("ft7x-sw"), None);
        assert_eq!(owner_pid("ftx1-sw"), None);
        assert_eq!(owner_pid("fta1x1"), None);
        assert_eq!(owner_pid("cni-1234"), None);
        assert_eq!(owner_pid("ft99999999999x1-sw"), None, "not a u32");
    }

    #[test]
    fn prefixes_are_unique_and_parse_back() {
        let a = unique_prefix();
        let b = unique_prefix();
        assert_ne!(a, b);
        assert_eq!(owner_pid(&format!("{a}-sw")), Some(std::process::id()));
    }

    #[test]
    fn underlay_leases_are_exclusive() {
        let a = UnderlayLease::acquire(0).unwrap();
        let b = UnderlayLease::acquire(0).unwrap();
        assert_ne!(a.network(), b.network());
        assert_eq!(a.addr(2).octets()[..3], a.network().ip().octets()[..3]);
    }
}
