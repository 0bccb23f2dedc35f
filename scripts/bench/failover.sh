#!/usr/bin/env bash
# The failover benchmark: a replicated registry (3 replicas on a 3-member etcd cluster, Debian's
# etcd-server, all on loopback), two real edge nodes under closed-loop load and N simulated nodes
# (default 1,000) in the benchmark's process, every node knowing every replica. The leader is killed
# (SIGKILL) with a canary acknowledged: the new leader, every node reporting to it, the canary kept,
# its promotion on every node, the requests failed; then a slower canary's automatic rollback carried
# out by the next leader (model-registry/tests/failover_bench.rs, an ignored test run in release).
#
#   bash scripts/bench/failover.sh [N]
#
# Writes the figures to build/bench/failover.md (what it ran on first).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh > /dev/null
export ORT_DYLIB_PATH="$(cat build/ort-dylib-path)"
mkdir -p build/bench
out=build/bench/failover.md
{
  echo "Failover, $(date -u +%Y-%m-%d), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), release build, ${1:-1000} simulated nodes"
  echo
  echo "| what | figure |"
  echo "|---|---|"
} > "$out"
FAILOVER_SIMS=${1:-1000} FABRIC_FIGURES="$PWD/$out" RUST_LOG=error \
  cargo test --release --locked -p model-registry --test failover_bench -- --ignored --nocapture
cat "$out"
