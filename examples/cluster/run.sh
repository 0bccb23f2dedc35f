#!/usr/bin/env bash
# A two-hub cluster with two edges, one config file each (examples/cluster/*.toml), on loopback:
# a registry on quic://127.0.0.1:9000, hub-1 and hub-2, edge-1 and edge-2 (which learn the hubs from
# the registry and send everything to a hub while one is usable). It pushes the MLP, deploys it
# everywhere, drives traffic through both edges, shows how the offload spreads over the hubs (from
# the edges' own metrics), kills hub-1 (SIGKILL) under that traffic and shows the offload moving to
# hub-2 with every request still answered, then stops everything. The registry's status page is on
# http://127.0.0.1:9080 meanwhile.
#
#   bash examples/cluster/run.sh [--bin-dir target/release]     (run scripts/run-fabric.sh once first,
#                                                               or build: cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=target/release
[ "${1:-}" = "--bin-dir" ] && bin="$2"
export ORT_DYLIB_PATH="$(cat build/ort-dylib-path)" RUST_LOG=${RUST_LOG:-warn}
data=build/cluster
rm -rf "$data"
mkdir -p "$data/logs" "$data"/{hub-1,hub-2,edge-1,edge-2}/repo
"$bin/fabric" certs --out "$data/certs" --node registry-1:registry --node hub-1:hub --node hub-2:hub \
  --node edge-1:edge --node edge-2:edge --node operator:operator > /dev/null

pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; echo "==> cluster stopped"' EXIT
start() {  # name, the line it prints when listening, command...
  local name=$1 line=$2
  shift 2
  "$@" > "$data/logs/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 600); do
    grep -q "$line" "$data/logs/$name.log" && return 0
    sleep 0.1
  done
  echo "$name did not start; see $data/logs/$name.log" >&2
  exit 1
}
start registry "listening on" "$bin/model-registry" --listen 127.0.0.1:9000 --http-addr 127.0.0.1:9080 --data-dir "$data/registry" \
  --certs "$data/certs" --hub-idle-to-zero-s 0
start hub-1 "listening on" "$bin/cloud-hub" --config examples/cluster/hub-1.toml
hub1=${pids[-1]}
start hub-2 "listening on" "$bin/cloud-hub" --config examples/cluster/hub-2.toml
start edge-1 "listening on" "$bin/edge-node" --config examples/cluster/edge-1.toml
start edge-2 "listening on" "$bin/edge-node" --config examples/cluster/edge-2.toml

export FABRIC_REGISTRY=registry-1@127.0.0.1:9000 FABRIC_CERTS=$data/certs
"$bin/fabric" model push mlp build/models/mlp/1/model.onnx > /dev/null
"$bin/fabric" deploy mlp --to all > /dev/null
for url in 127.0.0.1:9110 127.0.0.1:9120 127.0.0.1:9210 127.0.0.1:9220; do
  for i in $(seq 600); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$url/v2/models/mlp/ready")" = 200 ] && break
    [ "$i" = 600 ] && { echo "mlp not ready on $url; logs in $data/logs" >&2; exit 1; }
    sleep 0.1
  done
done
"$bin/fabric" nodes

.venv/bin/python - "$hub1" <<'PY'
import os, signal, sys, threading, time
import numpy as np
import tritonclient.http as httpclient
import urllib.request

edges = ["127.0.0.1:9210", "127.0.0.1:9220"]
answers, lock, stop = [], threading.Lock(), threading.Event()

def send(url):
    client = httpclient.InferenceServerClient(url=url)
    x = np.random.default_rng(0).random((1, 784), dtype=np.float32)
    while not stop.is_set():
        request = httpclient.InferInput("input", [1, 784], "FP32")
        request.set_data_from_numpy(x, binary_data=True)
        try:
            served_by = client.infer("mlp", [request]).get_response()["parameters"]["served_by"]
            outcome = ("ok", served_by)
        except Exception as e:
            outcome = ("failed", str(e))
        with lock:
            answers.append((time.monotonic(), *outcome))

def offload_counts():
    """Offloads each hub served, summed over both edges' /metrics."""
    counts = {}
    for url in edges:
        text = urllib.request.urlopen(f"http://{url}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith("fabric_offload_attempts_total{") and 'outcome="served"' in line:
                hub = line.split('hub="')[1].split('"')[0]
                counts[hub] = counts.get(hub, 0) + int(float(line.rsplit(" ", 1)[1]))
    return counts

def summary(since):
    with lock:
        window = [a for a in answers if a[0] >= since]
    by = {}
    for _, outcome, who in window:
        key = who if outcome == "ok" else "FAILED"
        by[key] = by.get(key, 0) + 1
    return len(window), by

threads = [threading.Thread(target=send, args=(url,)) for url in edges for _ in range(2)]
for t in threads:
    t.start()
t0 = time.monotonic()
time.sleep(4)
print(f"==> 4 s of traffic through both edges: {summary(t0)}")
print(f"    offloads served per hub (the edges' fabric_offload_attempts_total): {offload_counts()}")
killed = time.monotonic()
os.kill(int(sys.argv[1]), signal.SIGKILL)
print("==> hub-1 killed (SIGKILL)")
time.sleep(6)
stop.set()
for t in threads:
    t.join()
n, by = summary(killed)
print(f"==> the 6 s after the kill: {n} answers {by}")
print(f"    offloads served per hub since the start: {offload_counts()}")
failed = sum(1 for a in answers if a[1] != "ok")
print(f"==> {len(answers)} requests, {failed} failed")
sys.exit(1 if failed else 0)
PY
"$bin/fabric" nodes
