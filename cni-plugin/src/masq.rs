//! `ipMasq`: when flanneld does not masquerade (`FLANNEL_IPMASQ=false`),
//! traffic from the node subnet to anywhere but the subnet itself (and
//! multicast) is masqueraded, as the bridge plugin's `ipMasq` does. The
//! reference plugin adds one chain per container; one chain per node subnet
//! does the same job with one check per ADD.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ipnetwork::Ipv4Network;

use crate::error::{CniError, CniResult};
use crate::exec;

/// Budget for one iptables command (it waits up to 5 s for the xtables lock).
const IPTABLES_TIMEOUT: Duration = Duration::from_secs(10);

/// The chain for `network`'s masquerade rules, stable across calls and at
/// most 28 characters (iptables' limit).
pub fn chain_name(network: &str, subnet: Ipv4Network) -> String {
    // FNV-1a: a stable hash without a dependency.
    let mut h: u32 = 0x811c_9dc5;
    for b in network.bytes().chain(subnet.to_string().bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("CNI-FLANNEL-{h:08x}")
}

fn iptables() -> PathBuf {
    ["/usr/sbin/iptables", "/sbin/iptables", "/usr/bin/iptables"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("iptables"))
}

fn iptables_run(args: &[&str]) -> CniResult<bool> {
    let mut cmd = Command::new(iptables());
    cmd.args(["-w", "5", "-t", "nat"]).args(args);
    let done = exec::run(&mut cmd, b"", IPTABLES_TIMEOUT)?;
    Ok(done.status.success())
}

/// Makes sure `POSTROUTING -s <subnet> -j <chain>` and the chain's two rules
/// exist. Callers serialize this (under the IPAM lock).
pub fn ensure(network: &str, subnet: Ipv4Network) -> CniResult<()> {
    let chain = chain_name(network, subnet);
    let source = subnet.to_string();
    let comment = format!("flannel-cni masquerade for network {network}");
    let jump = [
        "POSTROUTING",
        "-s",
        &source,
        "-m",
        "comment",
        "--comment",
        &comment,
        "-j",
        &chain,
    ];
    let mut check = vec!["-C"];
    check.extend_from_slice(&jump);
    if iptables_run(&check)? {
        return Ok(());
    }
    // Missing (first container, or rules flushed): rebuild the chain.
    let _ = iptables_run(&["-N", &chain])?;
    let steps: [Vec<&str>; 3] = [
        vec!["-F", &chain],
        vec!["-A", &chain, "-d", &source, "-j", "ACCEPT"],
        vec!["-A", &chain, "!", "-d", "224.0.0.0/4", "-j", "MASQUERADE"],
    ];
    for step in &steps {
        if !iptables_run(step)? {
            return Err(CniError::plugin(format!(
                "ipMasq: `iptables -t nat {}` failed",
                step.join(" ")
            )));
        }
    }
    let mut append = vec!["-A"];
    append.extend_from_slice(&jump);
    if !iptables_run(&append)? {
        return Err(CniError::plugin(format!(
            "ipMasq: `iptables -t nat {}` failed",
            append.join(" ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_are_stable_short_and_distinct() {
        let s: Ipv4Network = "10.244.1.0/24".parse().unwrap();
        let a = chain_name("cbr0", s);
        assert_eq!(a, chain_name("cbr0", s));
        assert!(a.len() <= 28, "{a}");
        assert_ne!(a, chain_name("other", s));
    }
}
