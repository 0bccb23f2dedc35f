#!/usr/bin/env bash
# Runs every test from a fresh machine: installs what the tests need (scripts/setup.sh), builds,
# then runs the Rust test suite and the Python (tritonclient) tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export ORT_DYLIB_PATH="$(cat build/ort-dylib-path)"
export RUST_LOG=${RUST_LOG:-warn}
# The tests that drive Chromium, promtool, prometheus and systemd-analyze skip where those are
# missing; here (setup.sh installed them) a missing one is a failure.
export FABRIC_REQUIRE_TOOLS=1

echo "==> cargo test --workspace"
cargo test --workspace --locked

if compgen -G "tests/python/test_*.py" > /dev/null; then
  cargo build -p edge-node --locked   # the binary the Python tests start (already built by cargo test)
  echo "==> pytest tests/python (tritonclient against edge-node)"
  .venv/bin/python -m pytest -q tests/python
fi

echo "==> the main command and the examples (scripts/test-examples.sh)"
bash scripts/test-examples.sh
