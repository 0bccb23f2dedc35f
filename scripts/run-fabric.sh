#!/usr/bin/env bash
# The main job: a whole local fabric on this machine, nothing installed by hand.
#   - a model-registry on quic://127.0.0.1:7000 (state in build/fabric/registry)
#   - a cloud-hub (ONNX Runtime, CPU fallback here) on http://127.0.0.1:8100 and quic://127.0.0.1:4433
#   - an edge-node (tract) on http://127.0.0.1:8000, offloading its overflow to that hub over QUIC
# The hub and the edge serve the generated models from build/models and whatever the registry deploys
# to them (`target/release/fabric ...`, see the README's walkthrough). Development certificates in
# build/certs. Ctrl-C stops all three.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export ORT_DYLIB_PATH="$(cat build/ort-dylib-path)"
cargo build --release --locked -p edge-node -p cloud-hub -p model-registry -p fabric-cli --bins
[ -f build/certs/registry-1.pem ] || target/release/fabric certs --out build/certs \
  --node registry-1:registry --node hub-1:hub --node edge-1:edge --node operator:operator
target/release/model-registry --listen 127.0.0.1:7000 --data-dir build/fabric/registry --certs build/certs &
registry=$!
target/release/cloud-hub --model-repository build/models --certs build/certs --node-id hub-1 \
  --registry registry-1@127.0.0.1:7000 --data-dir build/fabric/hub-1 &
hub=$!
trap 'kill $hub $registry 2>/dev/null; wait $hub $registry 2>/dev/null' EXIT
target/release/edge-node --model-repository build/models --hub hub-1@127.0.0.1:4433 --certs build/certs --node-id edge-1 \
  --registry registry-1@127.0.0.1:7000 --data-dir build/fabric/edge-1 --label site=local "$@"
