#!/usr/bin/env bash
# The autoscaling benchmark: an edge-node through a load step, with a plot
# (build/bench/autoscale.png) and a table (build/bench/autoscale.md). About 2.5 minutes after the build.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/prepare.sh
cargo build --release --locked -p edge-node -p fabric-cli --bins
.venv/bin/python scripts/bench/autoscale.py
