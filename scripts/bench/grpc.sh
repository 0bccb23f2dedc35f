#!/usr/bin/env bash
# The gRPC benchmark: edge-node's gRPC face beside its REST one and the FastAPI peer, driven by
# Triton's perf_analyzer (gRPC and HTTP) and wrk. Installs what it needs, builds release; about
# 3 minutes after the build. Prints a markdown table and saves it to build/bench/.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/prepare.sh
source scripts/bench/perf_analyzer.sh
cargo build --release --locked -p edge-node
.venv/bin/python scripts/bench/grpc.py
