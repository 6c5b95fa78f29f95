#!/usr/bin/env bash
# Every test, from nothing: set up the machine (idempotent), check formatting and lints of
# the workspace and of the eBPF crate (its own workspace, built for the BPF target), then run
# all tests, including the ones that load the eBPF programs into the real kernel (root).
# CI runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --all --check
(cd ebpf && cargo fmt --check)
# The kernel side, linted for the target it runs on (stable rustc, -Z build-std via
# RUSTC_BOOTSTRAP=1, as watcher/build.rs builds it).
(cd ebpf && RUSTC_BOOTSTRAP=1 cargo clippy --release --locked --target bpfel-unknown-none -Z build-std=core -- -D warnings)
# Building the workspace builds the eBPF object (aya-build, from watcher/build.rs) and
# embeds it in the binary.
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
