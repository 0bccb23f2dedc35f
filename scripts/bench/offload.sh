#!/usr/bin/env bash
# The offload benchmark: QUIC overhead over local serving, and goodput under 2x/3x
# overload with and without a hub. Builds release binaries; about 2 minutes after the build.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh
command -v wrk >/dev/null || { echo "wrk missing: run scripts/bench/serving.sh once (it installs it)"; exit 1; }
export ORT_DYLIB_PATH="$(cat build/ort-dylib-path)"
cargo build --release --locked -p edge-node -p cloud-hub -p fabric-cli --bins --examples
.venv/bin/python scripts/bench/offload.py
