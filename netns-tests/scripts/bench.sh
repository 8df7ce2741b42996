#!/usr/bin/env bash
# The benchmarks: installs what they need (setup.sh), builds the workspace in release and runs
# target/release/bench with FLANNELD pointing at the release flanneld. Every figure is printed
# next to an anchor measured in the same run, with the ratio; nothing is asserted. Takes about
# two minutes. Exit status 1 only if a figure could not be measured.
# Run as root on Debian 12: sudo netns-tests/scripts/bench.sh [sections, e.g. e]
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

# The CNI plugin as it would ship: static (runs in any image, no dynamic loader work on each of
# its hundreds of starts a minute) and in the dist profile. --target keeps RUSTFLAGS off build
# scripts and proc macros.
HOST_TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
log "building: cargo build -p cni-plugin --profile dist --target $HOST_TRIPLE (static)"
RUSTFLAGS="-C target-feature=+crt-static" timeout 1800 "$CARGO" build -p cni-plugin --locked \
    --profile dist --target "$HOST_TRIPLE"

export FLANNELD=$(target_dir)/dist/flanneld
export FLANNEL_CNI=$(target_dir)/$HOST_TRIPLE/dist/flannel
export FLANNELD_RUST_LOG=${FLANNELD_RUST_LOG:-info}
log "running $(target_dir)/release/bench $* (FLANNELD=$FLANNELD FLANNEL_CNI=$FLANNEL_CNI)"
echo
# The bench bounds every step itself; this is only a backstop.
exec timeout -k 10 900 "$(target_dir)/release/bench" "$@"
