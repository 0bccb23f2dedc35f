#!/usr/bin/env bash
# The main job: a whole local fabric on this machine, nothing installed by hand.
#
#   bash scripts/run-fabric.sh [--ha] [--no-build] [--bin-dir DIR] [--data DIR] [--base-port N]
#
# Installs what it needs (scripts/setup.sh: a Python venv, the generated and trained models, the ONNX
# Runtime library), builds the release binaries, makes development certificates, and starts on
# loopback:
#   - a model-registry  quic://127.0.0.1:7000      (embedded store: redb in DATA/registry), its
#                        status page on http://127.0.0.1:7080
#   - a cloud-hub        http://127.0.0.1:8100, quic://127.0.0.1:4433 (ONNX Runtime; CPU here)
#   - an edge-node       http://127.0.0.1:8000     (engine auto: the faster of tract and ONNX Runtime
#                                                   per model; offloads overflow to the hubs it learns
#                                                   from the registry)
# then pushes the trained digits classifier to the registry, deploys it to both nodes, waits until
# both serve it, and prints the endpoints and the next commands to paste. Ctrl-C stops everything.
# A second run reuses the state (DATA, default build/fabric): the registry remembers the model and the
# nodes serve it from their caches at once.
#
#   --ha            the replicated registry instead: a 3-member etcd cluster (Debian's etcd-server,
#                   members in DATA/etcd, client ports N+10, N+20, N+30) and three model-registry
#                   replicas on it (quic N, N+5, N+6; status pages N+4, N+7, N+8; one elected
#                   leader), every node and the CLI given all three (default DATA build/fabric-ha)
#   --no-build      use the binaries as they are (CI builds them itself)
#   --bin-dir DIR   where the binaries are (default target/release)
#   --data DIR      state and logs (default build/fabric)
#   --base-port N   registry N, hub QUIC N+1, edge HTTP N+2, hub HTTP N+3, status page N+4
#                   (default 7000, 4433, 8000, 8100, 7080)
set -euo pipefail
cd "$(dirname "$0")/.."

build=1
ha=0
bin=target/release
data=""
registry_port=7000 hub_quic=4433 edge_http=8000 hub_http=8100 page_port=7080
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) build=0 ;;
    --bin-dir) bin="$2"; shift ;;
    --data) data="$2"; shift ;;
    --base-port)
      registry_port="$2" hub_quic=$(($2 + 1)) edge_http=$(($2 + 2)) hub_http=$(($2 + 3)) page_port=$(($2 + 4))
      shift ;;
    --ha) ha=1 ;;
    -h | --help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run-fabric.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

[ -n "$data" ] || { [ "$ha" = 1 ] && data=build/fabric-ha || data=build/fabric; }
bash scripts/setup.sh
export ORT_DYLIB_PATH="$(cat build/ort-dylib-path)"
if [ "$build" = 1 ]; then
  echo "==> building the release binaries (a few minutes the first time)"
  cargo build --release --locked -p edge-node -p cloud-hub -p model-registry -p fabric-cli --bins
fi
for b in model-registry cloud-hub edge-node fabric; do
  [ -x "$bin/$b" ] || { echo "run-fabric.sh: $bin/$b is missing: build it, or drop --no-build" >&2; exit 1; }
done

certs="$data/certs"
mkdir -p "$data/logs" "$data/edge-1/repo" "$data/hub-1/repo"
[ -f "$certs/registry-3.pem" ] || "$bin/fabric" certs --out "$certs" --node registry-1:registry \
  --node registry-2:registry --node registry-3:registry --node hub-1:hub --node edge-1:edge \
  --node operator:operator > /dev/null

pids=()
stop() {
  trap - INT TERM EXIT
  if [ ${#pids[@]} -gt 0 ]; then
    echo "==> stopping the fabric"
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  echo "==> stopped (state kept in $data; run again to reuse it)"
}
trap stop EXIT
trap 'exit 130' INT TERM

# Starts a process with its log in $data/logs/NAME.log and waits (60 s) for its listening line.
start() {
  local name=$1 line=$2
  shift 2
  : > "$data/logs/$name.log"
  "$@" > "$data/logs/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 600); do
    grep -q "$line" "$data/logs/$name.log" && return 0
    kill -0 "${pids[-1]}" 2>/dev/null || { echo "$name exited; its log:" >&2; tail -20 "$data/logs/$name.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "$name did not start within 60 s; its log: $data/logs/$name.log" >&2
  exit 1
}

registry="registry-1@127.0.0.1:$registry_port"
export RUST_LOG=${RUST_LOG:-info}
if [ "$ha" = 0 ]; then
  start registry "listening on" "$bin/model-registry" --listen "127.0.0.1:$registry_port" \
    --http-addr "127.0.0.1:$page_port" \
    --data-dir "$data/registry" --certs "$certs"
else
  command -v etcd > /dev/null || { echo "run-fabric.sh --ha: etcd is missing (scripts/setup.sh installs etcd-server)" >&2; exit 1; }
  etcd_ports=($((registry_port + 10)) $((registry_port + 20)) $((registry_port + 30)))
  initial=""
  for i in 0 1 2; do initial+="${initial:+,}m$i=http://127.0.0.1:$((etcd_ports[i] + 1))"; done
  endpoints=""
  for i in 0 1 2; do
    c=${etcd_ports[i]}
    endpoints+="${endpoints:+,}127.0.0.1:$c"
    state=new; [ -d "$data/etcd/m$i/member" ] && state=existing
    # Started together (each member waits for the others to form the cluster), waited for below.
    etcd --name "m$i" --data-dir "$data/etcd/m$i" \
      --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
      --listen-peer-urls "http://127.0.0.1:$((c + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((c + 1))" \
      --initial-cluster "$initial" --initial-cluster-token fabric-ha --initial-cluster-state "$state" \
      --logger zap --log-outputs stderr > "$data/logs/etcd-$i.log" 2>&1 &
    pids+=($!)
  done
  for i in 0 1 2; do
    for n in $(seq 600); do
      curl -sf "http://127.0.0.1:${etcd_ports[i]}/health" 2> /dev/null | grep -q '"true"' && break
      [ "$n" = 600 ] && { echo "etcd member $i did not start within 60 s; its log: $data/logs/etcd-$i.log" >&2; exit 1; }
      sleep 0.1
    done
  done
  replica_ports=("$registry_port" $((registry_port + 5)) $((registry_port + 6)))
  page_ports=("$page_port" $((registry_port + 7)) $((registry_port + 8)))
  registry=""
  for i in 0 1 2; do
    registry+="${registry:+,}registry-$((i + 1))@127.0.0.1:${replica_ports[i]}"
  done
  for i in 0 1 2; do
    start "registry-$((i + 1))" "listening on" "$bin/model-registry" --listen "127.0.0.1:${replica_ports[i]}" \
      --http-addr "127.0.0.1:${page_ports[i]}" --node-id "registry-$((i + 1))" --certs "$certs" \
      --store "etcd://$endpoints" --data-dir "$data/registry"
  done
  for i in $(seq 300); do
    grep -q "model-registry leader" "$data"/logs/registry-*.log && break
    [ "$i" = 300 ] && { echo "no registry replica became leader within 30 s; logs in $data/logs" >&2; exit 1; }
    sleep 0.1
  done
fi
start hub-1 "cloud-hub listening on" "$bin/cloud-hub" --model-repository "$data/hub-1/repo" --certs "$certs" \
  --node-id hub-1 --http-addr "127.0.0.1:$hub_http" --quic-addr "127.0.0.1:$hub_quic" \
  --registry "$registry" --data-dir "$data/hub-1"
# The edge's cascade: what digits-small is less than 90% sure of goes to the hub's digits.
printf '[cascade.digits-small]\nto = "digits"\nthreshold = 0.9\n' > "$data/edge-1.toml"
start edge-1 "edge-node listening on" "$bin/edge-node" --model-repository "$data/edge-1/repo" --certs "$certs" \
  --node-id edge-1 --http-addr "127.0.0.1:$edge_http" --registry "$registry" --data-dir "$data/edge-1" \
  --label site=local --config "$data/edge-1.toml"
node_pids=("${pids[-2]}" "${pids[-1]}")

fabric() { FABRIC_REGISTRY="$registry" FABRIC_CERTS="$certs" FABRIC_ID=operator "$bin/fabric" "$@"; }
# What the registry already holds (a second run reuses it); retried, since a busy machine can take a
# moment to answer the first call.
models=""
for i in $(seq 30); do
  models=$(fabric model list --output json 2> "$data/logs/fabric.err") && break
  [ "$i" = 30 ] && { echo "cannot list the registry's models: $(cat "$data/logs/fabric.err")" >&2; exit 1; }
  sleep 0.5
done
if ! grep -q '"name": *"digits"' <<< "$models"; then
  echo "==> pushing the trained digits classifier (build/models/digits/1/model.onnx), its training inputs as the reference for drift"
  fabric model push digits build/models/digits/1/model.onnx --reference build/reference/digits/train.npz > /dev/null
fi
if ! grep -q '"name": *"digits-small"' <<< "$models"; then
  echo "==> pushing the small digits classifier of the edge's cascade (build/models/digits_small/1/model.onnx)"
  fabric model push digits-small build/models/digits_small/1/model.onnx --reference build/reference/digits/train.npz > /dev/null
fi
fabric deploy digits --to all > /dev/null
fabric deploy digits-small --to edge > /dev/null
echo "==> waiting for both nodes to serve digits"
for url in "http://127.0.0.1:$edge_http" "http://127.0.0.1:$hub_http"; do
  for i in $(seq 600); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/v2/models/digits/ready")" = 200 ] && break
    [ "$i" = 600 ] && { echo "digits not ready on $url within 60 s; logs in $data/logs" >&2; exit 1; }
    sleep 0.1
  done
done
for i in $(seq 600); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$edge_http/v2/models/digits-small/ready")" = 200 ] && break
  [ "$i" = 600 ] && { echo "digits-small not ready on the edge within 60 s; logs in $data/logs" >&2; exit 1; }
  sleep 0.1
done

cat <<EOF

The fabric is up (logs in $data/logs):
  model-registry  $registry  status page http://127.0.0.1:$page_port
  cloud-hub       http://127.0.0.1:$hub_http   quic://127.0.0.1:$hub_quic
  edge-node       http://127.0.0.1:$edge_http  (KServe v2; offloads overflow to the hub)

Next, in another shell:
  export FABRIC_REGISTRY=$registry FABRIC_CERTS=$certs
  $bin/fabric nodes
  $bin/fabric rollout status digits
  $bin/fabric top                                              # the status page, in the terminal
  curl -s http://127.0.0.1:$edge_http/v2/models/digits | python3 -m json.tool
  .venv/bin/python examples/edge_app.py --url 127.0.0.1:$edge_http          # digits through the edge
  .venv/bin/python examples/canary.py --url 127.0.0.1:$edge_http --registry $registry --certs $certs --fabric $bin/fabric
                                             # retrain, canary 10% -> 50%, promote, a bad version rolled back
  .venv/bin/python examples/cascade.py --url 127.0.0.1:$edge_http         # digits-small escalating to digits
  .venv/bin/python examples/drift.py --url 127.0.0.1:$edge_http --registry $registry --certs $certs --fabric $bin/fabric
                                             # held-out digits, then brightened ones: fabric drift digits

fabric ready (Ctrl-C stops everything)
EOF
# Any process exiting stops the fabric, but for a replica or an etcd member of the replicated form
# (the others carry on: kill the leader and watch another take over).
watched=("${pids[@]}")
[ "$ha" = 1 ] && watched=("${node_pids[@]}")
wait -n "${watched[@]}" || true
echo "a fabric process exited; see $data/logs" >&2
exit 1
