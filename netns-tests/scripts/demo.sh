#!/usr/bin/env bash
# The netns cluster demo: installs what it needs (setup.sh), builds the workspace and runs
# target/debug/demo, which starts a 3-node cluster (real etcd, flanneld on every node, one
# container per node) in network namespaces, prints what it built, a reachability matrix and
# the overlay's TCP throughput next to the underlay's, and removes everything again.
# Exit status: the demo's (0 when every container reaches every other one).
# Run as root on Debian 12: sudo netns-tests/scripts/demo.sh
set -euo pipefail
SCRIPT_NAME=demo.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_root

log "setup (netns-tests/scripts/setup.sh)"
timeout 1800 bash netns-tests/scripts/setup.sh
find_cargo
log "building: cargo build --workspace --bins --locked"
timeout 1800 "$CARGO" build --workspace --bins --locked

log "running $(target_dir)/debug/demo"
echo
# The demo bounds every step itself; this is only a backstop.
exec timeout -k 10 600 "$(target_dir)/debug/demo"
