#!/usr/bin/env bash
# Every test, from nothing: set up the machine (idempotent), check formatting and lints,
# then run all tests of the workspace, including the ones that need root. CI runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
