//! Small helpers of the benchmark: commands with input, route counting,
//! hand-made flannel-style VXLAN devices, statistics and formatting.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netns_tests::{IP_TIMEOUT, Node, describe, run};

/// The VXLAN device every node uses, ours and hand-made.
pub(crate) const VXLAN_DEV: &str = "flannel.1";

/// Runs `cmd` with `input` on its stdin, stdout and stderr captured; kills
/// it by its PID (and reaps it) if it has not exited after `timeout`. The
/// exit status is not checked.
pub(crate) fn run_with_input(cmd: &mut Command, input: &[u8], timeout: Duration) -> Result<Output> {
    let desc = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{desc}`"))?;
    let mut stdin = child.stdin.take().context("stdin was piped")?;
    let input = input.to_vec();
    // A write error (the child exited early) shows in its status and output.
    let writer = thread::spawn(move || drop(stdin.write_all(&input)));
    let stdout = child.stdout.take().map(reader);
    let stderr = child.stderr.take().map(reader);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let pid = child.id();
            // Fails only if it exited meanwhile; the wait reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{desc}` did not finish within {timeout:?}; killed it (pid {pid})");
        }
        thread::sleep(Duration::from_millis(2));
    };
    let _ = writer.join();
    let collect =
        |h: Option<thread::JoinHandle<Vec<u8>>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
    Ok(Output {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

/// Reads a pipe to its end on a thread.
fn reader<R: Read + Send + 'static>(mut pipe: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error only shortens the captured output.
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// `ip <args>` with the standard timeout; an unsuccessful exit is an error.
pub(crate) fn ip_ok(args: &[&str]) -> Result<String> {
    let out = run(Command::new("ip").args(args), IP_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The number of main-table routes on `flannel.1` in `netns`; `None` while
/// the device does not exist.
pub(crate) fn route_count(netns: &str) -> Result<Option<usize>> {
    let out = run(
        Command::new("ip").args(["-n", netns, "route", "show", "dev", VXLAN_DEV]),
        IP_TIMEOUT,
    )?;
    Ok(out.status.success().then(|| {
        out.stdout
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count()
    }))
}

/// Whether `netns` has a route to exactly `subnet`.
pub(crate) fn has_route(netns: &str, subnet: &str) -> bool {
    run(
        Command::new("ip").args(["-n", netns, "route", "show", subnet]),
        IP_TIMEOUT,
    )
    .is_ok_and(|o| o.status.success() && !o.stdout.trim_ascii().is_empty())
}

/// Creates `flannel.1` on `node` by hand, the way flannel (Go) makes it:
/// VNI 1, local underlay IP on `eth0`, no learning, port 8472, MTU 1450,
/// `mac`, and `addr/32` (the subnet's network address).
pub(crate) fn hand_vxlan_device(node: &Node, mac: &str, addr: Ipv4Addr) -> Result<()> {
    let ns = node.netns();
    let local = node.underlay_ip().to_string();
    ip_ok(&[
        "-n",
        ns,
        "link",
        "add",
        VXLAN_DEV,
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        &local,
        "dev",
        "eth0",
        "nolearning",
        "dstport",
        "8472",
    ])?;
    ip_ok(&[
        "-n", ns, "link", "set", VXLAN_DEV, "address", mac, "mtu", "1450", "up",
    ])?;
    ip_ok(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{addr}/32"),
        "dev",
        VXLAN_DEV,
    ])
    .map(drop)
}

/// The `ip`/`bridge` commands (without the tool name) that make `subnet`
/// (network address `base`, prefix length `len`) reachable through a VTEP
/// `mac` at `public_ip`, exactly as flannel programs a peer: a permanent
/// neighbour, a permanent FDB entry and an onlink route.
pub(crate) fn peer_commands(
    base: Ipv4Addr,
    len: u8,
    mac: &str,
    public_ip: Ipv4Addr,
) -> [String; 3] {
    [
        format!("neigh replace {base} lladdr {mac} dev {VXLAN_DEV} nud permanent"),
        format!("fdb replace {mac} dev {VXLAN_DEV} dst {public_ip} self permanent"),
        format!("route replace {base}/{len} via {base} dev {VXLAN_DEV} onlink"),
    ]
}

/// Programs one peer on `node` by hand with [`peer_commands`].
pub(crate) fn hand_peer(
    node: &Node,
    base: Ipv4Addr,
    len: u8,
    mac: &str,
    public_ip: Ipv4Addr,
) -> Result<()> {
    let [neigh, fdb, route] = peer_commands(base, len, mac, public_ip);
    let ns = node.netns();
    for (tool, line) in [("ip", neigh), ("bridge", fdb), ("ip", route)] {
        let out = run(
            Command::new(tool)
                .args(["-n", ns])
                .args(line.split_whitespace()),
            IP_TIMEOUT,
        )?;
        if !out.status.success() {
            bail!(
                "`{tool} -n {ns} {line}` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// `VmHWM` (peak resident set) of a process, in kB.
pub(crate) fn vm_hwm_kb(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmHWM in {path}"))
}

/// The nearest-rank percentile `p` (1..=100) of `samples` (sorted here).
pub(crate) fn percentile(samples: &mut [Duration], p: usize) -> Duration {
    samples.sort_unstable();
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * samples.len()).div_ceil(100).clamp(1, samples.len());
    samples[rank - 1]
}

/// `12.3 ms`.
pub(crate) fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// `a / b` of two durations.
pub(crate) fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

/// A locally administered unicast MAC built from a tag and a 16-bit index.
pub(crate) fn fake_mac(tag: u8, index: u16) -> String {
    let [hi, lo] = index.to_be_bytes();
    format!("02:00:5e:{tag:02x}:{hi:02x}:{lo:02x}")
}

/// The lease value flannel (Go) writes for a VXLAN node.
pub(crate) fn lease_value(public_ip: Ipv4Addr, mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

/// The lease key of `base/len` under the default prefix.
pub(crate) fn lease_key(base: Ipv4Addr, len: u8) -> String {
    format!("/coreos.com/network/subnets/{base}-{len}")
}
