//! flannel's delegation (for a `delegate.type` other than `bridge`, or
//! bridge features we do not implement): the rendered config is saved to
//! `<dataDir>/<containerID>` before the delegate runs, so DEL can replay it
//! without subnet.env; the delegate's output is passed through unchanged.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::args::Env;
use crate::error::{CniError, CniResult, ErrorCode};
use crate::exec;

/// Budget for a delegated plugin call.
const DELEGATE_TIMEOUT: Duration = Duration::from_secs(120);

/// Where flannel keeps the delegate config of a container.
pub fn saved_path(data_dir: &Path, container_id: &str) -> PathBuf {
    data_dir.join(container_id)
}

/// Saves `config` (dir 0700, file 0600, fsynced) for DEL.
pub fn save(data_dir: &Path, container_id: &str, config: &[u8]) -> CniResult<()> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        CniError::new(ErrorCode::Io, format!("cannot {what} {}", p.display())).with_details(e)
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|e| io("create", data_dir, e))?;
    let path = saved_path(data_dir, container_id);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| io("write", &path, e))?;
    f.write_all(config)
        .and_then(|()| f.sync_all())
        .map_err(|e| io("write", &path, e))
}

/// The saved config, `Ok(None)` if there is none.
pub fn load(data_dir: &Path, container_id: &str) -> CniResult<Option<Vec<u8>>> {
    let path = saved_path(data_dir, container_id);
    match fs::read(&path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::IsADirectory) => Ok(None),
        Err(e) => Err(
            CniError::new(ErrorCode::Io, format!("cannot read {}", path.display())).with_details(e),
        ),
    }
}

/// Runs the delegate named in `config` for `command` with the caller's
/// CNI environment; returns its stdout on success, its own CNI error otherwise.
pub fn invoke(env: &Env, command: &str, config: &[u8]) -> CniResult<Vec<u8>> {
    let parsed: Value = serde_json::from_slice(config).map_err(|e| {
        CniError::new(ErrorCode::Decode, "the delegate config is not JSON").with_details(e)
    })?;
    let plugin_type = parsed.get("type").and_then(Value::as_str).ok_or_else(|| {
        CniError::new(ErrorCode::InvalidConfig, "the delegate config has no type")
    })?;
    if plugin_type.contains('/') || plugin_type.is_empty() {
        return Err(CniError::new(
            ErrorCode::InvalidConfig,
            format!("delegate.type {plugin_type:?} is not a plugin name"),
        ));
    }
    let binary = exec::find_in(&env.path, plugin_type).ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            format!(
                "delegate plugin {plugin_type:?} not found in CNI_PATH ({})",
                env.path
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":")
            ),
        )
    })?;
    let mut cmd = Command::new(&binary);
    cmd.env("CNI_COMMAND", command);
    let done = exec::run(&mut cmd, config, DELEGATE_TIMEOUT)?;
    if done.status.success() {
        return Ok(done.stdout);
    }
    // Pass the delegate's own CNI error on, with its code.
    let err: Option<Value> = serde_json::from_slice(&done.stdout).ok();
    let msg = err
        .as_ref()
        .and_then(|v| v.get("msg"))
        .and_then(Value::as_str)
        .map_or_else(
            || String::from_utf8_lossy(&done.stderr).trim().to_owned(),
            str::to_owned,
        );
    let details = err
        .as_ref()
        .and_then(|v| v.get("details"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    // As flannel (libcni) does: the runtime sees the delegate's code, e.g.
    // 11 to retry later; 100 when the delegate printed none.
    let code = err
        .as_ref()
        .and_then(|v| v.get("code"))
        .and_then(Value::as_u64)
        .and_then(|c| u32::try_from(c).ok())
        .map_or(ErrorCode::Plugin, ErrorCode::from_code);
    Err(CniError::new(
        code,
        format!("delegate {plugin_type} {command} failed: {msg}"),
    )
    .with_details(details))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Runs a fake delegate that prints `stdout` and fails; returns the error.
    fn failing_delegate(stdout: &str) -> CniError {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("fake");
        let script =
            format!("#!/bin/sh\ncat >/dev/null\necho 'to stderr' >&2\necho '{stdout}'\nexit 1\n");
        std::fs::write(&plugin, script).unwrap();
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().display().to_string();
        let env = Env::from_lookup(|name| match name {
            "CNI_COMMAND" => Some("DEL".to_owned()),
            "CNI_PATH" => Some(path.clone()),
            _ => None,
        })
        .unwrap();
        let config = br#"{"cniVersion":"1.0.0","name":"n","type":"fake"}"#;
        invoke(&env, "DEL", config).unwrap_err()
    }

    #[test]
    fn a_delegate_error_keeps_its_code_message_and_details() {
        let e =
            failing_delegate(r#"{"cniVersion":"1.0.0","code":11,"msg":"busy","details":"later"}"#);
        assert_eq!(e.code, ErrorCode::TryAgainLater);
        assert_eq!(e.msg, "delegate fake DEL failed: busy");
        assert_eq!(e.details, "later");
        // A plugin-specific code goes through as it is.
        let e = failing_delegate(r#"{"code":999,"msg":"own"}"#);
        assert_eq!(e.code, ErrorCode::Other(999));
        let json: Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(json["code"], 999);
        // No JSON: code 100 and the delegate's stderr as the message.
        let e = failing_delegate("not json");
        assert_eq!(e.code, ErrorCode::Plugin);
        assert_eq!(e.msg, "delegate fake DEL failed: to stderr");
    }

    #[test]
    fn codes_map_both_ways() {
        for n in [1, 2, 3, 4, 5, 6, 7, 11, 50, 100, 101, 999] {
            assert_eq!(ErrorCode::from_code(n).code(), n);
        }
        assert_eq!(ErrorCode::from_code(11), ErrorCode::TryAgainLater);
        assert_eq!(ErrorCode::from_code(0), ErrorCode::Plugin);
    }
}
