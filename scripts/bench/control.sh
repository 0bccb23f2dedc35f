#!/usr/bin/env bash
# The control benchmark: load-to-ready for the MLP and the CNN, and the time from a traffic
# policy change to the first answer from the new version, on a release edge-node. About a minute.
# Prints a markdown table and saves it to build/bench/control.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh
export ORT_DYLIB_PATH="$(cat build/ort-dylib-path)"
mkdir -p build/bench
cargo bench --locked -p edge-node --bench control | tee build/bench/control.md
