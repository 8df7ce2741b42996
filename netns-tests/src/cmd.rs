//! Running external commands: every one with a timeout, captured output, and
//! kills only ever aimed at a child of ours by its own PID.
//!
//! Long-running daemons (etcd, flanneld) are spawned by [`spawn_daemon`],
//! which wraps them in `setpriv --pdeathsig KILL` from one long-lived thread:
//! if the test process dies without running its drop guards (nextest's
//! timeout, SIGKILL), the kernel kills the daemons too instead of leaving
//! them running in a namespace nobody owns any more.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{HarnessError, Result};

/// Timeout of one `ip`, `bridge` or `sysctl` invocation.
pub const IP_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of [`crate::Node::exec`] and [`crate::Container::exec`].
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child may take to be reaped after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long to wait for the output pipes after the child exited (a
/// grandchild could hold them open).
const PIPE_GRACE: Duration = Duration::from_secs(2);
/// How many bytes at the end of a log [`log_tail`] reads at most.
const TAIL_BYTES: u64 = 256 * 1024;

/// The command line of `cmd` for messages: program and arguments, lossy.
pub fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs `cmd` with stdin closed and stdout/stderr captured. If it has not
/// exited after `timeout`, kills it (SIGKILL to its PID, then reaps it) and
/// returns [`HarnessError::CommandTimeout`]. The exit status is not checked:
/// see [`run_ok`].
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    run_with_input(cmd, None, timeout)
}

/// Like [`run`], with `input` written to the command's stdin (then closed).
pub fn run_with_input(
    cmd: &mut Command,
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output> {
    let desc = describe(cmd);
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| HarnessError::Spawn {
            cmd: desc.clone(),
            source,
        })?;
    if let (Some(mut pipe), Some(data)) = (child.stdin.take(), input) {
        let data = data.to_vec();
        // A writer thread: a child that does not read its stdin must not block us.
        thread::spawn(move || {
            use std::io::Write;
            let _ = pipe.write_all(&data);
        });
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    match wait_child(&mut child, timeout) {
        Ok(Some(status)) => Ok(Output {
            status,
            stdout: stdout.recv_timeout(PIPE_GRACE).unwrap_or_default(),
            stderr: stderr.recv_timeout(PIPE_GRACE).unwrap_or_default(),
        }),
        Ok(None) => {
            let pid = child.id();
            kill_and_reap(&mut child);
            Err(HarnessError::CommandTimeout {
                cmd: desc,
                timeout,
                pid,
            })
        }
        Err(source) => {
            kill_and_reap(&mut child);
            Err(HarnessError::io(
                format!("cannot wait for `{desc}`"),
                source,
            ))
        }
    }
}

/// Like [`run`], but an unsuccessful exit is [`HarnessError::CommandFailed`];
/// returns stdout as (lossy) text.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let out = run(cmd, timeout)?;
    check(cmd, out)
}

/// Turns an unsuccessful `out` of `cmd` into [`HarnessError::CommandFailed`];
/// returns stdout as (lossy) text.
pub(crate) fn check(cmd: &Command, out: Output) -> Result<String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(failed(&describe(cmd), &out))
    }
}

/// The [`HarnessError::CommandFailed`] of `out`.
pub(crate) fn failed(cmd: &str, out: &Output) -> HarnessError {
    HarnessError::CommandFailed {
        cmd: cmd.to_owned(),
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `ip <args>` (timeout [`IP_TIMEOUT`]) and returns its stdout; an
/// unsuccessful exit is an error.
pub fn ip<I, S>(args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_ok(Command::new("ip").args(args), IP_TIMEOUT)
}

/// Reads `pipe` to its end on a thread; the receiver gets the bytes.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            // A read error just ends the captured output early.
            let _ = pipe.read_to_end(&mut buf);
        }
        // The receiver may have given up waiting; nothing to do then.
        let _ = tx.send(buf);
    });
    rx
}

/// Waits for `child` to exit, at most `timeout`; `Ok(None)` if it still runs.
pub(crate) fn wait_child(
    child: &mut Child,
    timeout: Duration,
) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// SIGKILLs our (unreaped) child by its PID and reaps it, at most
/// [`KILL_WAIT`]. Returns its exit status if it was reaped.
pub(crate) fn kill_and_reap(child: &mut Child) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    // Fails only if it has exited meanwhile; the wait below reaps it then.
    let _ = child.kill();
    wait_child(child, KILL_WAIT).ok().flatten()
}

/// Sends `signal` (a name such as `TERM`, `KILL`, `HUP`, `USR1`) to our child
/// by its PID with `kill -s`. Refuses if the child has exited already: once
/// reaped its PID may belong to somebody else. (Between this check and the
/// signal the child can only become a zombie, which still holds the PID.)
pub(crate) fn signal_child(child: &mut Child, signal: &str) -> Result<()> {
    if !signal.bytes().all(|b| b.is_ascii_alphanumeric()) || signal.is_empty() {
        return Err(HarnessError::Invalid(format!(
            "signal name {signal:?}: use a name such as TERM, KILL, HUP"
        )));
    }
    let pid = child.id();
    match child.try_wait() {
        Ok(None) => {}
        Ok(Some(status)) => {
            return Err(HarnessError::Invalid(format!(
                "cannot send SIG{signal} to pid {pid}: it exited already ({status})"
            )));
        }
        Err(source) => {
            return Err(HarnessError::io(format!("cannot check pid {pid}"), source));
        }
    }
    if signal == "KILL" || signal == "9" {
        return child
            .kill()
            .map_err(|e| HarnessError::io(format!("cannot SIGKILL pid {pid}"), e));
    }
    run_ok(
        Command::new("kill").args(["-s", signal, &pid.to_string()]),
        IP_TIMEOUT,
    )
    .map(drop)
}

/// SIGTERM to our child, up to `grace` for it to exit, then SIGKILL. Returns
/// the exit status (`None` only if it could not be reaped even after SIGKILL).
pub(crate) fn terminate(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    // If `kill` fails the SIGKILL below still ends the child.
    let _ = signal_child(child, "TERM");
    if let Ok(Some(status)) = wait_child(child, grace) {
        return Some(status);
    }
    kill_and_reap(child)
}

/// A request to the daemon-spawning thread.
type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// The long-lived thread that forks every daemon (see the module docs: a
/// parent-death signal fires when the *thread* that forked exits).
fn spawner() -> &'static mpsc::Sender<SpawnRequest> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        let spawned = thread::Builder::new()
            .name("netns-tests-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    // The requester may have gone; then the child is dropped
                    // unreaped, which cannot happen in practice (it waits).
                    let _ = reply.send(cmd.spawn());
                }
            });
        if let Err(e) = spawned {
            // Requests then fail with "spawner is gone" below.
            eprintln!("netns-tests: cannot start the spawner thread: {e}");
        }
        tx
    })
}

/// Whether `setpriv` (util-linux) is available to set a parent-death signal.
fn have_setpriv() -> bool {
    static HAVE: OnceLock<bool> = OnceLock::new();
    *HAVE.get_or_init(|| {
        let ok = run(Command::new("setpriv").arg("--version"), IP_TIMEOUT)
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!(
                "netns-tests: setpriv (util-linux) not found; daemons will not die with \
                 the test process if it is killed"
            );
        }
        ok
    })
}

/// A command that runs `program` inside network namespace `netns` as a
/// daemon: `setpriv --pdeathsig KILL -- ip netns exec <netns> <program>`.
/// `setpriv` and `ip netns exec` both exec, so the child's PID is the
/// daemon's own. Add arguments, environment and stdio, then
/// [`spawn_daemon`] it.
pub(crate) fn netns_daemon_command(netns: &str, program: &OsStr) -> Command {
    let mut cmd = if have_setpriv() {
        let mut c = Command::new("setpriv");
        c.args(["--pdeathsig", "KILL", "--", "ip"]);
        c
    } else {
        Command::new("ip")
    };
    cmd.args(["netns", "exec", netns]).arg(program);
    cmd
}

/// Spawns `cmd` (from [`netns_daemon_command`]) on the spawner thread, with
/// stdin closed and stdout and stderr appended to `log`.
pub(crate) fn spawn_daemon(mut cmd: Command, log: &Path) -> Result<Child> {
    let desc = describe(&cmd);
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| HarnessError::io(format!("cannot open log {}", log.display()), e))?;
    let err = out
        .try_clone()
        .map_err(|e| HarnessError::io(format!("cannot dup log {}", log.display()), e))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let gone = || HarnessError::Spawn {
        cmd: desc.clone(),
        source: std::io::Error::other("the netns-tests spawner thread is gone"),
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner().send((cmd, reply_tx)).map_err(|_| gone())?;
    reply_rx
        .recv_timeout(IP_TIMEOUT)
        .map_err(|_| gone())?
        .map_err(|source| HarnessError::Spawn {
            cmd: desc.clone(),
            source,
        })
}

/// The last `lines` lines of the file at `path` (at most the last 256 KiB
/// are read), or a note saying why there is none.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("<no log at {}: {e}>", path.display()),
    };
    let len = file.metadata().map_or(0, |m| m.len());
    if file
        .seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))
        .is_err()
    {
        return format!("<cannot seek in {}>", path.display());
    }
    let mut buf = Vec::new();
    if let Err(e) = file.read_to_end(&mut buf) {
        return format!("<cannot read {}: {e}>", path.display());
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_captures_output_and_status() {
        let out = run(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status.code(), Some(3));
    }

    #[test]
    fn run_kills_on_timeout() {
        let start = Instant::now();
        let err = run(Command::new("sleep").arg("30"), Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, HarnessError::CommandTimeout { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn run_ok_reports_failure() {
        let err = run_ok(Command::new("false").arg("x"), Duration::from_secs(10)).unwrap_err();
        assert!(err.to_string().contains("`false x` failed"), "{err}");
    }

    #[test]
    fn tail_returns_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "a\nb\nc\nd\n").unwrap();
        assert_eq!(log_tail(&path, 2), "c\nd");
        assert_eq!(log_tail(&path, 10), "a\nb\nc\nd");
        assert!(log_tail(&dir.path().join("none"), 3).starts_with("<no log"));
    }
}
