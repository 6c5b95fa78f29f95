#!/usr/bin/env bash
# The main job on this machine, from nothing: set up, build, then `kubefim run`, which
# creates signing keys and a signed baseline of the embedded default policy (a Kubernetes
# node) in /var/lib/kubefim if there is none yet, and verifies the machine against it.
# Extra arguments go to `kubefim run` (for example --state-dir DIR, --policy FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked
exec target/release/kubefim run "$@"
