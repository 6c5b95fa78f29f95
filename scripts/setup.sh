#!/usr/bin/env bash
# Idempotent machine set-up for kubefim on Debian 12 as root: Debian packages the tests and
# benchmarks use, the eBPF toolchain (rust-src + a bpf-linker built against the LLVM inside
# the Rust toolchain) and the tracefs/bpffs mounts. Safe to run again: every step checks
# first and does nothing when its work is already done.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        log "must run as root (installs packages, mounts tracefs/bpffs)"
        exit 2
    fi
}

apt_packages() {
    # b3sum and aide are the peers the tests and benchmarks compare against; bpftool,
    # fatrace, auditd, fio, podman and runc are used by the eBPF and container tests;
    # time gives peak RSS; hyperfine runs the side-by-side benchmarks; busybox-static is
    # the whole root file system of the test container image (no registry is reachable);
    # prometheus brings promtool, which checks /metrics and unit-tests the shipped alert rules.
    local pkgs=(ca-certificates curl git gcc libc6-dev pkg-config make b3sum aide bpftool
        hyperfine time file fio fatrace auditd podman runc uidmap util-linux attr acl python3-pip
        busybox-static catatonit prometheus)
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # auditd and podman try to start services at install time; a container or CI host
        # may have no init system, so never let that fail the install.
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        rm -f /usr/sbin/policy-rc.d
    fi
}

rust_toolchain() {
    export PATH="$HOME/.cargo/bin:$PATH"
    command -v cargo >/dev/null || { log "cargo not found: install Rust 1.95 with rustup first"; exit 2; }
    if ! rustup component list --installed 2>/dev/null | grep -q '^rust-src'; then
        log "adding rust-src (needed to build core for the BPF target)"
        rustup component add rust-src
    fi
}

bpf_linker() {
    # bpf-linker has to link against the same LLVM major version that rustc emits; Debian 12
    # has no LLVM 22 package, so build it against the libLLVM shipped inside the toolchain.
    local prefix="${KUBEFIM_LLVM_PREFIX:-/opt/kubefim-llvm}"
    export PATH="$HOME/.cargo/bin:$PATH"
    if command -v bpf-linker >/dev/null && bpf-linker --version >/dev/null 2>&1; then
        return
    fi
    local sysroot llvm
    sysroot="$(rustc --print sysroot)"
    llvm="$(ls "$sysroot"/lib/libLLVM.so.* 2>/dev/null | head -n1 || true)"
    [ -n "$llvm" ] || { log "no libLLVM in $sysroot/lib: cannot build bpf-linker"; exit 2; }
    local major
    major="$(basename "$llvm" | sed -E 's/^libLLVM\.so\.([0-9]+).*/\1/')"
    log "building bpf-linker against the toolchain's LLVM $major ($llvm)"
    mkdir -p "$prefix/lib"
    ln -sf "$llvm" "$prefix/lib/libLLVM.so"
    ln -sf "$llvm" "$prefix/lib/"
    LLVM_PREFIX="$prefix" cargo install --locked bpf-linker --no-default-features --features "llvm-$major"
}

python_tools() {
    # kubernetes-validate checks the rendered deploy/ manifests against the Kubernetes
    # OpenAPI schemas it ships (offline once installed).
    if ! python3 -m kubernetes_validate --version >/dev/null 2>&1; then
        log "installing kubernetes-validate (PyPI)"
        python3 -m pip install --quiet --user kubernetes-validate 2>/dev/null \
            || python3 -m pip install --quiet --user --break-system-packages kubernetes-validate
    fi
}

kernel_mounts() {
    mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing || log "warning: cannot mount tracefs"
    mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf || log "warning: cannot mount bpffs"
}

need_root
apt_packages
rust_toolchain
bpf_linker
python_tools
kernel_mounts
log "ready"
