//! One module per CNI command; [`run`] dispatches.

mod add;
mod check;
mod del;

use std::fs::File;
use std::io::ErrorKind;
use std::path::Path;

use serde_json::json;
use subnet::subnet_env::{SubnetEnv, SubnetEnvError};

use crate::args::{Command, Env};
use crate::config::{PluginConfig, sniff_version};
use crate::error::{CniError, CniResult, ErrorCode};
use crate::ipam::{Ipam, Owner};
use crate::version::{LATEST, SUPPORTED_VERSIONS, Version};

/// Runs one CNI call; returns what goes to stdout on success.
pub fn run(env: &Env, stdin: &[u8]) -> CniResult<Option<String>> {
    if env.command == Command::Version {
        return Ok(Some(version(stdin)));
    }
    let conf = PluginConfig::parse(stdin)?;
    match env.command {
        Command::Add => add::add(env, &conf).map(Some),
        Command::Del => del::del(env, &conf).map(|()| None),
        Command::Check => check::check(env, &conf).map(|()| None),
        Command::Gc => gc(&conf).map(|()| None),
        Command::Status => status(&conf).map(|()| None),
        Command::Version => Ok(Some(version(stdin))),
    }
}

/// VERSION: answers in the requested version when we support it.
fn version(stdin: &[u8]) -> String {
    let asked = sniff_version(stdin)
        .and_then(|v| Version::parse(&v).ok())
        .map_or(LATEST, Version::as_str);
    json!({"cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS}).to_string()
}

/// STATUS: ready exactly when subnet.env is complete.
fn status(conf: &PluginConfig) -> CniResult<()> {
    SubnetEnv::read_complete(&conf.subnet_file)
        .map(|_| ())
        .map_err(|e| {
            CniError::new(
                ErrorCode::NotAvailable,
                format!("the flannel network is not available on this node: {e}"),
            )
        })
}

/// GC: releases the addresses of attachments the runtime no longer has.
fn gc(conf: &PluginConfig) -> CniResult<()> {
    let valid = conf.valid_attachments.as_deref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "GC needs cni.dev/valid-attachments (an empty list releases everything)",
        )
    })?;
    let ipam = Ipam::lock(&conf.data_dir)?;
    ipam.gc(&conf.name, valid)?;
    Ok(())
}

/// Reads subnet.env for ADD and CHECK: missing is "try again later" (the
/// runtime retries; flanneld is probably still starting).
fn read_subnet_env(path: &Path) -> CniResult<SubnetEnv> {
    SubnetEnv::read_complete(path).map_err(|e| match e {
        SubnetEnvError::NotFound { .. } => CniError::new(ErrorCode::TryAgainLater, e.to_string()),
        other => CniError::plugin(other.to_string()),
    })
}

/// The owner of this call's address.
fn owner(env: &Env, conf: &PluginConfig) -> CniResult<Owner> {
    Ok(Owner {
        network: conf.name.clone(),
        container_id: env.require_container_id()?.to_owned(),
        ifname: env.require_ifname()?.to_owned(),
    })
}

/// Opens the container's network namespace; `Ok(None)` if it is gone.
fn open_netns(path: &Path) -> CniResult<Option<File>> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CniError::new(
            ErrorCode::Io,
            format!("cannot open network namespace {}", path.display()),
        )
        .with_details(e)),
    }
}
