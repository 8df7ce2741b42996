//! Section f: container-to-container TCP over our `udp` backend, over our
//! VXLAN backend (the kernel path), and over the udp backend reduced to one
//! worker moving one packet per system call (the naive loop flannel's udp
//! backend is), and over the udp backend without offloads, with 1 and 4
//! streams; and the whole machine's CPU seconds
//! per GB moved (from `/proc/stat`). All four clusters run side by side and
//! the measurements are interleaved over [`ROUNDS`] rounds; medians are
//! reported.

use std::time::Duration;

use anyhow::{Context, Result};
use netns_tests::{Cluster, ClusterSpec, Container, DEFAULT_NETWORK_CONFIG, wait_for};

use crate::iperf::tcp_throughput_streams;

/// iperf3 test length.
const SECS: u32 = 5;
/// Stream counts measured.
pub(crate) const STREAMS: [u32; 2] = [1, 4];
/// Measurements per path and stream count, interleaved across the paths so
/// that a noisy minute on this shared machine hits every path alike; the
/// median is reported.
const ROUNDS: usize = 3;

const UDP_CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;

/// One data path's figures, per stream count.
pub(crate) struct PathFigures {
    pub(crate) name: &'static str,
    /// (bit/s, CPU seconds per GB), the medians of [`ROUNDS`], for each of
    /// [`STREAMS`].
    pub(crate) runs: Vec<(f64, f64)>,
}

/// A path's cluster with one container on each node, ready for iperf3.
struct Path {
    name: &'static str,
    // Kept for its drop guard; the containers live in it.
    _cluster: Cluster,
    a: Container,
    b: Container,
    /// (bit/s, CPU s/GB) of every round, per stream count.
    samples: Vec<Vec<(f64, f64)>>,
}

/// Runs section f.
pub(crate) fn run() -> Result<Vec<PathFigures>> {
    let paths: [(&'static str, &str, &[&str]); 4] = [
        ("udp (ours)", UDP_CONFIG, &[]),
        ("vxlan (ours, kernel)", DEFAULT_NETWORK_CONFIG, &[]),
        (
            "naive udp (1 worker, 1 packet/syscall)",
            UDP_CONFIG,
            &["--udp-workers=1", "--udp-batch=1", "--udp-no-offload"],
        ),
        (
            "udp without offloads (batched)",
            UDP_CONFIG,
            &["--udp-no-offload"],
        ),
    ];
    // Developer knobs for experiments: BENCH_F_ONLY=<text> runs only the paths whose name
    // contains it (to profile one); BENCH_F_ARGS="<flags>" adds flanneld flags to every path.
    let only = std::env::var("BENCH_F_ONLY").unwrap_or_default();
    let extra = std::env::var("BENCH_F_ARGS").unwrap_or_default();
    let mut ready = Vec::new();
    for (name, config, args) in paths.into_iter().filter(|p| p.0.contains(only.as_str())) {
        let cluster = Cluster::start(ClusterSpec {
            nodes: 2,
            config: config.to_owned(),
            flanneld_args: args
                .iter()
                .copied()
                .chain(extra.split_whitespace())
                .map(str::to_owned)
                .collect(),
            ..ClusterSpec::default()
        })
        .with_context(|| format!("cannot start the {name} cluster"))?;
        let a = cluster.node(0).add_container()?;
        let b = cluster.node(1).add_container()?;
        wait_for(
            "the overlay",
            Duration::from_secs(10),
            Duration::from_millis(100),
            || a.ping(b.ip(), 1).is_ok_and(|s| s.all_received()),
        )?;
        ready.push(Path {
            name,
            _cluster: cluster,
            a,
            b,
            samples: vec![Vec::new(); STREAMS.len()],
        });
    }
    for _ in 0..ROUNDS {
        for path in &mut ready {
            for (samples, streams) in path.samples.iter_mut().zip(STREAMS) {
                let before = busy_seconds()?;
                let bps = tcp_throughput_streams(
                    path.b.netns(),
                    path.b.ip(),
                    path.a.netns(),
                    SECS,
                    streams,
                )?;
                let cpu = busy_seconds()? - before;
                let gigabytes = bps * f64::from(SECS) / 8.0 / 1e9;
                samples.push((bps, cpu / gigabytes.max(1e-9)));
            }
        }
    }
    Ok(ready
        .into_iter()
        .map(|path| PathFigures {
            name: path.name,
            runs: path
                .samples
                .into_iter()
                .map(|mut s| (median(&mut s, |x| x.0), median(&mut s, |x| x.1)))
                .collect(),
        })
        .collect())
}

/// The median of one field of `samples` (the upper one of an even count).
fn median(samples: &mut [(f64, f64)], field: fn(&(f64, f64)) -> f64) -> f64 {
    samples.sort_by(|x, y| field(x).total_cmp(&field(y)));
    samples.get(samples.len() / 2).map_or(0.0, field)
}

/// CPU time this machine's cores spent working, all cores, in seconds
/// (`/proc/stat`, USER_HZ = 100): user, nice, system, irq and softirq.
/// Idle, iowait and steal (time the hypervisor gave to someone else) are
/// not work done here.
fn busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| fields.get(i)).sum();
    Ok(busy as f64 / 100.0)
}
