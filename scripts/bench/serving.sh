#!/usr/bin/env bash
# The serving benchmark: installs wrk and the Python peer, builds release, runs
# scripts/bench/serving.py. Takes about 4 minutes; prints a markdown table and saves it to build/bench/.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/prepare.sh
echo "==> building release"
cargo build --release --locked -p edge-node -p model-registry -p fabric-cli
cargo bench --locked -p fabric-engine --bench engines --no-run
.venv/bin/python scripts/bench/serving.py
