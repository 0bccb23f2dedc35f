#!/usr/bin/env bash
# The serving benchmark (issue 4): installs wrk and the Python peer, builds release, runs
# scripts/bench/serving.py. Takes about 4 minutes; prints a markdown table and saves it to build/bench/.
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
echo "==> building release"
cargo build --release --locked -p edge-node
cargo bench --locked -p fabric-core --bench engines --no-run
.venv/bin/python scripts/bench/serving.py
