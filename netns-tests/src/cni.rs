//! The real CNI plugin (`flannel`), called the way runtimes call it: from
//! the node's network namespace, with the CNI environment and the network
//! config on stdin.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::cmd::{describe, run_with_input};
use crate::error::{HarnessError, Result};

/// Environment variable naming the plugin binary to test instead of the
/// workspace's `target/debug/flannel`.
pub const CNI_PLUGIN_ENV: &str = "FLANNEL_CNI";

/// Budget of one plugin call.
pub const CNI_TIMEOUT: Duration = Duration::from_secs(30);

/// The network name the harness's own containers use.
pub const HARNESS_NETWORK: &str = "netns-tests";

/// Where the plugin binary is: `$FLANNEL_CNI`, else
/// `$CARGO_TARGET_DIR/debug/flannel`, else `<workspace>/target/debug/flannel`.
pub fn cni_plugin_binary() -> PathBuf {
    if let Some(path) = std::env::var_os(CNI_PLUGIN_ENV) {
        return PathBuf::from(path);
    }
    crate::node::target_dir().join("debug").join("flannel")
}

/// A flannel conflist entry (what a runtime passes on stdin): `name`,
/// `cniVersion`, our `subnetFile` and `dataDir`, and the shipped conflist's
/// delegate (`hairpinMode`, `isDefaultGateway`).
pub fn flannel_config(name: &str, version: &str, subnet_file: &Path, data_dir: &Path) -> Value {
    json!({
        "cniVersion": version,
        "name": name,
        "type": "flannel",
        "subnetFile": subnet_file,
        "dataDir": data_dir,
        "delegate": {"hairpinMode": true, "isDefaultGateway": true},
    })
}

/// One call's CNI environment.
#[derive(Debug, Clone, Default)]
pub struct CniCall {
    /// `CNI_COMMAND`.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS` (a path, or empty).
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`.
    pub args: String,
}

impl CniCall {
    /// `command` for container `id` in namespace `/run/netns/<netns>`, `eth0`.
    pub fn new(command: &str, id: &str, netns: &str) -> Self {
        Self {
            command: command.to_owned(),
            container_id: id.to_owned(),
            netns: if netns.is_empty() {
                String::new()
            } else {
                format!("/run/netns/{netns}")
            },
            ifname: "eth0".to_owned(),
            args: String::new(),
        }
    }
}

/// What the plugin printed and whether it succeeded.
#[derive(Debug, Clone)]
pub struct CniOutput {
    /// Exit status 0.
    pub success: bool,
    /// stdout.
    pub stdout: String,
    /// stderr.
    pub stderr: String,
}

impl CniOutput {
    /// stdout as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout).map_err(|e| {
            HarnessError::Invalid(format!("plugin output is not JSON ({e}): {}", self.stdout))
        })
    }

    /// The CNI error code, if stdout is an error.
    pub fn error_code(&self) -> Option<u64> {
        self.json().ok()?.get("code")?.as_u64()
    }

    /// Ok for a successful call, else an error with the output.
    pub fn succeeded(&self) -> Result<()> {
        if self.success {
            Ok(())
        } else {
            Err(HarnessError::Invalid(format!(
                "CNI call failed: {} {}",
                self.stdout, self.stderr
            )))
        }
    }

    /// The result JSON of a successful call, else an error with the output.
    pub fn result(&self) -> Result<Value> {
        if self.success {
            self.json()
        } else {
            Err(HarnessError::Invalid(format!(
                "CNI call failed: {} {}",
                self.stdout, self.stderr
            )))
        }
    }
}

/// Runs `plugin` with `call`'s environment and `stdin`, inside `node_netns`
/// (through `nsenter --net`, as podman does) or in our own namespace.
pub fn cni_exec(
    node_netns: Option<&str>,
    plugin: &Path,
    call: &CniCall,
    stdin: &Value,
) -> Result<CniOutput> {
    let mut cmd = match node_netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg(plugin);
            c
        }
        None => Command::new(plugin),
    };
    let path = plugin
        .parent()
        .map_or_else(String::new, |d| format!("{}:/usr/lib/cni", d.display()));
    cmd.env("CNI_COMMAND", &call.command)
        .env("CNI_CONTAINERID", &call.container_id)
        .env("CNI_NETNS", &call.netns)
        .env("CNI_IFNAME", &call.ifname)
        .env("CNI_ARGS", &call.args)
        .env("CNI_PATH", path);
    let input = stdin.to_string();
    let out = run_with_input(&mut cmd, Some(input.as_bytes()), CNI_TIMEOUT)
        .map_err(|e| HarnessError::Invalid(format!("{} {}: {e}", call.command, describe(&cmd))))?;
    Ok(CniOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
