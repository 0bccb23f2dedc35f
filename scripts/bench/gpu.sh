#!/usr/bin/env bash
# The GPU check: cloud-hub (release) serving the CNN with ONNX Runtime's GPU build, providers
# TensorRT > CUDA > CPU as shipped, then CPU only, on the same machine; open-loop load (binary
# tensors, one row per request, 1 s deadline) from the compiled generator at 2,000, 6,000 and
# 12,000 requests/s for 6 s each. Prints, per run: the provider the hub's log names, the generator's
# JSON line (goodput = answers within the deadline per second; late; p50/p99), replicas and mean
# batch rows from /metrics. Then ResNet-50 (scripts/bench/gen_gpu_models.py, random weights, UINT8
# input): raw ONNX Runtime in Python (scripts/bench/gpu_raw.py, IO binding on the GPU) at batch 1
# and 32 beside the hub over binary HTTP, on the GPU when there is one and on the CPU provider.
# Without a GPU (nvidia-smi) the GPU runs fall back or are marked not taken, so the script can be
# tried anywhere. PYTHON: a Python whose onnxruntime is the GPU build (default .venv/bin/python).
#
#   ORT_GPU_LIB=/path/to/onnxruntime/capi/libonnxruntime.so.1.31.1 bash scripts/bench/gpu.sh [BIN_DIR]
#
# Needs an NVIDIA GPU, the onnxruntime-gpu wheel's libraries (ORT_GPU_LIB; the CUDA 13 build of
# 1.31.1) and CUDA 13's runtime, cuBLAS, cuDNN and cuFFT on LD_LIBRARY_PATH (for example from the
# nvidia-* Python packages), and BIN_DIR (default target/release) holding cloud-hub, fabric and
# examples/openloop (`cargo build --release -p cloud-hub -p fabric-cli -p edge-node --example openloop`).
set -uo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-target/release}
: "${ORT_GPU_LIB:?set ORT_GPU_LIB to the libonnxruntime.so of the GPU build}"
export ORT_DYLIB_PATH=$ORT_GPU_LIB
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/repo/cnn/1"
cp build/models/cnn/1/model.onnx "$work/repo/cnn/1/"
printf 'max_batch_size = 32\n' > "$work/repo/cnn/config.toml"
"$bin/fabric" certs --out "$work/certs" --node hub-1:hub > /dev/null
# One CNN row as a binary-tensor request; the header's length goes to the generator.
hl=$(python3 - "$work/cnn.bin" <<'PY'
import json, struct, sys
data = struct.pack("<12288f", *[(i % 17) / 17.0 for i in range(12288)])
head = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32",
                               "parameters": {"binary_data_size": len(data)}}],
                   "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]}).encode()
open(sys.argv[1], "wb").write(head + data)
print(len(head))
PY
)
# start_hub NAME REPO PROVIDERS: a release hub on REPO with those ONNX Runtime providers (the TensorRT
# cache in $work), its log in $work/NAME.log; sets pid and url once it listens (at most 5 minutes:
# TensorRT builds an engine per bucket before the model is ready).
start_hub() {
  printf '[http]\naddr = "127.0.0.1:0"\n[models]\npath = "%s"\nengine = "ort"\n[ort]\nproviders = [%s]\ncache_dir = "%s"\n[quic]\naddr = "127.0.0.1:0"\n' \
    "$2" "$3" "$work/trt-cache" > "$work/$1.toml"
  RUST_LOG=info "$bin/cloud-hub" --config "$work/$1.toml" --certs "$work/certs" --node-id hub-1 > "$work/$1.log" 2>&1 &
  pid=$!
  for _ in $(seq 1500); do grep -q "listening on" "$work/$1.log" && break; sleep 0.2; done
  url=$(grep -o "listening on http://[0-9.:]*" "$work/$1.log" | head -1 | sed 's/listening on //')
  sed 's/\x1b\[[0-9;]*m//g' "$work/$1.log" | grep -E "session ready|TensorRT engine cache" | head -2
}

nvidia-smi -L
echo "cores: $(nproc)"
for run in gpu cpu; do
  if [ $run = gpu ]; then providers='"tensorrt", "cuda", "cpu"'; else providers='"cpu"'; fi
  echo "== $run"
  start_hub "hub-$run" "$work/repo" "$providers"
  for rate in 2000 6000 12000; do
    echo "$run, $rate/s offered: $("$bin/examples/openloop" "$url/v2/models/cnn/infer" "$work/cnn.bin" "$hl" $rate 6 1000)"
  done
  curl -s "$url/metrics" | grep -E '^fabric_replicas|^fabric_batch_size_(sum|count)'
  kill $pid
  wait $pid 2> /dev/null
done

# ResNet-50 (random weights, UINT8 input normalised inside the graph: 150,528 bytes a row), made by
# scripts/bench/gen_gpu_models.py; the raw engine first (gpu_raw.py: ONNX Runtime in Python, IO
# binding on the GPU, batch 1 and the cap), then the hub served over binary HTTP at a cap of 32.
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && py=.venv/bin/python
"$py" scripts/bench/gen_gpu_models.py build/gpu-models
mkdir -p "$work/repo50/resnet50/1"
cp build/gpu-models/resnet50/1/model.onnx "$work/repo50/resnet50/1/"
printf 'max_batch_size = 32\n' > "$work/repo50/resnet50/config.toml"
hl50=$("$py" - "$work/r50.bin" <<'PY'
import json, sys
data = bytes((i * 7) % 251 for i in range(3 * 224 * 224))
head = json.dumps({"inputs": [{"name": "image", "shape": [1, 3, 224, 224], "datatype": "UINT8",
                               "parameters": {"binary_data_size": len(data)}}],
                   "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]}).encode()
open(sys.argv[1], "wb").write(head + data)
print(len(head))
PY
)
gpu_there=0
nvidia-smi -L > /dev/null 2>&1 && gpu_there=1
for run in gpu cpu; do
  if [ $run = gpu ] && [ $gpu_there = 0 ]; then echo "== resnet50 gpu: no GPU here (nvidia-smi), not taken"; continue; fi
  if [ $run = gpu ]; then providers='"tensorrt", "cuda", "cpu"'; raw=cuda; rates="500 2000 5000"; else providers='"cpu"'; raw=cpu; rates="5 10 20"; fi
  echo "== resnet50 raw ONNX Runtime ($raw)"
  "$py" scripts/bench/gpu_raw.py build/gpu-models/resnet50/1/model.onnx $raw 5 1 32
  echo "== resnet50 hub $run"
  start_hub "hub50-$run" "$work/repo50" "$providers"
  for rate in $rates; do
    echo "resnet50 $run, $rate/s offered: $("$bin/examples/openloop" "$url/v2/models/resnet50/infer" "$work/r50.bin" "$hl50" $rate 6 2000)"
  done
  curl -s "$url/metrics" | grep -E '^fabric_replicas|^fabric_batch_size_(sum|count)|cold_start'
  kill $pid
  wait $pid 2> /dev/null
done

