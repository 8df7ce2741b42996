#!/usr/bin/env bash
# Runs the `receive_path` fuzz target for a bounded time (for CI):
#   backends/fuzz/run.sh <seconds>
# Exits non-zero if the build fails or the fuzzer finds a crash; the input
# that crashed is left in artifacts/receive_path/ (replay it with
# `cargo fuzz run receive_path <file>` from this directory).
#
# Environment:
#   FUZZ_SANITIZER  none (default) or address. The code under test is safe
#                   Rust, where a bounds error is already a panic, so ASan
#                   mostly costs time (a slower build, half the executions);
#                   use it when the target reaches `unsafe` code.
#   FUZZ_MAX_LEN    largest input, default 2048 (beyond the MTU: the
#                   checks do not depend on size once past the header).
#
# Works on the stable toolchain: cargo-fuzz needs nightly only for
# `-Zsanitizer`, and RUSTC_BOOTSTRAP=1 lets stable accept it.
set -euo pipefail

seconds=${1:?usage: run.sh <seconds>}
sanitizer=${FUZZ_SANITIZER:-none}
max_len=${FUZZ_MAX_LEN:-2048}
cd "$(dirname "$0")"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing; installing it from crates.io" >&2
    cargo install cargo-fuzz --locked
fi

if [ "$sanitizer" != none ]; then
    export RUSTC_BOOTSTRAP=1
    # Cargo caches rustc's answers without keying on RUSTC_BOOTSTRAP, so a
    # run without it would leave a cached "-Z needs nightly" failure.
    rm -f target/.rustc_info.json
fi

mkdir -p corpus/receive_path
start=$(date +%s)
cargo fuzz build --sanitizer "$sanitizer" receive_path
built=$(date +%s)
echo "fuzz build: $((built - start)) s" >&2
cargo fuzz run --sanitizer "$sanitizer" receive_path corpus/receive_path -- \
    -max_total_time="$seconds" -max_len="$max_len" -timeout=10 -print_final_stats=1
echo "fuzz run: $(($(date +%s) - built)) s, no crash" >&2
