#!/usr/bin/env bash
# The autoscaling benchmark (issue 13): an edge-node through a load step, with a plot
# (build/bench/autoscale.png) and a table (build/bench/autoscale.md). About 2.5 minutes after the build.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh
if ! command -v wrk >/dev/null; then
  echo "==> installing wrk (Debian package)"
  if [ "$(id -u)" = 0 ]; then apt-get install -y -q wrk >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q wrk >/dev/null; }
  else sudo apt-get install -y -q wrk >/dev/null; fi
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r scripts/bench/requirements.txt
export ORT_DYLIB_PATH="$(cat build/ort-dylib-path)"
cargo build --release --locked -p edge-node -p fabric-cli --bins
.venv/bin/python scripts/bench/autoscale.py
