//! Probing: ping from a namespace, and polling waits with a timeout.

use std::net::Ipv4Addr;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::cmd::{describe, failed, run};
use crate::error::{HarnessError, Result};

/// Slack on top of `count * interval` for [`ping`]'s overall timeout.
const PING_SLACK: Duration = Duration::from_secs(10);

/// The summary of one ping run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PingStats {
    /// Echo requests sent.
    pub transmitted: u32,
    /// Echo replies received.
    pub received: u32,
    /// Loss as ping reports it (0.0 ..= 100.0).
    pub loss_percent: f64,
    /// The average round-trip time; `None` if nothing came back.
    pub rtt_avg_ms: Option<f64>,
}

impl PingStats {
    /// Whether every request was answered.
    pub fn all_received(&self) -> bool {
        self.transmitted > 0 && self.received == self.transmitted
    }
}

/// Pings `to` from inside `from_netns`: `ping -c <count> -i <interval> -W 1
/// -q`, with an overall timeout of `count * interval + 10 s`. Losing
/// packets is not an error (look at the stats); ping failing outright
/// without a summary (`Network is unreachable`, ...) is.
pub fn ping(from_netns: &str, to: Ipv4Addr, count: u32, interval: Duration) -> Result<PingStats> {
    if count == 0 {
        return Err(HarnessError::Invalid("ping with count 0".into()));
    }
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", from_netns, "ping", "-n", "-q", "-W", "1"])
        .arg("-c")
        .arg(count.to_string())
        .arg("-i")
        .arg(format!("{:.3}", interval.as_secs_f64()))
        .arg(to.to_string());
    let timeout = interval.saturating_mul(count) + PING_SLACK;
    let out = run(&mut cmd, timeout)?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_ping_summary(&text).map_err(|e| match out.status.success() {
        true => e,
        false => failed(&describe(&cmd), &out),
    })
}

/// Parses iputils ping's summary (`N packets transmitted, M received, [+E
/// errors, ]X% packet loss, ...` and the optional `rtt min/avg/max/mdev`
/// line).
pub fn parse_ping_summary(text: &str) -> Result<PingStats> {
    let bad = |reason: &str| HarnessError::Parse {
        what: "ping summary".into(),
        reason: reason.into(),
        text: text.into(),
    };
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .ok_or_else(|| bad("no `packets transmitted` line"))?;
    let mut transmitted = None;
    let mut received = None;
    let mut loss_percent = None;
    for part in line.split(',').map(str::trim) {
        if let Some(n) = part.strip_suffix(" packets transmitted") {
            transmitted = n.parse().ok();
        } else if let Some(n) = part.strip_suffix(" received") {
            received = n.parse().ok();
        } else if let Some(n) = part.strip_suffix("% packet loss") {
            loss_percent = n.parse().ok();
        }
    }
    let rtt_avg_ms = match text
        .lines()
        .find(|l| l.starts_with("rtt ") || l.starts_with("round-trip"))
    {
        Some(l) => {
            let values = l
                .split_once('=')
                .map(|(_, v)| v.trim())
                .ok_or_else(|| bad("rtt line without `=`"))?;
            let avg = values
                .split('/')
                .nth(1)
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| bad("rtt line without an average"))?;
            Some(avg)
        }
        None => None,
    };
    Ok(PingStats {
        transmitted: transmitted.ok_or_else(|| bad("no transmitted count"))?,
        received: received.ok_or_else(|| bad("no received count"))?,
        loss_percent: loss_percent.ok_or_else(|| bad("no packet loss"))?,
        rtt_avg_ms,
    })
}

/// Calls `cond` every `poll` until it returns `true`; after `timeout`
/// returns [`HarnessError::WaitTimeout`].
pub fn wait_until(timeout: Duration, poll: Duration, cond: impl FnMut() -> bool) -> Result<()> {
    wait_for("a condition", timeout, poll, cond)
}

/// [`wait_until`] with a description of what is waited for, for the error.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    poll: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(HarnessError::WaitTimeout {
                what: what.to_owned(),
                timeout,
            });
        }
        thread::sleep(poll.min(deadline - now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_success() {
        let text = "PING 198.18.3.11 (198.18.3.11) 56(84) bytes of data.\n\n\
                    --- 198.18.3.11 ping statistics ---\n\
                    3 packets transmitted, 3 received, 0% packet loss, time 402ms\n\
                    rtt min/avg/max/mdev = 0.040/0.046/0.053/0.006 ms\n";
        let s = parse_ping_summary(text).unwrap();
        assert_eq!(s.transmitted, 3);
        assert_eq!(s.received, 3);
        assert!(s.loss_percent.abs() < f64::EPSILON);
        assert_eq!(s.rtt_avg_ms, Some(0.046));
        assert!(s.all_received());
    }

    #[test]
    fn parses_partial_and_total_loss() {
        let s = parse_ping_summary(
            "3 packets transmitted, 1 received, 66.6667% packet loss, time 2003ms\n\
             rtt min/avg/max/mdev = 1.5/1.5/1.5/0 ms",
        )
        .unwrap();
        assert_eq!((s.transmitted, s.received), (3, 1));
        assert!((s.loss_percent - 66.6667).abs() < 1e-9);
        let s = parse_ping_summary(
            "4 packets transmitted, 0 received, +4 errors, 100% packet loss, time 3060ms\n",
        )
        .unwrap();
        assert_eq!((s.transmitted, s.received), (4, 0));
        assert_eq!(s.rtt_avg_ms, None);
        assert!(!s.all_received());
        assert!(parse_ping_summary("connect: Network is unreachable").is_err());
    }

    #[test]
    fn wait_until_times_out_and_succeeds() {
        let err = wait_until(Duration::from_millis(50), Duration::from_millis(10), || {
            false
        })
        .unwrap_err();
        assert!(matches!(err, HarnessError::WaitTimeout { .. }));
        let mut n = 0;
        wait_until(Duration::from_secs(5), Duration::from_millis(1), || {
            n += 1;
            n == 3
        })
        .unwrap();
    }
}
