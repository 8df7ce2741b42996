//! The benchmarks (`sudo netns-tests/scripts/bench.sh`, a release build).
//!
//! Every figure is printed next to an anchor measured in the same run, with
//! the ratio; nothing is asserted (the goals are printed for reference):
//!
//! - a. TCP throughput container to container over our VXLAN vs a
//!   flannel-style kernel VXLAN pair made by hand (goal ratio >= 0.98);
//! - b. time to program 1,000 and 5,000 peers from etcd vs the same entries
//!   applied with `bridge -batch` + `ip -batch` (goal: ours faster);
//! - c. join-to-route latency p50/p99 on 3 nodes vs the `etcdctl put` itself;
//! - d. flanneld's peak RSS with 5,000 peers vs etcd's (goal < 10 MB);
//! - e. CNI ADD and DEL median and p99 over 100 operations, our plugin vs
//!   Debian's `bridge` + `host-local` (goal: ADD median <= 0.25x), and both
//!   plugins' peak RSS;
//! - f. TCP over our udp backend vs our VXLAN vs a one-packet-per-syscall
//!   loop, 1 and 4 streams, and CPU seconds per GB (goal udp/VXLAN >= 1.0,
//!   first milestone 0.5).
//!
//! Arguments name the sections to run (`bench e`); none runs all.
//! Exits 1 only if a figure could not be measured.

#[path = "bench/cni.rs"]
mod cni;
#[path = "bench/iperf.rs"]
mod iperf;
#[path = "bench/join.rs"]
mod join;
#[path = "bench/peers.rs"]
mod peers;
#[path = "bench/throughput.rs"]
mod throughput;
#[path = "bench/udp.rs"]
mod udp;
#[path = "bench/util.rs"]
mod util;

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use netns_tests::{IP_TIMEOUT, flanneld_binary, require_root, run};

use crate::util::{ms, percentile, ratio};

/// Peer counts of section b.
const PEER_COUNTS: [usize; 2] = [1000, 5000];

fn main() -> ExitCode {
    if let Err(error) = require_root() {
        eprintln!("bench: {error}");
        return ExitCode::FAILURE;
    }
    let started = Instant::now();
    header();
    let mut failed = Vec::new();
    let mut summary = Vec::new();

    let only: Vec<String> = std::env::args().skip(1).collect();
    let wanted = |s: &str| only.is_empty() || only.iter().any(|o| o == s);
    if wanted("a") {
        section_a(&mut summary, &mut failed);
    }
    if wanted("b") || wanted("c") || wanted("d") {
        sections_b_to_d(&mut summary, &mut failed);
    }
    if wanted("e") {
        section_e(&mut summary, &mut failed);
    }
    if wanted("f") {
        section_f(&mut summary, &mut failed);
    }

    section("summary");
    println!(
        "  {:<34} {:>12} {:>12} {:>7}   goal",
        "figure", "ours", "anchor", "ratio"
    );
    for line in &summary {
        println!("  {line}");
    }
    println!(
        "  total bench time {:.0} s{}",
        started.elapsed().as_secs_f64(),
        if failed.is_empty() {
            String::new()
        } else {
            format!("; NOT measured: {}", failed.join(", "))
        }
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Section a: TCP throughput, ours vs a hand-made VXLAN pair.
fn section_a(summary: &mut Vec<String>, failed: &mut Vec<String>) {
    section(
        "a. TCP throughput, container to container (iperf3 -t 5, 1 stream, rounds alternating the order)",
    );
    match throughput::run() {
        Ok(t) => {
            println!(
                "  mean: ours {}  anchor {}  ours/anchor = {:.3}  (goal >= 0.98)",
                iperf::gbit(t.ours),
                iperf::gbit(t.anchor),
                t.ours / t.anchor
            );
            println!(
                "  mean: ours {}  anchor+fw {}  ours/(anchor+fw) = {:.3}",
                iperf::gbit(t.ours_fw),
                iperf::gbit(t.anchor_fw),
                t.ours_fw / t.anchor_fw
            );
            summary.push(row(
                "a. TCP container to container",
                iperf::gbit(t.ours),
                iperf::gbit(t.anchor),
                t.ours / t.anchor,
                ">= 0.98 (anchor: hand-made VXLAN)",
            ));
            summary.push(row(
                "a. same, anchor + FORWARD rules",
                iperf::gbit(t.ours_fw),
                iperf::gbit(t.anchor_fw),
                t.ours_fw / t.anchor_fw,
                "(anchor with flanneld's iptables)",
            ));
        }
        Err(e) => fail(failed, "a", &e),
    }
}

/// Sections b to d: programming peers, join latency, flanneld's RSS.
fn sections_b_to_d(summary: &mut Vec<String>, failed: &mut Vec<String>) {
    section("b. Time to program N peers from etcd (route count on flannel.1 polled every 20 ms)");
    let mut rss = Vec::new();
    let mut baseline_kb = None;
    for n in PEER_COUNTS {
        match peers::run_peers(n) {
            Ok(r) => {
                peers::print(&r);
                summary.push(row(
                    &format!("b. program {} peers", r.n),
                    ms(r.ours),
                    ms(r.anchor),
                    ratio(r.ours, r.anchor),
                    "< 1 (anchor: ip/bridge -batch)",
                ));
                rss.push((r.n, r.flanneld_hwm_kb, r.etcd_hwm_kb));
            }
            Err(e) => fail(failed, &format!("b ({n} peers)"), &e),
        }
    }

    section("c. Join-to-route latency on 3 nodes (50 joins, routes polled every 5 ms per node)");
    match join::run() {
        Ok(mut j) => {
            let n = j.join.len();
            let stat = |name: &str, v: &mut Vec<Duration>| {
                let (p50, p99) = (percentile(v, 50), percentile(v, 99));
                println!(
                    "  {name:<44} p50 {:>9}  p99 {:>9}  (n={n})",
                    ms(p50),
                    ms(p99)
                );
                (p50, p99)
            };
            let (j50, j99) = stat("put issued -> route on all 3 nodes:", &mut j.join);
            let (p50, p99) = stat("anchor: the `etcdctl put` command itself:", &mut j.put);
            let (l50, l99) = stat("del issued -> route gone on all 3 nodes:", &mut j.leave);
            let (d50, d99) = stat("anchor: the `etcdctl del` command itself:", &mut j.del);
            let (i50, i99) = stat("`etcdctl put` with nothing polling:", &mut j.put_idle);
            stat(
                "`etcdctl version` (start-up, no request):",
                &mut j.ctl_start,
            );
            println!(
                "  join / put: p50 {:.2}, p99 {:.2};  leave / del: p50 {:.2}, p99 {:.2}",
                ratio(j50, p50),
                ratio(j99, p99),
                ratio(l50, d50),
                ratio(l99, d99)
            );
            println!(
                "  join / idle put: p50 {:.2}, p99 {:.2}",
                ratio(j50, i50),
                ratio(j99, i99),
            );
            println!(
                "  (the command figures include `ip netns exec` and etcdctl's start-up, see \
                 `etcdctl version`;"
            );
            println!(
                "  the 3 pollers, one `ip route show` per node every 5 ms, slow the timed put a \
                 little)"
            );
            baseline_kb = Some(j.flanneld_hwm_kb);
            summary.push(row(
                "c. join -> route p50",
                ms(j50),
                ms(p50),
                ratio(j50, p50),
                "(anchor: etcdctl put)",
            ));
            summary.push(row(
                "c. join -> route p99",
                ms(j99),
                ms(p99),
                ratio(j99, p99),
                "(anchor: etcdctl put)",
            ));
        }
        Err(e) => fail(failed, "c", &e),
    }

    section("d. Peak RSS (VmHWM from /proc/<pid>/status)");
    let mb = |kb: u64| kb as f64 / 1024.0;
    if let Some(kb) = baseline_kb {
        println!(
            "  flanneld with    2 peers (node 0 of c, after 100 lease events): {:.1} MB",
            mb(kb)
        );
    }
    for (n, flanneld, etcd) in &rss {
        println!(
            "  flanneld with {n:>4} peers: {:.1} MB   etcd holding those {n} leases: {:.1} MB   \
             flanneld/etcd = {:.2}",
            mb(*flanneld),
            mb(*etcd),
            mb(*flanneld) / mb(*etcd)
        );
    }
    println!("  (goal: flanneld < 10 MB with 5000 peers)");
    match rss.iter().find(|(n, _, _)| *n == 5000) {
        Some((n, flanneld, etcd)) => summary.push(row(
            &format!("d. flanneld VmHWM, {n} peers"),
            format!("{:.1} MB", mb(*flanneld)),
            format!("{:.1} MB", mb(*etcd)),
            mb(*flanneld) / mb(*etcd),
            "flanneld < 10 MB (anchor: etcd)",
        )),
        None => fail(
            failed,
            "d",
            &anyhow::anyhow!("the 5000-peer run of b did not finish, so there is no RSS"),
        ),
    }
}

/// Section e: CNI ADD/DEL latency and RSS, ours vs bridge + host-local.
fn section_e(summary: &mut Vec<String>, failed: &mut Vec<String>) {
    section(&format!(
        "e. CNI ADD/DEL, {} operations each, ours vs Debian bridge + host-local (interleaved)",
        cni::OPS
    ));
    let mut f = match cni::run() {
        Ok(f) => f,
        Err(e) => return fail(failed, "e", &e),
    };
    for (name, ours, reference, goal) in [
        (
            "ADD",
            &mut f.ours_add,
            &mut f.ref_add,
            "<= 0.25 (anchor: bridge+host-local)",
        ),
        (
            "DEL",
            &mut f.ours_del,
            &mut f.ref_del,
            "(anchor: bridge+host-local)",
        ),
    ] {
        let (o50, o99) = (percentile(ours, 50), percentile(ours, 99));
        let (r50, r99) = (percentile(reference, 50), percentile(reference, 99));
        println!(
            "  {name}: ours median {:>9} p99 {:>9} | reference median {:>9} p99 {:>9} | \
             ratio median {:.3} p99 {:.3}",
            ms(o50),
            ms(o99),
            ms(r50),
            ms(r99),
            ratio(o50, r50),
            ratio(o99, r99)
        );
        summary.push(row(
            &format!("e. CNI {name} median"),
            ms(o50),
            ms(r50),
            ratio(o50, r50),
            goal,
        ));
    }
    let mb = |kb: u64| kb as f64 / 1024.0;
    match (f.ours_rss_kb, f.ref_rss_kb) {
        (Some(o), Some(r)) => {
            println!(
                "  peak RSS of one ADD: ours {:.1} MB, bridge (+ host-local) {:.1} MB, ratio {:.2}",
                mb(o),
                mb(r),
                mb(o) / mb(r)
            );
            summary.push(row(
                "e. CNI ADD peak RSS",
                format!("{:.1} MB", mb(o)),
                format!("{:.1} MB", mb(r)),
                mb(o) / mb(r),
                "(anchor: bridge+host-local)",
            ));
        }
        _ => println!("  peak RSS: not measured (/usr/bin/time is missing: apt-get install time)"),
    }
}

/// Section f: the udp backend's throughput against VXLAN and a naive loop.
fn section_f(summary: &mut Vec<String>, failed: &mut Vec<String>) {
    section(
        "f. TCP container to container: udp backend vs VXLAN vs a naive loop (iperf3 -t 5, median of 3 interleaved rounds)",
    );
    let paths = match udp::run() {
        Ok(p) => p,
        Err(e) => return fail(failed, "f", &e),
    };
    for path in &paths {
        for (streams, (bps, cpu)) in udp::STREAMS.iter().zip(&path.runs) {
            println!(
                "  {:<40} {streams} stream(s): {:>14}  {cpu:>6.2} CPU s/GB",
                path.name,
                iperf::gbit(*bps)
            );
        }
    }
    let [udp, vxlan, naive, ..] = &paths[..] else {
        return;
    };
    for (i, streams) in udp::STREAMS.iter().enumerate() {
        let (u, v, n) = (udp.runs[i].0, vxlan.runs[i].0, naive.runs[i].0);
        println!(
            "  {streams} stream(s): udp/vxlan = {:.3} (goal >= 1.0, milestone 0.5), naive/vxlan = {:.3}, udp/naive = {:.1}",
            u / v,
            n / v,
            u / n
        );
        summary.push(row(
            &format!("f. udp backend, {streams} stream(s)"),
            iperf::gbit(u),
            iperf::gbit(v),
            u / v,
            ">= 1.0 (anchor: our VXLAN)",
        ));
    }
}

/// Prints the header: kernel, date, machine, binaries.
fn header() {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "?".into(), |s| s.trim().to_owned());
    let date = command_line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M:%S UTC"]));
    let iperf = command_line(Command::new("iperf3").arg("--version"));
    let etcd = command_line(Command::new("etcd").arg("--version"));
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    println!("flannel-rs benchmarks");
    println!("  date      {date}");
    println!("  kernel    Linux {kernel}, {cores} cores");
    println!("  flanneld  {}", flanneld_binary().display());
    println!(
        "  log       FLANNELD_RUST_LOG={}",
        std::env::var("FLANNELD_RUST_LOG").unwrap_or_else(|_| "(unset: info)".into())
    );
    println!("  tools     {iperf}; {etcd}");
}

/// The first line of a command's output, or `?`.
fn command_line(cmd: &mut Command) -> String {
    run(cmd, IP_TIMEOUT)
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into())
}

/// Prints a section title.
fn section(title: &str) {
    println!();
    println!("== {title}");
}

/// Prints a section's error and records it.
fn fail(failed: &mut Vec<String>, what: &str, error: &anyhow::Error) {
    println!("  NOT MEASURED: {error:#}");
    failed.push(what.to_owned());
}

/// One summary line: figure, ours, anchor, ratio, goal.
fn row(figure: &str, ours: String, anchor: String, ratio: f64, goal: &str) -> String {
    format!("{figure:<34} {ours:>12} {anchor:>12} {ratio:>7.3}   {goal}")
}
