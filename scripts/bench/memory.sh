#!/usr/bin/env bash
# The memory benchmark: edge-node's peak resident memory loading a model with 4 MiB rows and serving
# one 64 MiB JSON request to it. Builds the release edge-node; about 30 seconds after the build.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh
export ORT_DYLIB_PATH="$(cat build/ort-dylib-path)"
cargo build --release --locked -p edge-node --bin edge-node
.venv/bin/python scripts/bench/memory.py
