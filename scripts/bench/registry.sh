#!/usr/bin/env bash
# The registry benchmark, on release builds:
#   1. the fabric tests in release (a registry, a hub and two edges on loopback), printing the
#      measured figures: promote and rollback to 100% on every node, automatic rollback reaction,
#      node convergence after a registry restart;
#   2. model push throughput: a 256 MiB ONNX file pushed with `fabric model push` (streamed, SHA-256
#      computed on the way in, validated), three times.
# Prints a markdown table and saves it to build/bench/registry.md. About 3 minutes after the build.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh
export ORT_DYLIB_PATH="$(cat build/ort-dylib-path)"
cargo build --release --locked -p edge-node -p cloud-hub -p model-registry -p fabric-cli --bins
mkdir -p build/bench
out=build/bench/registry.md
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
{
  echo "Registry benchmark, $(date -u +%Y-%m-%d), on ${cpu:-unknown CPU}, $(nproc) cores (release builds)"
  echo
  echo "| what | figure |"
  echo "|---|---|"
} > "$out"
FABRIC_FIGURES="$PWD/$out" cargo test --release --locked -p model-registry --test fabric -- --test-threads 1

work=$(mktemp -d)
trap 'kill $registry 2>/dev/null; rm -rf "$work"' EXIT
.venv/bin/python - "$work/big.onnx" <<'PY'
import sys
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
# 256 MiB of weights behind a small graph: y = x + w[0:4] (the registry reads and checks every byte).
w = np.random.default_rng(1).random(64 << 20, dtype=np.float32)
graph = helper.make_graph(
    [helper.make_node("Slice", ["w", "starts", "ends"], ["head"]), helper.make_node("Add", ["x", "head"], ["y"])],
    "big",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0]), "starts"),
     numpy_helper.from_array(np.array([4]), "ends")],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
onnx.save(model, sys.argv[1])
PY
target/release/fabric certs --out "$work/certs" --node registry-1:registry --node operator:operator > /dev/null
target/release/model-registry --listen 127.0.0.1:0 --http-addr off --data-dir "$work/registry" --certs "$work/certs" > "$work/registry.out" 2>/dev/null &
registry=$!
for _ in $(seq 50); do grep -q quic:// "$work/registry.out" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/.*quic:\/\///p' "$work/registry.out")
size=$(stat -c %s "$work/big.onnx")
for run in 1 2 3; do
  start=$(date +%s.%N)
  FABRIC_REGISTRY="registry-1@$addr" FABRIC_CERTS="$work/certs" target/release/fabric model push big "$work/big.onnx" --output json > /dev/null
  end=$(date +%s.%N)
  python3 -c "import sys; s, a, b = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]); print(f'| model push, {s >> 20} MiB (run {sys.argv[4]}) | {s / (b - a) / 1048576:.0f} MiB/s ({b - a:.2f} s) |')" "$size" "$start" "$end" "$run" >> "$out"
done
cat "$out"
