//! Network namespaces: listing them, running commands inside them, and the
//! per-cluster set of namespaces that the drop guard deletes.

use std::ffi::OsStr;
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::cmd::{IP_TIMEOUT, ip, run, run_ok};
use crate::error::{HarnessError, Result};

/// Where `ip netns` keeps the namespace names.
const NETNS_RUN_DIR: &str = "/run/netns";

/// The names of all named network namespaces (the entries of `/run/netns`,
/// which is what `ip netns list` shows; reading the directory directly
/// avoids `ip`'s errors about namespaces that vanish while it looks).
pub fn list_netns() -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_RUN_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(HarnessError::io(format!("cannot list {NETNS_RUN_DIR}"), e)),
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

/// Runs `ip netns exec <netns> <args...>` with a timeout; the exit status is
/// not checked.
pub fn netns_exec<I, S>(netns: &str, args: I, timeout: Duration) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(
        Command::new("ip").args(["netns", "exec", netns]).args(args),
        timeout,
    )
}

/// Sets a sysctl inside `netns` (`ip netns exec <netns> sysctl -w key=value`).
pub fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    run_ok(
        Command::new("ip")
            .args(["netns", "exec", netns, "sysctl", "-q", "-w"])
            .arg(format!("{key}={value}")),
        IP_TIMEOUT,
    )
    .map(drop)
}

/// The namespaces one cluster created, deleted together by its drop guard.
#[derive(Debug, Default)]
pub(crate) struct NetnsSet {
    /// In creation order.
    names: Mutex<Vec<String>>,
}

impl NetnsSet {
    /// Locks the list, tolerating a poisoned mutex (a test thread panicked).
    fn names(&self) -> MutexGuard<'_, Vec<String>> {
        self.names.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates namespace `name` (recorded first, so even a half-done
    /// creation is cleaned up) and brings its `lo` up.
    pub(crate) fn create(&self, name: &str) -> Result<()> {
        self.names().push(name.to_owned());
        ip(["netns", "add", name])?;
        ip(["-n", name, "link", "set", "lo", "up"]).map(drop)
    }

    /// Deletes namespace `name` now and forgets it.
    pub(crate) fn delete(&self, name: &str) -> Result<()> {
        self.names().retain(|n| n != name);
        delete_netns(name)
    }

    /// Deletes every recorded namespace, newest first; returns the failures.
    pub(crate) fn delete_all(&self) -> Vec<HarnessError> {
        let names = std::mem::take(&mut *self.names());
        names
            .iter()
            .rev()
            .filter_map(|n| delete_netns(n).err())
            .collect()
    }
}

/// `ip netns del <name>`; a namespace that does not exist is not an error.
fn delete_netns(name: &str) -> Result<()> {
    match ip(["netns", "del", name]) {
        Ok(_) => Ok(()),
        Err(e) => {
            if list_netns()?.iter().any(|n| n == name) {
                Err(e)
            } else {
                Ok(())
            }
        }
    }
}
