#!/usr/bin/env bash
# The control plane across the test kit's emulated WAN link (100 ms, 10 Mbit/s, 1% loss by default):
# a 500 MB model file fetched by an edge through a cut in the middle, and a push, canary, promote and
# rollback from an operator behind the same kind of link. Builds release binaries; about 8 minutes
# after the build (the 500 MB file crosses 10 Mbit/s in about 400 s; BENCH_FETCH_MB makes it smaller).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/prepare.sh
cargo build --release --locked -p edge-node -p model-registry -p fabric-cli -p fabric-testkit --bins --examples
.venv/bin/python scripts/bench/wan_control.py
