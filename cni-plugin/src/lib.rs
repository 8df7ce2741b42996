//! The `flannel` CNI plugin: attaches containers to the node's flannel
//! subnet (read from `subnet.env`) with a bridge, a veth pair and its own
//! IPAM, all in one process; a drop-in for flannel's plugin and its
//! conflist (`delegate`, `subnetFile`, `dataDir`, `ipam.routes`).
//!
//! - [`args`]: the CNI environment; [`config`]: the network config and what
//!   it resolves to; [`result`] and [`version`]: results in every supported
//!   spec version; [`error`]: CNI error JSON.
//! - [`ipam`]: crash-safe, file-locked address allocation under `dataDir`.
//! - [`netlink`] and [`links`]: the kernel objects; [`masq`]: `ipMasq`.
//! - [`delegate`]: flannel-style delegation to another plugin.
//! - [`commands`]: ADD, DEL, CHECK, GC, STATUS, VERSION.

pub mod args;
pub mod commands;
pub mod config;
pub mod delegate;
pub mod error;
pub mod exec;
pub mod ipam;
pub mod links;
pub mod masq;
pub mod netlink;
pub mod result;
pub mod version;

use args::Env;
use config::sniff_version;
use version::{LATEST, Version};

/// What the process prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// stdout (a result, VERSION's answer, an error JSON, or nothing).
    pub stdout: String,
    /// True if the call succeeded (exit 0).
    pub success: bool,
}

/// Runs one plugin invocation: the environment through `var`, stdin bytes.
pub fn run(var: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    let result = Env::from_lookup(var).and_then(|env| commands::run(&env, stdin));
    match result {
        Ok(out) => Outcome {
            stdout: out.unwrap_or_default(),
            success: true,
        },
        Err(e) => {
            let version = sniff_version(stdin)
                .filter(|v| Version::parse(v).is_ok())
                .unwrap_or_else(|| LATEST.to_owned());
            Outcome {
                stdout: e.to_json(&version),
                success: false,
            }
        }
    }
}
