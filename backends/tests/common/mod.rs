//! The throwaway network namespace harness of the kernel tests
//! (`vxlan_kernel`, `udp_sys`, `udp_offload`, `udp_engine`).
//!
//! Root only: [`Ns::create`] fails, never skips, without it. A test namespace
//! is named `<prefix><pid>x<n>`, each test binary with its own prefix, and has
//! loopback up; its [`NsGuard`] deletes it however the test ends. The first
//! namespace a process makes first deletes those of earlier runs whose process
//! is gone (never those of tests running now in other processes). Every
//! command runs under `timeout 10`.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::process::Command;
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// A test namespace, by name (cheap to clone into the threads that enter it).
#[derive(Debug, Clone)]
pub(crate) struct Ns {
    pub(crate) name: String,
}

/// Deletes the namespace when the test ends, however it ends.
#[derive(Debug)]
pub(crate) struct NsGuard(Ns);

impl Drop for NsGuard {
    fn drop(&mut self) {
        delete(&self.0.name);
    }
}

fn delete(name: &str) {
    let _ = Command::new("timeout")
        .args(["10", "ip", "netns", "del", name])
        .status();
}

/// Runs `program args` under `timeout 10`, panicking with its stderr if it fails.
pub(crate) fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new("timeout")
        .arg("10")
        .arg(program)
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn effective_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// Deletes the `prefix` namespaces of earlier runs whose process is gone
/// (never those of tests running now in other processes).
fn sweep_stale(prefix: &str) {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('x').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            delete(&name);
        }
    }
}

impl Ns {
    /// Makes a fresh namespace `<prefix><pid>x<n>` with loopback up; deleted
    /// when the guard drops. Panics with `not_root` unless run as root. A
    /// test binary passes the same `prefix` every time (stale namespaces are
    /// swept once per process, of the first prefix).
    pub(crate) fn create(prefix: &str, not_root: &str) -> (Ns, NsGuard) {
        assert_eq!(effective_uid(), 0, "{not_root}");
        SWEEP.call_once(|| sweep_stale(prefix));
        let ns = Ns {
            name: format!(
                "{prefix}{}x{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::SeqCst)
            ),
        };
        run("ip", &["netns", "add", &ns.name]);
        let guard = NsGuard(ns.clone());
        ns.ip(&["link", "set", "lo", "up"]);
        (ns, guard)
    }

    /// `ip -n <name> args`.
    pub(crate) fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip netns exec <name> args`.
    #[allow(dead_code, reason = "udp_offload runs nothing inside its namespaces")]
    pub(crate) fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Moves the calling thread into this namespace.
    pub(crate) fn enter(&self) {
        let file = File::open(format!("/run/netns/{}", self.name)).unwrap();
        setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
    }
}

impl NsGuard {
    /// Runs `body` on a new thread that entered the namespace (only that
    /// thread moves; the test harness's threads stay where they are) and waits
    /// for it, for at most `deadline` if one is given: past it, deletes the
    /// namespace and panics. Otherwise deletes the namespace once the body has
    /// ended and then re-raises the body's panic if it had one.
    #[allow(dead_code, reason = "udp_offload enters its namespaces itself")]
    pub(crate) fn run_inside<F>(self, deadline: Option<Duration>, body: F)
    where
        F: FnOnce(Ns) + Send + 'static,
    {
        let ns = self.0.clone();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let handle = std::thread::spawn(move || {
            // Signals the end however the body ends (the sender drops on unwind).
            let _done = done_tx;
            ns.enter();
            body(ns);
        });
        if let Some(deadline) = deadline {
            match done_rx.recv_timeout(deadline) {
                Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    drop(self);
                    panic!("the test body timed out after {deadline:?}");
                }
            }
        }
        let outcome = handle.join();
        drop(self);
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }
}

/// One's complement sum of `data`'s big-endian 16-bit words added to `sum`,
/// folded as it goes: the tests' own checksum arithmetic, independent of
/// the code under test.
#[allow(dead_code, reason = "the vxlan kernel tests compute no checksums")]
pub(crate) fn sum16(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for chunk in &mut chunks {
        sum += u32::from(u16::from_be_bytes([chunk[0], chunk[1]]));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// Folds a one's complement sum to 16 bits.
#[allow(dead_code, reason = "the vxlan kernel tests compute no checksums")]
pub(crate) fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).unwrap()
}
