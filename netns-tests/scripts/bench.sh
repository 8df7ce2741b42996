#!/usr/bin/env bash
# The benchmarks: installs what they need (setup.sh), builds the workspace in release and runs
# target/release/bench with FLANNELD pointing at the release flanneld. Every figure is printed
# next to an anchor measured in the same run, with the ratio; nothing is asserted. Takes about
# two minutes. Exit status 1 only if a figure could not be measured.
# Run as root on Debian 12: sudo netns-tests/scripts/bench.sh
set -euo pipefail
SCRIPT_NAME=bench.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_root

log "setup (netns-tests/scripts/setup.sh)"
timeout 1800 bash netns-tests/scripts/setup.sh
find_cargo
log "building: cargo build --workspace --bins --locked --release"
timeout 1800 "$CARGO" build --workspace --bins --locked --release
# flanneld as it would ship (see [profile.dist] in Cargo.toml): the RSS figure depends on it.
log "building: cargo build -p flanneld --locked --profile dist"
timeout 1800 "$CARGO" build -p flanneld --locked --profile dist

export FLANNELD=$(target_dir)/dist/flanneld
export FLANNELD_RUST_LOG=${FLANNELD_RUST_LOG:-info}
log "running $(target_dir)/release/bench (FLANNELD=$FLANNELD)"
echo
# The bench bounds every step itself; this is only a backstop.
exec timeout -k 10 900 "$(target_dir)/release/bench"
