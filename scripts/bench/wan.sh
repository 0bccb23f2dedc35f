#!/usr/bin/env bash
# The WAN benchmark: offload from an edge to a hub across the test kit's emulated link (delay, rate
# limit, loss), by QUIC congestion controller. Builds release binaries; about 2 minutes after the build.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh
export ORT_DYLIB_PATH="$(cat build/ort-dylib-path)"
cargo build --release --locked -p edge-node -p cloud-hub -p fabric-cli -p fabric-testkit --bins --examples
.venv/bin/python scripts/bench/wan.py
