#!/usr/bin/env bash
# The GPU check, one unattended run (a few minutes) that leaves its figures in $OUT_DIR/gpu.txt
# (default build/gpu-bench) and prints them:
# 1. cloud-hub (release) serving the CNN with ONNX Runtime's GPU build, providers TensorRT > CUDA >
#    CPU as shipped, then CPU only, on the same machine; open-loop load (binary tensors, one row per
#    request, 1 s deadline) from the compiled generator at 2,000, 6,000 and 12,000 requests/s, 6 s
#    each: the provider the hub's log names, the generator's JSON line (goodput = answers within the
#    deadline per second; late; p50/p99), replicas and mean batch rows from /metrics.
# 2. ResNet-50 and a BERT-base-shaped encoder (scripts/bench/gen_gpu_models.py, random weights):
#    raw ONNX Runtime in Python (scripts/bench/gpu_raw.py, IO binding on the GPU) at batch 1 and the
#    cap beside the hub over binary HTTP at a cap of 32, on the GPU and on the CPU provider, with GPU
#    utilisation sampled during each load run, the hub's GPU memory per replica, replicas per GPU
#    and cold start from /metrics and its log.
# 3. ResNet-50 through an edge's QUIC offload: an edge-node (tract, one replica) alone, then with the
#    hub behind it (overflow), then sending everything to the hub (offload.mode = "always").
# Without a GPU (nvidia-smi) the GPU runs fall back or are marked not taken, so the script can be
# tried anywhere. PYTHON: a Python whose onnxruntime is the GPU build (default .venv/bin/python).
#
#   ORT_GPU_LIB=/path/to/onnxruntime/capi/libonnxruntime.so.1.31.1 bash scripts/bench/gpu.sh [BIN_DIR]
#
# Needs an NVIDIA GPU, the onnxruntime-gpu wheel's libraries (ORT_GPU_LIB; the CUDA 13 build of
# 1.31.1) and CUDA 13's runtime, cuBLAS, cuDNN and cuFFT on LD_LIBRARY_PATH (for example from the
# nvidia-* Python packages), and BIN_DIR (default target/release) holding cloud-hub, edge-node,
# fabric and examples/openloop
# (`cargo build --release -p cloud-hub -p fabric-cli -p edge-node --bins --example openloop`).
set -uo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-target/release}
: "${ORT_GPU_LIB:?set ORT_GPU_LIB to the libonnxruntime.so of the GPU build}"
export ORT_DYLIB_PATH=$ORT_GPU_LIB
out=${OUT_DIR:-build/gpu-bench}
mkdir -p "$out"
exec > >(tee "$out/gpu.txt") 2>&1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/repo/cnn/1"
cp build/models/cnn/1/model.onnx "$work/repo/cnn/1/"
printf 'max_batch_size = 32\n' > "$work/repo/cnn/config.toml"
"$bin/fabric" certs --out "$work/certs" --node hub-1:hub --node edge-1:edge > /dev/null
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
  printf '[http]\naddr = "127.0.0.1:0"\n[models]\npath = "%s"\nengine = "ort"\n[ort]\nproviders = [%s]\ncache_dir = "%s"\n[quic]\naddr = "127.0.0.1:0"\n[grpc]\nenabled = true\naddr = "127.0.0.1:0"\n' \
    "$2" "$3" "$work/trt-cache" > "$work/$1.toml"
  RUST_LOG=info "$bin/cloud-hub" --config "$work/$1.toml" --certs "$work/certs" --node-id hub-1 > "$work/$1.log" 2>&1 &
  pid=$!
  for _ in $(seq 1500); do grep -q "listening on" "$work/$1.log" && break; sleep 0.2; done
  url=$(grep -o "listening on http://[0-9.:]*" "$work/$1.log" | head -1 | sed 's/listening on //')
  quic=$(grep -o "quic://[0-9.:]*" "$work/$1.log" | head -1 | sed 's|quic://||')
  grpc=$(grep -o "gRPC on [0-9.:]*" "$work/$1.log" | head -1 | sed 's/gRPC on //')
  sed 's/\x1b\[[0-9;]*m//g' "$work/$1.log" | grep -E "session ready|TensorRT engine cache|GPU placement" | head -3
}

# load NAME URL BODY HEADER_LENGTH RATE SECONDS DEADLINE_MS: one open-loop run, its JSON line, and
# the GPU's mean utilisation over it (sampled every 200 ms) where there is a GPU.
load() {
  local util=""
  if [ $gpu_there = 1 ]; then
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 > "$work/util" 2> /dev/null &
    util=$!
  fi
  local line
  line=$("$bin/examples/openloop" "$2" "$3" "$4" "$5" "$6" "$7")
  if [ -n "$util" ]; then
    kill $util 2> /dev/null
    wait $util 2> /dev/null
    line="$line gpu_util_pct=$(awk '{ s += $1; n++ } END { if (n) printf "%.0f", s / n; else print "?" }' "$work/util")"
  fi
  echo "$1, $5/s offered: $line"
}

gpu_there=0
nvidia-smi -L > /dev/null 2>&1 && gpu_there=1

nvidia-smi -L 2> /dev/null || echo "no GPU here (nvidia-smi): the GPU runs fall back to the CPU or are not taken"
echo "cores: $(nproc) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'))"
for run in gpu cpu; do
  if [ $run = gpu ]; then providers='"tensorrt", "cuda", "cpu"'; else providers='"cpu"'; fi
  echo "== $run"
  start_hub "hub-$run" "$work/repo" "$providers"
  for rate in 2000 6000 12000; do
    load "cnn $run" "$url/v2/models/cnn/infer" "$work/cnn.bin" "$hl" $rate 6 1000
  done
  curl -s "$url/metrics" | grep -E '^fabric_replicas|^fabric_batch_size_(sum|count)'
  kill $pid
  wait $pid 2> /dev/null
done

# The big models (random weights), made by scripts/bench/gen_gpu_models.py: ResNet-50 with a UINT8
# input normalised inside the graph (150,528 bytes a row) and the encoder (128 INT64 token ids, 1 KB
# a row).
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && py=.venv/bin/python
"$py" scripts/bench/gen_gpu_models.py build/gpu-models
# request NAME INPUT DTYPE SHAPE...: one row of NAME as a binary-tensor request in $work/NAME.bin;
# prints the header's length.
request() {
  "$py" - "$work/$1.bin" "$2" "$3" "${@:4}" <<'PY'
import json, sys
import numpy as np
path, name, dtype, shape = sys.argv[1], sys.argv[2], sys.argv[3], [int(d) for d in sys.argv[4:]]
n = int(np.prod(shape))
data = (np.arange(n) * 7 % 251).astype({"UINT8": "u1", "INT64": "<i8"}[dtype]).tobytes()
head = json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": dtype,
                               "parameters": {"binary_data_size": len(data)}}]}).encode()
open(path, "wb").write(head + data)
print(len(head))
PY
}
hl_resnet50=$(request resnet50 image UINT8 1 3 224 224)
hl_encoder=$(request encoder input_ids INT64 1 128)

# grpc_run NAME CONCURRENCY: Triton's perf_analyzer against the hub's gRPC face (batch 1, zero
# inputs: the encoder's token ids must stay inside its vocabulary), where it was installed
# beforehand (scripts/bench/perf_analyzer.sh puts it in build/perf_analyzer; a GPU machine cannot
# download it).
grpc_run() {
  local pa=build/perf_analyzer
  if [ ! -x $pa/bin/perf_analyzer ] || [ -z "$grpc" ]; then echo "$1 grpc: perf_analyzer not in $pa, not taken"; return; fi
  env LD_LIBRARY_PATH="$PWD/$pa/lib" $pa/bin/perf_analyzer -m "${1%% *}" -u "$grpc" -i grpc -b 1 --input-data zero \
    --concurrency-range "$2" --measurement-interval 3000 --stability-percentage 50 --max-trials 4 -f "$work/pa.csv" > /dev/null 2>&1 \
    && echo "$1 grpc, concurrency $2: $("$py" -c 'import csv, sys; r = next(csv.DictReader(open(sys.argv[1]))); print("%.1f infer/s, p50 %.1f ms, p99 %.1f ms" % (float(r["Inferences/Second"]), int(r["p50 latency"]) / 1e3, int(r["p99 latency"]) / 1e3))' "$work/pa.csv")" \
    || echo "$1 grpc: perf_analyzer failed"
}

# big MODEL GPU_RATES CPU_RATES DEADLINE_MS: the raw engine (batch 1 and 32) beside the hub at a cap
# of 32, on the GPU when there is one, then on the CPU provider.
big() {
  local model=$1
  mkdir -p "$work/repo-$model/$model/1"
  cp "build/gpu-models/$model/1/model.onnx" "$work/repo-$model/$model/1/"
  printf 'max_batch_size = 32\n' > "$work/repo-$model/$model/config.toml"
  for run in gpu cpu; do
    if [ $run = gpu ] && [ $gpu_there = 0 ]; then echo "== $model gpu: no GPU here (nvidia-smi), not taken"; continue; fi
    if [ $run = gpu ]; then providers='"tensorrt", "cuda", "cpu"'; raw=cuda; rates=$2; clients=16
    else providers='"cpu"'; raw=cpu; rates=$3; clients=2; fi
    echo "== $model raw ONNX Runtime ($raw)"
    "$py" scripts/bench/gpu_raw.py "build/gpu-models/$model/1/model.onnx" $raw 5 1 32
    echo "== $model hub $run"
    start_hub "hub-$model-$run" "$work/repo-$model" "$providers"
    local hl_var="hl_$model"
    for rate in $rates; do
      load "$model $run" "$url/v2/models/$model/infer" "$work/$model.bin" "${!hl_var}" $rate 6 $4
    done
    grpc_run "$model $run" $clients
    curl -s "$url/metrics" | grep -E '^fabric_(replicas|gpu_memory_mib|replicas_per_gpu)|^fabric_batch_size_(sum|count)'
    kill $pid
    wait $pid 2> /dev/null
  done
}
big resnet50 "500 2000 5000" "5 10 20" 2000
big encoder "500 2000 5000" "2 4" 2000

# ResNet-50 through an edge: an edge-node serving it with tract (one replica, 2 s deadline) alone,
# then offloading its overflow over QUIC to the hub (on the GPU where there is one), then sending
# every request to the hub. The hub's p50 below the edge's own is the case for offloading a big model.
if [ $gpu_there = 1 ]; then providers='"tensorrt", "cuda", "cpu"'; rates="20 200 1000"; else providers='"cpu"'; rates="3 6"; fi
start_hub "hub-offload" "$work/repo-resnet50" "$providers"
hub_pid=$pid
mkdir -p "$work/edge-repo/resnet50/1"
cp build/gpu-models/resnet50/1/model.onnx "$work/edge-repo/resnet50/1/"
printf 'max_batch_size = 8\nengine = "tract"\ndefault_timeout_ms = 2000\n' > "$work/edge-repo/resnet50/config.toml"
printf '[autoscale]\nenabled = false\n' > "$work/edge-overflow.toml"
printf '[autoscale]\nenabled = false\n[offload]\nmode = "always"\n' > "$work/edge-always.toml"
for mode in alone overflow always; do
  case $mode in
    alone) args=(--config "$work/edge-overflow.toml") ;;
    overflow) args=(--config "$work/edge-overflow.toml" --hub "hub-1@$quic" --certs "$work/certs" --node-id edge-1) ;;
    always) args=(--config "$work/edge-always.toml" --hub "hub-1@$quic" --certs "$work/certs" --node-id edge-1) ;;
  esac
  RUST_LOG=info "$bin/edge-node" --model-repository "$work/edge-repo" --http-addr 127.0.0.1:0 "${args[@]}" > "$work/edge-$mode.log" 2>&1 &
  edge=$!
  for _ in $(seq 600); do grep -q "listening on" "$work/edge-$mode.log" && break; sleep 0.2; done
  edge_url=$(grep -o "listening on http://[0-9.:]*" "$work/edge-$mode.log" | head -1 | sed 's/listening on //')
  sleep 1 # the edge's QUIC connection to the hub
  for rate in $rates; do
    load "resnet50 edge $mode" "$edge_url/v2/models/resnet50/infer" "$work/resnet50.bin" "$hl_resnet50" $rate 6 2000
  done
  curl -s "$edge_url/metrics" | grep -E '^fabric_(offload_attempts_total|routed_total)'
  kill $edge
  wait $edge 2> /dev/null
done
kill $hub_pid
wait $hub_pid 2> /dev/null
echo "figures in $out/gpu.txt"
