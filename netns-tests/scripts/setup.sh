#!/usr/bin/env bash
# Installs what the tests and benchmarks need on a fresh Debian 12 machine (run as root).
# Idempotent: if every required command is already present, apt is not touched at all.
set -euo pipefail

PACKAGES=(
    etcd-server etcd-client protobuf-compiler iproute2 iputils-ping iperf3 ethtool
    nftables iptables tcpdump containernetworking-plugins procps
    # Real CNI clients (issue 4): podman with its CNI backend, containerd's CRI service, a
    # gRPC client for CRI on Debian's python, and libcni for a small Go client.
    podman runc conmon busybox-static containerd python3-grpcio python3-grpc-tools
    golang-go golang-github-appc-cni-dev
    # /usr/bin/time: the CNI benchmark's peak RSS of one plugin call.
    time
)

# "command-or-absolute-path:package" pairs checked for presence.
REQUIRED=(
    etcd:etcd-server
    etcdctl:etcd-client
    protoc:protobuf-compiler
    ip:iproute2
    ping:iputils-ping
    iperf3:iperf3
    ethtool:ethtool
    nft:nftables
    iptables:iptables
    tcpdump:tcpdump
    /usr/lib/cni/bridge:containernetworking-plugins
    /usr/lib/cni/host-local:containernetworking-plugins
    /usr/lib/cni/portmap:containernetworking-plugins
    /usr/lib/cni/tuning:containernetworking-plugins
    podman:podman
    runc:runc
    conmon:conmon
    /bin/busybox:busybox-static
    containerd:containerd
    /usr/lib/python3/dist-packages/grpc:python3-grpcio
    /usr/lib/python3/dist-packages/grpc_tools:python3-grpc-tools
    go:golang-go
    /usr/share/gocode/src/github.com/containernetworking/cni/libcni:golang-github-appc-cni-dev
    /usr/bin/time:time
)

log() { echo "setup.sh: $*"; }

have() {
    local what=$1
    if [[ $what == /* ]]; then
        [[ -x $what ]]
    else
        # sbin tools (ip, nft, ...) may not be in a non-root PATH.
        command -v "$what" >/dev/null 2>&1 || [[ -x /usr/sbin/$what || -x /sbin/$what ]]
    fi
}

missing=()
for entry in "${REQUIRED[@]}"; do
    what=${entry%%:*}
    pkg=${entry#*:}
    if have "$what"; then
        log "ok: $what"
    else
        log "missing: $what (package $pkg)"
        missing+=("$what")
    fi
done

if ((${#missing[@]} == 0)); then
    log "all required tools are present; not touching apt"
else
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup.sh: missing ${missing[*]}; run me as root to install: ${PACKAGES[*]}" >&2
        exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup.sh: missing ${missing[*]} and apt-get is not available (Debian 12 expected)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    log "running: apt-get update"
    apt-get update
    log "running: apt-get install -y --no-install-recommends ${PACKAGES[*]}"
    apt-get install -y --no-install-recommends "${PACKAGES[@]}" </dev/null

    still_missing=()
    for entry in "${REQUIRED[@]}"; do
        what=${entry%%:*}
        have "$what" || still_missing+=("$what")
    done
    if ((${#still_missing[@]} > 0)); then
        echo "setup.sh: still missing after apt-get install: ${still_missing[*]}" >&2
        exit 1
    fi
    log "installed: ${PACKAGES[*]}"
fi

# The Debian etcd-server package may start a system etcd (127.0.0.1:2379) from its postinst.
# We never stop processes we did not start; the tests use their own etcd on free ports, so a
# system etcd does not interfere. Just report it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
    log "note: the system etcd service is running (not ours; left alone, tests use free ports)"
elif (exec 3<>/dev/tcp/127.0.0.1/2379) 2>/dev/null; then
    log "note: something listens on 127.0.0.1:2379 (not ours; left alone, tests use free ports)"
else
    log "no system etcd is running"
fi

log "etcd: $( (etcd --version 2>/dev/null || true) | head -n1)"
log "done"
