//! Running other programs with a deadline: delegated CNI plugins and
//! `iptables`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{CniError, ErrorCode};

/// What a finished program printed and how it ended.
#[derive(Debug)]
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything written to stdout.
    pub stdout: Vec<u8>,
    /// Everything written to stderr.
    pub stderr: Vec<u8>,
}

/// Runs `cmd` with `stdin`, killing it (it is our own child) after `timeout`.
pub fn run(cmd: &mut Command, stdin: &[u8], timeout: Duration) -> Result<Finished, CniError> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    let fail = |what: &str, e: std::io::Error| {
        CniError::new(ErrorCode::Io, format!("{what} {name}")).with_details(e)
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail("cannot run", e))?;
    let mut input = child.stdin.take();
    let data = stdin.to_vec();
    let writer = thread::spawn(move || {
        if let Some(pipe) = input.as_mut() {
            let _ = pipe.write_all(&data);
        }
    });
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let reader = thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(p) = out_pipe.as_mut() {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(p) = err_pipe.as_mut() {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| fail("cannot wait for", e))? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(CniError::plugin(format!(
                "{name} did not finish within {} s and was killed",
                timeout.as_secs()
            )));
        }
        thread::sleep(Duration::from_millis(2));
    };
    let _ = writer.join();
    Ok(Finished {
        status,
        stdout: reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

/// Finds an executable: in `dirs` (for CNI plugins, `CNI_PATH`), else
/// `None`.
pub fn find_in(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
