//! Section f: container-to-container TCP over our `udp` backend, over our
//! VXLAN backend (the kernel path), and over the udp backend reduced to one
//! worker moving one packet per system call (the naive loop flannel's udp
//! backend is), and over the udp backend without offloads, with 1 and 4
//! streams; and the whole machine's CPU seconds
//! per GB moved (from `/proc/stat`).

use std::time::Duration;

use anyhow::{Context, Result};
use netns_tests::{Cluster, ClusterSpec, DEFAULT_NETWORK_CONFIG, wait_for};

use crate::iperf::tcp_throughput_streams;

/// iperf3 test length.
const SECS: u32 = 5;
/// Stream counts measured.
pub(crate) const STREAMS: [u32; 2] = [1, 4];

const UDP_CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;

/// One data path's figures, per stream count.
pub(crate) struct PathFigures {
    pub(crate) name: &'static str,
    /// (bit/s, CPU seconds per GB) for each of [`STREAMS`].
    pub(crate) runs: Vec<(f64, f64)>,
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
    let mut out = Vec::new();
    for (name, config, args) in paths {
        let cluster = Cluster::start(ClusterSpec {
            nodes: 2,
            config: config.to_owned(),
            flanneld_args: args.iter().map(|a| (*a).to_owned()).collect(),
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
        let mut runs = Vec::new();
        for streams in STREAMS {
            let before = busy_seconds()?;
            let bps = tcp_throughput_streams(b.netns(), b.ip(), a.netns(), SECS, streams)?;
            let cpu = busy_seconds()? - before;
            let gigabytes = bps * f64::from(SECS) / 8.0 / 1e9;
            runs.push((bps, cpu / gigabytes.max(1e-9)));
        }
        out.push(PathFigures { name, runs });
    }
    Ok(out)
}

/// CPU time spent not idle, all cores, in seconds (`/proc/stat`, USER_HZ = 100).
fn busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    let total: u64 = fields.iter().take(8).sum();
    Ok((total - idle) as f64 / 100.0)
}
