#!/usr/bin/env bash
# Runs all checks and tests of the workspace: setup, fmt, clippy, a bounded fuzz run, doc tests,
# tests (nextest if present). Must run as root: the cluster tests create network namespaces.
set -euo pipefail

SCRIPT_NAME=test-all.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_root

if [[ ! -t 1 ]]; then
    export CARGO_TERM_COLOR=never
fi

step() {
    echo
    echo "==== $* ===="
}

step "setup (netns-tests/scripts/setup.sh)"
bash netns-tests/scripts/setup.sh
find_cargo

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets --locked -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The cluster tests run the real binaries from target/debug.
step "cargo build --workspace --bins --locked"
cargo build --workspace --bins --locked

# The udp backend's receive path under libFuzzer for a bounded time (its own small crate;
# installs cargo-fuzz from crates.io the first time).
step "fuzz: backends/fuzz/run.sh 30"
timeout 1200 bash backends/fuzz/run.sh 30

# Doc tests first: nextest does not run them, and the test runner's summary
# should be the last thing this script prints.
step "cargo test --workspace --locked --doc"
cargo test --workspace --locked --doc

if cargo nextest --version >/dev/null 2>&1; then
    step "cargo nextest run --workspace --locked --no-fail-fast"
    cargo nextest run --workspace --locked --no-fail-fast
else
    step "cargo test --workspace --locked --no-fail-fast (cargo-nextest not installed)"
    cargo test --workspace --locked --no-fail-fast
fi

step "all tests passed"
