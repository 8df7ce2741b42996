//! TX checksum offload, through the `ethtool` binary (the ethtool netlink
//! family is not in rtnetlink's reach, and this runs once per device).

use std::io;
use std::process::Stdio;
use std::time::Duration;

use super::NetlinkError;

/// How long `ethtool` may take.
const ETHTOOL_TIMEOUT: Duration = Duration::from_secs(5);

/// `ethtool -K <name> tx-checksum-ip-generic off|on`.
///
/// Off is the workaround for the kernel's bad checksums on NAT'ed VXLAN
/// traffic (flannel's 63-second connection delays, kubernetes#88986); flannel
/// only documents it, we apply it when `TxChecksumOffload` is false. Runs in
/// the calling thread's network namespace (the child inherits it).
pub async fn set_tx_checksum_offload(name: &str, enabled: bool) -> Result<(), NetlinkError> {
    let state = if enabled { "on" } else { "off" };
    let failed = |detail: String| NetlinkError::Ethtool {
        device: name.to_owned(),
        state,
        detail,
    };
    let mut command = tokio::process::Command::new("ethtool");
    command
        .args(["-K", name, "tx-checksum-ip-generic", state])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = match tokio::time::timeout(ETHTOOL_TIMEOUT, command.output()).await {
        Err(_) => return Err(failed(format!("no answer within {ETHTOOL_TIMEOUT:?}"))),
        Ok(Err(error)) if error.kind() == io::ErrorKind::NotFound => {
            return Err(NetlinkError::EthtoolMissing {
                device: name.to_owned(),
            });
        }
        Ok(Err(error)) => return Err(failed(format!("cannot run ethtool: {error}"))),
        Ok(Ok(output)) => output,
    };
    if output.status.success() {
        tracing::info!(device = name, state, "set tx-checksum-ip-generic");
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(failed(format!("{}: {}", output.status, stderr.trim())))
    }
}
