#!/usr/bin/env bash
# The WAN benchmark: offload from an edge to a hub across the test kit's emulated link (delay, rate
# limit, loss): overflow at multiples of the edge's capacity beside the edge alone, and every
# request to the hub by QUIC congestion controller. Builds release binaries; about 10 minutes after
# the build.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/prepare.sh
cargo build --release --locked -p edge-node -p cloud-hub -p fabric-cli -p fabric-testkit --bins --examples
.venv/bin/python scripts/bench/wan.py
