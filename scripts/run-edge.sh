#!/usr/bin/env bash
# The main job, for now: an edge-node serving the generated models (MLP, CNN, mixed-dtype model and
# the trained digits classifier) on http://127.0.0.1:8000 with the KServe v2 API. Ctrl-C stops it.
# Extra arguments go to edge-node (see `edge-node --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export ORT_DYLIB_PATH="$(cat build/ort-dylib-path)"
cargo build --release --locked -p edge-node
exec target/release/edge-node --model-repository build/models "$@"
