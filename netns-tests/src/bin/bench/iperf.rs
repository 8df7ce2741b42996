//! TCP throughput between two namespaces with iperf3: a one-off server
//! (`-s -1`) in one namespace, a client (`-J`) in another. Shared by the
//! `bench` and `demo` binaries.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netns_tests::{IP_TIMEOUT, run};

/// The port every iperf3 server listens on (one server per namespace at a time).
const PORT: &str = "5201";
/// How long the server may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the one-off server may take to exit after its client finished.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Slack on top of the test duration for the client's timeout.
const CLIENT_SLACK: Duration = Duration::from_secs(20);
/// How often the server's state is polled.
const POLL: Duration = Duration::from_millis(20);

/// A one-off iperf3 server in a namespace. Killed by its PID when dropped
/// if it is still running.
struct Server {
    /// `setpriv --pdeathsig KILL -- ip netns exec <ns> iperf3 ...`: every
    /// step execs, so this is iperf3's own PID (and the kernel kills it if
    /// we die first).
    child: Child,
    /// Its namespace.
    netns: String,
}

impl Server {
    /// Starts `iperf3 -s -1 -B <bind>` in `netns` and waits until it listens.
    fn start(netns: &str, bind: Ipv4Addr) -> Result<Self> {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--", "ip", "netns", "exec", netns])
            .args([
                "iperf3",
                "-s",
                "-1",
                "-p",
                PORT,
                "--idle-timeout",
                "60",
                "-B",
            ])
            .arg(bind.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start the iperf3 server in {netns}"))?;
        let mut server = Self {
            child,
            netns: netns.to_owned(),
        };
        server.wait_listening()?;
        Ok(server)
    }

    /// Polls `ss` in the namespace until the port listens.
    fn wait_listening(&mut self) -> Result<()> {
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the iperf3 server in {} exited before listening ({status})",
                    self.netns
                );
            }
            let out = run(
                Command::new("ip")
                    .args(["netns", "exec", &self.netns, "ss", "-Hltn"])
                    .arg(format!("sport = :{PORT}")),
                IP_TIMEOUT,
            )?;
            if out.status.success() && !out.stdout.trim_ascii().is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the iperf3 server in {} did not listen within {LISTEN_TIMEOUT:?}",
                    self.netns
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Waits (at most [`EXIT_TIMEOUT`]) for the one-off server to exit;
    /// kills it by its PID if it does not.
    fn finish(mut self) {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_)) | Err(_)) {
                return;
            }
            thread::sleep(POLL);
        }
        // Drop kills it.
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            eprintln!(
                "iperf3 server in {} (pid {}) still runs; killing it",
                self.netns,
                self.child.id()
            );
            // Fails only if it exited meanwhile; the wait reaps it either way.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// TCP throughput in bit/s from `client_netns` to `server_ip` (served from
/// `server_netns`): iperf3, 1 stream, `secs` seconds, the receiver's figure
/// (`end.sum_received.bits_per_second`).
pub(crate) fn tcp_throughput(
    server_netns: &str,
    server_ip: Ipv4Addr,
    client_netns: &str,
    secs: u32,
) -> Result<f64> {
    tcp_throughput_streams(server_netns, server_ip, client_netns, secs, 1)
}

/// As [`tcp_throughput`] with `streams` parallel TCP streams (`-P`), summed.
pub(crate) fn tcp_throughput_streams(
    server_netns: &str,
    server_ip: Ipv4Addr,
    client_netns: &str,
    secs: u32,
    streams: u32,
) -> Result<f64> {
    let server = Server::start(server_netns, server_ip)?;
    let result = run(
        Command::new("ip")
            .args(["netns", "exec", client_netns, "iperf3", "-J", "-p", PORT])
            .args(["--connect-timeout", "3000", "-t", &secs.to_string()])
            .args(["-P", &streams.to_string(), "-c"])
            .arg(server_ip.to_string()),
        Duration::from_secs(u64::from(secs)) + CLIENT_SLACK,
    );
    server.finish();
    let out = result?;
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "iperf3 client in {client_netns} printed no JSON ({}); stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(error) = json["error"].as_str() {
        bail!("iperf3 {client_netns} -> {server_ip}: {error}");
    }
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 JSON without end.sum_received.bits_per_second: {text}"))
}

/// `8.12 Gbit/s`.
pub(crate) fn gbit(bits_per_second: f64) -> String {
    format!("{:.2} Gbit/s", bits_per_second / 1e9)
}
