#!/usr/bin/env bash
# Every test, from nothing: set up the machine (idempotent), check formatting and lints,
# then run all tests of the workspace, including the ones that need root. CI runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The eBPF toolchain (rust-src + bpf-linker) must be able to build the kernel-side crate for
# the BPF target on stable, as the watcher's build will.
(cd ebpf && RUSTC_BOOTSTRAP=1 cargo build --release --locked --target bpfel-unknown-none -Z build-std=core)
file ebpf/target/bpfel-unknown-none/release/kubefim | grep -q 'eBPF' || { echo "the eBPF crate did not build an eBPF object" >&2; exit 1; }
cargo test --workspace --locked
