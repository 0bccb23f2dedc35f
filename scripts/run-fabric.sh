#!/usr/bin/env bash
# The main job: a whole local fabric on this machine, nothing installed by hand.
#   - a cloud-hub (ONNX Runtime, CPU fallback here) on http://127.0.0.1:8100 and quic://127.0.0.1:4433
#   - an edge-node (tract) on http://127.0.0.1:8000, offloading its overflow to that hub over QUIC
# both serving the generated models, with development certificates in build/certs. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export ORT_DYLIB_PATH="$(cat build/ort-dylib-path)"
cargo build --release --locked -p edge-node -p cloud-hub -p model-registry --bins
[ -f build/certs/edge-1.pem ] || target/release/fabric certs --out build/certs --node hub-1:hub --node edge-1:edge
target/release/cloud-hub --model-repository build/models --certs build/certs --node-id hub-1 &
hub=$!
trap 'kill $hub 2>/dev/null; wait $hub 2>/dev/null' EXIT
target/release/edge-node --model-repository build/models --hub hub-1@127.0.0.1:4433 --certs build/certs --node-id edge-1 "$@"
