//! flannel's iptables rules: FORWARD accepts for the flannel network
//! (`--iptables-forward-rules`) and masquerading (`--ip-masq`), each in a
//! chain of its own, checked every `--iptables-resync` seconds.
//!
//! Unlike flannel, the check also counts the rules in our chains, so a
//! duplicated or stray rule makes us rebuild the chain (flannel#1337), and a
//! failed setup is retried at the next check instead of being given up on.

use std::time::Duration;

use ipnetwork::Ipv4Network;
use tokio::process::Command;
use tracing::{debug, info, warn};

/// How long one iptables call may take (it waits up to 5 s for the xtables lock).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// One chain of ours, the rules in it, and where it is jumped to from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuleSet {
    /// `filter` or `nat`.
    pub(crate) table: &'static str,
    /// The built-in chain that jumps to ours.
    pub(crate) parent: &'static str,
    /// Our chain.
    pub(crate) chain: &'static str,
    /// Rule specifications (after `-A <chain>`), in order.
    pub(crate) rules: Vec<Vec<String>>,
    /// The comment on every rule (and the jump).
    pub(crate) comment: &'static str,
}

fn rule(parts: &[&str], comment: &str, target: &[&str]) -> Vec<String> {
    let mut spec: Vec<String> = parts.iter().map(|p| (*p).to_owned()).collect();
    spec.extend(["-m", "comment", "--comment", comment].map(str::to_owned));
    spec.extend(target.iter().map(|p| (*p).to_owned()));
    spec
}

/// `FLANNEL-FWD`: accept traffic from and to the flannel network.
pub(crate) fn forward_rules(network: Ipv4Network) -> RuleSet {
    let net = network.to_string();
    let comment = "flanneld forward";
    RuleSet {
        table: "filter",
        parent: "FORWARD",
        chain: "FLANNEL-FWD",
        rules: vec![
            rule(&["-s", &net], comment, &["-j", "ACCEPT"]),
            rule(&["-d", &net], comment, &["-j", "ACCEPT"]),
        ],
        comment,
    }
}

/// `FLANNEL-POSTRTG`: flannel's masquerade rules for `pod_subnet` (ours) in `network`.
pub(crate) fn masquerade_rules(
    network: Ipv4Network,
    pod_subnet: Ipv4Network,
    fully_random: bool,
) -> RuleSet {
    let net = network.to_string();
    let pod = pod_subnet.to_string();
    let comment = "flanneld masq";
    let masq: &[&str] = if fully_random {
        &["-j", "MASQUERADE", "--random-fully"]
    } else {
        &["-j", "MASQUERADE"]
    };
    RuleSet {
        table: "nat",
        parent: "POSTROUTING",
        chain: "FLANNEL-POSTRTG",
        rules: vec![
            // Already marked by kube-proxy for masquerading: don't do it twice.
            rule(
                &["-m", "mark", "--mark", "0x4000/0x4000"],
                comment,
                &["-j", "RETURN"],
            ),
            rule(&["-s", &pod, "-d", &net], comment, &["-j", "RETURN"]),
            rule(&["-s", &net, "-d", &pod], comment, &["-j", "RETURN"]),
            rule(&["!", "-s", &net, "-d", &pod], comment, &["-j", "RETURN"]),
            rule(&["-s", &net, "!", "-d", "224.0.0.0/4"], comment, masq),
            rule(&["!", "-s", &net, "-d", &net], comment, masq),
        ],
        comment,
    }
}

/// Runs `iptables -w 5 <args>`; `Ok(true)` on exit 0, `Ok(false)` for a `-C`
/// check that did not match, an error otherwise.
async fn iptables(args: &[String]) -> Result<bool, String> {
    let mut command = Command::new("iptables");
    command.arg("-w").arg("5").args(args).kill_on_drop(true);
    let output = tokio::time::timeout(CALL_TIMEOUT, command.output())
        .await
        .map_err(|_| format!("iptables {} timed out", args.join(" ")))?
        .map_err(|e| format!("cannot run iptables (install the iptables package): {e}"))?;
    match output.status.code() {
        Some(0) => Ok(true),
        // A check fails with 1 for a missing rule and 2 for a missing chain
        // or jump target: both mean "not in place".
        Some(1 | 2) if args.iter().any(|a| a == "-C") => Ok(false),
        _ => Err(format!(
            "iptables {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )),
    }
}

fn args(table: &str, op: &str, chain: &str, spec: &[String]) -> Vec<String> {
    let mut all = vec![
        "-t".to_owned(),
        table.to_owned(),
        op.to_owned(),
        chain.to_owned(),
    ];
    all.extend(spec.iter().cloned());
    all
}

impl RuleSet {
    fn jump(&self) -> Vec<String> {
        rule(&[], self.comment, &["-j", self.chain])
    }

    /// Whether every rule is in place, in a chain holding nothing else.
    pub(crate) async fn is_intact(&self) -> Result<bool, String> {
        if !iptables(&args(self.table, "-C", self.parent, &self.jump())).await? {
            return Ok(false);
        }
        for spec in &self.rules {
            if !iptables(&args(self.table, "-C", self.chain, spec)).await? {
                return Ok(false);
            }
        }
        let count = self.rule_count().await?;
        Ok(count == self.rules.len())
    }

    async fn rule_count(&self) -> Result<usize, String> {
        let mut command = Command::new("iptables");
        command
            .args(["-w", "5", "-t", self.table, "-S", self.chain])
            .kill_on_drop(true);
        let output = tokio::time::timeout(CALL_TIMEOUT, command.output())
            .await
            .map_err(|_| "iptables -S timed out".to_owned())?
            .map_err(|e| format!("cannot run iptables: {e}"))?;
        let text = String::from_utf8_lossy(&output.stdout);
        Ok(text.lines().filter(|l| l.starts_with("-A ")).count())
    }

    /// Creates the chain if needed, refills it in order, and adds the jump
    /// from the parent chain once.
    pub(crate) async fn install(&self) -> Result<(), String> {
        // -N fails if the chain exists; that is fine.
        let _ = iptables(&["-t", self.table, "-N", self.chain].map(str::to_owned)).await;
        iptables(&["-t", self.table, "-F", self.chain].map(str::to_owned)).await?;
        for spec in &self.rules {
            iptables(&args(self.table, "-A", self.chain, spec)).await?;
        }
        // Remove duplicate jumps, then add exactly one.
        while iptables(&args(self.table, "-C", self.parent, &self.jump())).await? {
            iptables(&args(self.table, "-D", self.parent, &self.jump())).await?;
        }
        iptables(&args(self.table, "-A", self.parent, &self.jump())).await?;
        Ok(())
    }

    /// Installs the rules unless they are intact; returns whether it had to.
    pub(crate) async fn ensure(&self) -> Result<bool, String> {
        if self.is_intact().await? {
            debug!(chain = self.chain, "iptables rules intact");
            return Ok(false);
        }
        self.install().await?;
        info!(
            table = self.table,
            chain = self.chain,
            "installed iptables rules"
        );
        Ok(true)
    }
}

/// Checks `sets` every `interval`, forever, restoring what is missing;
/// `on_check` learns after each round whether every set is in place.
pub(crate) async fn keep(sets: Vec<RuleSet>, interval: Duration, on_check: impl Fn(bool)) {
    loop {
        tokio::time::sleep(interval).await;
        on_check(ensure_all(&sets).await);
    }
}

/// Ensures every set; `true` if all are in place afterwards.
pub(crate) async fn ensure_all(sets: &[RuleSet]) -> bool {
    let mut ok = true;
    for set in sets {
        if let Err(error) = set.ensure().await {
            warn!(chain = set.chain, %error, "cannot install iptables rules; retrying at the next check");
            ok = false;
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masquerade_rules_match_flannels() {
        let set = masquerade_rules(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
            true,
        );
        let text: Vec<String> = set.rules.iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            text,
            [
                "-m mark --mark 0x4000/0x4000 -m comment --comment flanneld masq -j RETURN",
                "-s 10.244.1.0/24 -d 10.244.0.0/16 -m comment --comment flanneld masq -j RETURN",
                "-s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment flanneld masq -j RETURN",
                "! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment flanneld masq -j RETURN",
                "-s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment flanneld masq -j MASQUERADE --random-fully",
                "! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment flanneld masq -j MASQUERADE --random-fully",
            ]
        );
        assert_eq!(set.parent, "POSTROUTING");
        assert_eq!(set.table, "nat");
    }

    #[test]
    fn forward_rules_match_flannels() {
        let set = forward_rules("10.244.0.0/16".parse().unwrap());
        let text: Vec<String> = set.rules.iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            text,
            [
                "-s 10.244.0.0/16 -m comment --comment flanneld forward -j ACCEPT",
                "-d 10.244.0.0/16 -m comment --comment flanneld forward -j ACCEPT",
            ]
        );
    }
}
