#!/usr/bin/env bash
# The main command and the examples, end to end, on the debug build (scripts/test.sh runs this after
# the test suites; each step is bounded):
#   1. scripts/run-fabric.sh --no-build on spare ports, until it says the fabric is ready;
#   2. examples/edge_app.py (the held-out digits through the edge, accuracy checked),
#      examples/canary.py (retrain, canary, promote, a bad version rolled back automatically),
#      examples/drift.py (held-out digits: no drift; brightened ones: drift on the right pixels) and
#      examples/cascade.py (digits-small on the edge escalating to digits on the hub, thresholds swept);
#   3. the fabric stopped (SIGTERM, what Ctrl-C does) with nothing left running, started again
#      reusing its state (no second push), stopped again;
#   4. scripts/run-fabric.sh --ha (3 etcd members, 3 registry replicas): the digits through the edge,
#      the leader killed, a change made through the next leader, stopped with nothing left running;
#   5. examples/cluster/run.sh (two hubs, two edges, a hub killed under load).
set -euo pipefail
cd "$(dirname "$0")/.."
export ORT_DYLIB_PATH="$(cat build/ort-dylib-path)"
cargo build --locked -q -p edge-node -p cloud-hub -p model-registry -p fabric-cli --bins
data=build/ci-fabric
rm -rf "$data"
log=$(mktemp)
fabric_pid=""
trap '[ -n "$fabric_pid" ] && kill "$fabric_pid" 2>/dev/null; rm -f "$log"' EXIT

start_fabric() {
  : > "$log"
  bash scripts/run-fabric.sh --no-build --bin-dir target/debug --data "$data" --base-port "${base:-17400}" "$@" > "$log" 2>&1 &
  fabric_pid=$!
  for _ in $(seq 1800); do
    grep -q "^fabric ready" "$log" && return 0
    kill -0 "$fabric_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "the fabric did not come up; its output:" >&2
  cat "$log" >&2
  exit 1
}

stop_fabric() {
  kill -TERM "$fabric_pid"
  timeout 60 tail --pid="$fabric_pid" -f /dev/null
  fabric_pid=""
  grep -q "==> stopped" "$log" || { echo "run-fabric.sh did not stop cleanly:" >&2; cat "$log" >&2; exit 1; }
  if pgrep -f "$data" > /dev/null; then
    echo "processes left running after the stop:" >&2
    pgrep -af "$data" >&2
    exit 1
  fi
}

echo "==> main command: scripts/run-fabric.sh (debug build)"
start_fabric
grep -q "pushing the trained digits" "$log"
echo "==> examples/edge_app.py"
timeout 300 .venv/bin/python examples/edge_app.py --url 127.0.0.1:17402
echo "==> examples/canary.py"
timeout 600 .venv/bin/python examples/canary.py --url 127.0.0.1:17402 --registry registry-1@127.0.0.1:17400 \
  --certs "$data/certs" --fabric target/debug/fabric
echo "==> examples/drift.py"
timeout 300 .venv/bin/python examples/drift.py --url 127.0.0.1:17402 --registry registry-1@127.0.0.1:17400 \
  --certs "$data/certs" --fabric target/debug/fabric
echo "==> examples/cascade.py"
timeout 600 .venv/bin/python examples/cascade.py --url 127.0.0.1:17402
stop_fabric
echo "==> main command again: reuses its state"
start_fabric
if grep -q "pushing the trained digits" "$log"; then
  echo "the second run pushed the model again instead of reusing the registry's state; its output:" >&2
  cat "$log" >&2
  exit 1
fi
timeout 120 .venv/bin/python examples/edge_app.py --url 127.0.0.1:17402 --senders 2
stop_fabric
echo "==> main command, replicated: scripts/run-fabric.sh --ha"
data=build/ci-fabric-ha base=17500
rm -rf "$data"
start_fabric --ha
timeout 120 .venv/bin/python examples/edge_app.py --url 127.0.0.1:17502 --senders 2
leader=$(grep -l "model-registry leader" "$data"/logs/registry-*.log | head -1)
pid=$(pgrep -f -- "--node-id $(basename "$leader" .log) " | head -1)
echo "    killing the leader ($(basename "$leader" .log), pid $pid)"
kill -9 "$pid"
ha_registry="registry-1@127.0.0.1:17500,registry-2@127.0.0.1:17505,registry-3@127.0.0.1:17506"
ok=0
for _ in $(seq 60); do
  if FABRIC_REGISTRY="$ha_registry" FABRIC_CERTS="$data/certs" target/debug/fabric deploy digits --to all --replicas 1 > /dev/null 2>&1; then
    ok=1; break
  fi
  sleep 0.5
done
[ "$ok" = 1 ] || { echo "no change went through after the leader was killed" >&2; exit 1; }
timeout 120 .venv/bin/python examples/edge_app.py --url 127.0.0.1:17502 --senders 2
stop_fabric
echo "==> examples/cluster/run.sh"
timeout 600 bash examples/cluster/run.sh --bin-dir target/debug
echo "==> examples: all passed"
