#!/usr/bin/env bash
# The fleet benchmark: a release model-registry driven by the fleet simulator
# (model-registry/examples/fleet_sim.rs): N simulated nodes in one process speaking the registry's
# QUIC protocol, each with its own certificate, heartbeating as the node agent does; connect from
# cold, steady state, canary / promote / rollback propagation, reads, and a kill -9 and restart.
# Simulator and registry share this machine's cores.
#
#   bash scripts/bench/fleet.sh [N ...]        default: 1000 3000 10000
#   STEADY_S=600 bash scripts/bench/fleet.sh 10000    (RSS flat over 10 minutes)
#
# Writes build/bench/fleet-N.json per size and a markdown table to build/bench/fleet.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh > /dev/null
cargo build --release --locked -p model-registry --bin model-registry --example fleet_sim
mkdir -p build/bench
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(1000 3000 10000)
# The kernel caps socket buffers at net.core.rmem_max; raise it where we may (a fleet drops datagrams
# with the ~200 KiB default).
for knob in net.core.rmem_max net.core.wmem_max; do
  if [ "$(sysctl -n $knob 2>/dev/null || echo 0)" -lt 8388608 ]; then
    sysctl -qw $knob=8388608 2>/dev/null || echo "note: cannot raise $knob (not root?); the registry logs the buffer it got"
  fi
done
for n in "${sizes[@]}"; do
  echo "==> $n simulated nodes"
  ramp=$(( n / 250 )); [ $ramp -ge 2 ] || ramp=2   # 250 new nodes a second (10,000 in 40 s)
  target/release/examples/fleet_sim --nodes "$n" --hubs 4 --ramp-s "$ramp" --steady-s "${STEADY_S:-30}" \
    --registry-bin target/release/model-registry \
    --model build/models/mlp/1/model.onnx --model2 build/models/mlp_alt/1/model.onnx \
    --out "build/bench/fleet-$n.json" > /dev/null
done
.venv/bin/python - "${sizes[@]}" <<'PY'
import json, sys
rows = []
for n in sys.argv[1:]:
    r = json.load(open(f"build/bench/fleet-{n}.json"))
    c, s, rs = r["connect"], r["steady"], r["restart"]
    f = lambda x: "nan" if x != x else f"{x:,.0f}"
    ch = lambda k: f'{f(r[k]["p50_ms"])} / {f(r[k]["p99_ms"])} / {f(r[k]["max_ms"])} ms ({r[k]["within_1s_pct"]:.1f}% in 1 s, {r[k]["reached"]:,} of {r[k]["of"]:,})'
    rd = r["reads"]
    rows.append(f'| {int(n):,} | {c["connected"]:,} in {c["s"]:.1f} s (ramp {c["ramp_s"]:.0f} s), {c["errors"]} retried | '
                f'{s["cpu_pct"]:.1f}% | {s["rss_mib_min"]:.0f}-{s["rss_mib_max"]:.0f} MiB | {s["heartbeats_per_s"]:,.0f}/s | '
                f'{ch("canary")} | {ch("promote")} | {ch("rollback")} | '
                f'{rd["nodes --state down"]["max_ms"]:.0f} / {rd["rollout status"]["max_ms"]:.0f} / {rd["status page data"]["max_ms"]:.0f} ms | '
                f'{rs["reconnected"]:,} in {rs["s_from_kill"]:.1f} s, {rs["retried_heartbeats"]:,} retried, {rs["nodes_marked_down"]:,} marked down meanwhile |')
machine = json.load(open(f"build/bench/fleet-{sys.argv[1]}.json"))["machine"]
out = [f"Fleet benchmark on {machine} (registry and simulator on the same cores)", "",
       "| nodes | connect from cold | registry CPU, steady (1 core = 100%) | RSS | heartbeats | canary reaches every node p50 / p99 / max | promote | rollback | nodes --state down / rollout status / status page, max | kill -9 + restart: reconnected |",
       "|---:|---|---:|---:|---:|---|---|---|---|---|"] + rows
open("build/bench/fleet.md", "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
