//! The one error type of the harness.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// Shorthand for results of harness operations.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// Why a harness operation failed. Every variant's message is meant to be
/// read by a person looking at a failed test: it names the command, the
/// namespace or the file, and carries the output or log tail that explains it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// An external command could not be started (missing binary, ...).
    #[error("cannot run `{cmd}`: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An external command did not finish in time and was killed.
    #[error("`{cmd}` did not finish within {timeout:?}; killed it (pid {pid})")]
    CommandTimeout {
        /// The command line.
        cmd: String,
        /// The timeout that expired.
        timeout: Duration,
        /// The PID that was killed.
        pid: u32,
    },
    /// An external command exited unsuccessfully.
    #[error("`{cmd}` failed ({status}):\nstdout: {stdout}\nstderr: {stderr}")]
    CommandFailed {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its standard output (lossy UTF-8).
        stdout: String,
        /// Its standard error (lossy UTF-8).
        stderr: String,
    },
    /// A wait for a condition ran out of time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    WaitTimeout {
        /// What was waited for, with whatever detail explains the failure.
        what: String,
        /// How long it waited.
        timeout: Duration,
    },
    /// A file system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The harness needs root (it creates network namespaces).
    #[error(
        "the cluster tests must run as root (they create network namespaces, veths and \
         bridges); run them with sudo"
    )]
    NotRoot,
    /// The flanneld binary does not exist.
    #[error(
        "flanneld binary {} not found; build it first: cargo build -p flanneld \
         (or point the FLANNELD environment variable at it)",
        .path.display()
    )]
    FlanneldMissing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A process the harness started exited when it should be running.
    #[error("{what} exited with {status}; log tail ({}):\n{tail}", .log.display())]
    ProcessExited {
        /// Which process (`etcd member 0 in ft12x0-etcd`, `flanneld on ft12x0-n1`).
        what: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },
    /// The output of a tool did not have the expected shape.
    #[error("cannot parse {what}: {reason}; the text was:\n{text}")]
    Parse {
        /// What was being parsed.
        what: String,
        /// What was wrong with it.
        reason: String,
        /// The text itself.
        text: String,
    },
    /// The harness was asked for something it cannot do (a bad spec, a
    /// member index out of range, starting a process that runs already).
    #[error("invalid use of the test harness: {0}")]
    Invalid(String),
    /// Every underlay /24 is taken by live test processes.
    #[error(
        "no free underlay /24: all of 198.18.0.0/24 ..= 198.18.255.0/24 are locked by \
         live test processes"
    )]
    UnderlayExhausted,
}

impl HarnessError {
    /// An [`HarnessError::Io`] with a context message.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
