# Shared by the scripts in this directory (sourced, not run). Sets ROOT (the repository root,
# also the working directory), and provides log, require_root, find_cargo and apt_install.
# The sourcing script sets SCRIPT_NAME first.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

log() { echo "${SCRIPT_NAME}: $*"; }

require_root() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "${SCRIPT_NAME}: must be run as root (it creates network namespaces); try: sudo $0" >&2
        exit 1
    fi
}

# apt-get install, for build prerequisites that setup.sh does not cover.
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update
    timeout 1200 apt-get install -y --no-install-recommends "$@" </dev/null
}

# Sets CARGO: cargo on PATH, else root's or the invoking user's ~/.cargo/bin (sudo drops it
# from PATH; the rustup proxies then need that user's RUSTUP_HOME). Debian 12's own rustc is
# older than the workspace's rust-version, and toolchains are not downloaded at run time, so
# without a rustup toolchain this stops with instructions. Also makes sure a linker exists.
find_cargo() {
    CARGO=""
    if command -v cargo >/dev/null 2>&1; then
        CARGO=$(command -v cargo)
    else
        local home
        for home in "${HOME:-/root}" "$(getent passwd "${SUDO_USER:-root}" | cut -d: -f6)"; do
            if [[ -n $home && -x $home/.cargo/bin/cargo ]]; then
                CARGO=$home/.cargo/bin/cargo
                [[ -d $home/.rustup ]] && export RUSTUP_HOME=$home/.rustup
                export CARGO_HOME=$home/.cargo
                export PATH=$home/.cargo/bin:$PATH
                break
            fi
        done
    fi
    if [[ -z $CARGO ]]; then
        echo "${SCRIPT_NAME}: no Rust toolchain found; install one with rustup (Rust >= 1.89)" >&2
        exit 1
    fi
    if ! command -v cc >/dev/null 2>&1; then
        log "no C compiler/linker (cc) found; installing build-essential"
        apt_install build-essential
    fi
}

# The cargo target directory, absolute.
target_dir() {
    local dir=${CARGO_TARGET_DIR:-target}
    [[ $dir == /* ]] || dir=$ROOT/$dir
    echo "$dir"
}
