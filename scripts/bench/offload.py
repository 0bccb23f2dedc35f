#!/usr/bin/env python3
"""Offload benchmark (edge to hub over QUIC), in one run on one machine, load from compiled clients.

1. What the QUIC round trip to a hub on loopback adds over serving locally: the MLP with binary
   tensors at concurrency 1 (wrk), on an edge serving locally and on an edge that sends every request
   to the hub (`offload.mode = "always"`; the hub runs the same tract engine, so only the transport
   differs).
2. Goodput (answers within the deadline per second) at 2x, 3x and 5x the edge's capacity, open loop
   (edge-node's `openloop` example), for the CNN, with and without a hub (the hub on ONNX Runtime).
3. Without a hub, at 1.25x and 3x: latency-first admission (the queueing target,
   `model_defaults.queue_wait_pct` = 25) beside the standing queue it replaced (the target off, 100):
   goodput, served p50 / p99 and how fast refusals come.

Run through scripts/bench/offload.sh.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from serving import BUILD, ROOT, machine, save_report, to_ms  # noqa: E402

REL = ROOT / "target" / "release"
DEADLINE_MS = 500
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
RUNS = int(os.environ.get("BENCH_RUNS", "5"))  # alternating runs of each admission setting


def start(cmd, marker):
    """Starts a fabric binary and waits for its first line; its logs (errors only, or BENCH_RUST_LOG's
    filter, to see what a node decided) go to this script's standard error."""
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "RUST_LOG": os.environ.get("BENCH_RUST_LOG", "error")})
    line = proc.stdout.readline()
    if marker not in line:
        raise SystemExit(f"{cmd[0]} failed to start: {line!r}")
    return proc, line.strip()


def wrk(url, body, header_length, connections, secs, script):
    env = {**os.environ, "BENCH_BODY": str(body), "BENCH_HEADER_LENGTH": str(header_length),
           "BENCH_CONTENT_TYPE": "application/octet-stream"}
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{secs}s", "--latency", "-s", str(script), url],
                         env=env, capture_output=True, text=True, check=True).stdout
    # Answers with outputs only: wrk counts a 503 as a request done.
    refused = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)) - (int(refused.group(1)) / secs if refused else 0.0)
    return rps, to_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))


def engine_time(url):
    """The CNN replicas' engine seconds, batches and rows so far, from the node's /metrics."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    total = {"engine_s": 0.0, "batches": 0.0, "rows": 0.0}
    for line in text.splitlines():
        if line.startswith("#") or 'model="cnn"' not in line:
            continue
        name, value = line.split("{")[0], float(line.split()[-1])
        key = {"fabric_compute_duration_seconds_sum": "engine_s", "fabric_batch_size_count": "batches",
               "fabric_batch_size_sum": "rows"}.get(name)
        if key:
            total[key] += value
    return total


def binary_body(path, rows, width_shape):
    import numpy as np

    shape = [rows, *width_shape]
    data = (np.arange(np.prod(shape)) % 17 / 17.0).astype("<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "parameters": {"binary_data_size": len(data)}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]}).encode()
    path.write_bytes(head + data)
    return len(head)


def main():
    work = pathlib.Path(tempfile.mkdtemp(prefix="fabric-offload-bench-"))
    (work / "post.lua").write_text((pathlib.Path(__file__).parent / "serving.py").read_text().split('LUA = """')[1].split('"""')[0])
    subprocess.run([REL / "fabric", "certs", "--out", work / "certs", "--node", "hub-1:hub", "--node", "edge-1:edge"],
                   check=True, capture_output=True)
    for repo in ("hub", "edge"):
        for model in ("mlp", "cnn"):
            (work / repo / model / "1").mkdir(parents=True)
            (work / repo / model / "1" / "model.onnx").symlink_to(BUILD / "models" / model / "1" / "model.onnx")
    (work / "hub" / "mlp" / "config.toml").write_text('engine = "tract"\n')
    # tract, as the figures in docs/benchmarks.md were taken (auto may pick ONNX Runtime on another CPU).
    (work / "edge" / "cnn" / "config.toml").write_text(f'default_timeout_ms = {DEADLINE_MS}\nmax_batch_size = 8\nengine = "tract"\n')
    # One replica per model, as the figures in docs/benchmarks.md were taken (the nodes' autoscaler off).
    (work / "fixed.toml").write_text('[autoscale]\nenabled = false\n')
    (work / "always.toml").write_text('[offload]\nmode = "always"\n[autoscale]\nenabled = false\n')
    (work / "standing.toml").write_text('[autoscale]\nenabled = false\n[model_defaults]\nqueue_wait_pct = 100\n')

    hub, line = start([REL / "cloud-hub", "--model-repository", work / "hub", "--certs", work / "certs",
                       "--http-addr", "127.0.0.1:0", "--quic-addr", "127.0.0.1:0", "--config", work / "fixed.toml"],
                      "cloud-hub listening")
    quic = line.split("quic://")[1]
    common = ["--model-repository", work / "edge", "--http-addr", "127.0.0.1:0"]
    via_hub = ["--hub", f"hub-1@{quic}", "--certs", work / "certs"]
    local, line_local = start([REL / "edge-node", *common, "--config", work / "fixed.toml"], "listening")
    always, line_always = start([REL / "edge-node", *common, *via_hub, "--config", work / "always.toml"], "listening")
    overflow, line_overflow = start([REL / "edge-node", *common, *via_hub, "--config", work / "fixed.toml"], "listening")
    standing, line_standing = start([REL / "edge-node", *common, "--config", work / "standing.toml"], "listening")
    url = {name: l.split("listening on ")[1] for name, l in
           [("local", line_local), ("always", line_always), ("overflow", line_overflow), ("standing", line_standing)]}
    time.sleep(1.0)  # let the edges connect to the hub
    rows = []
    try:
        mlp_n = binary_body(work / "mlp.bin", 1, [784])
        for name in ("local", "always"):
            rps, p50 = wrk(f"{url[name]}/v2/models/mlp/infer", work / "mlp.bin", mlp_n, 1, 8, work / "post.lua")
            rows.append(("mlp", name, rps, p50))
            print(rows[-1], flush=True)

        cnn_n = binary_body(work / "cnn.bin", 4, [3, 64, 64])
        capacity, _ = wrk(f"{url['local']}/v2/models/cnn/infer", work / "cnn.bin", cnn_n, 4, 5, work / "post.lua")
        print(f"edge capacity, CNN 4 rows: {capacity:.0f} req/s", flush=True)

        def open_loop(name, mult):
            before = engine_time(url[name])
            out = subprocess.run([REL / "examples" / "openloop", f"{url[name]}/v2/models/cnn/infer", work / "cnn.bin",
                                  str(cnn_n), str(capacity * mult), str(SECONDS), str(DEADLINE_MS)],
                                 capture_output=True, text=True, check=True).stdout
            result = json.loads(out)
            # The replica's own account of the run: how long its engine ran, in how many batches of how
            # many rows (the window runs from the first request to the last answer, about SECONDS).
            after = engine_time(url[name])
            batches = after["batches"] - before["batches"]
            result["engine_busy_pct"] = 100 * (after["engine_s"] - before["engine_s"]) / SECONDS
            result["engine_ms_per_batch"] = 1e3 * (after["engine_s"] - before["engine_s"]) / max(1, batches)
            result["rows_per_batch"] = (after["rows"] - before["rows"]) / max(1, batches)
            print((mult, name, json.dumps(result)), flush=True)
            return mult, name, result

        # Five alternating runs of each, the median kept: one run's goodput moves by a fifth or more on
        # a shared machine, more than the difference looked for. Compared on the steady goodput: a
        # standing queue answers its last 375 ms of requests after the load stops, which the plain
        # goodput (answers in time over the run's length) credits it with.
        alone = []
        for mult in (1.25, 3):
            for name in ("local", "standing"):
                alone.append((mult, name, []))
            # The order flips every pair (A B, B A, ...): a drift of the shared machine over the minutes
            # of the runs then falls on both settings alike.
            for i in range(RUNS):
                pair = alone[-2:] if i % 2 == 0 else alone[-2:][::-1]
                for entry in pair:
                    entry[2].append(open_loop(entry[1], mult)[2])
        alone = [(m, n, sorted(runs, key=lambda r: r["steady_goodput"])[RUNS // 2], runs) for m, n, runs in alone]
        goodput = [open_loop(name, mult) for mult in (2, 3, 5) for name in ("local", "overflow")]
    finally:
        for p in (local, always, overflow, standing, hub):
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=30)

    local_p50 = next(r[3] for r in rows if r[1] == "local")
    hub_p50 = next(r[3] for r in rows if r[1] == "always")
    lines = [
        f"Offload benchmark, {time.strftime('%Y-%m-%d')}, on {machine()}; edge-node, cloud-hub and clients on the same cores.",
        "",
        "| MLP, binary, concurrency 1 | infer/s | p50 ms |",
        "|---|---:|---:|",
        *[f"| {'served locally' if r[1] == 'local' else 'every request via the hub (QUIC, mTLS)'} | {r[2]:.0f} | {r[3]:.3f} |" for r in rows],
        "",
        f"QUIC round trip to the hub adds {hub_p50 - local_p50:.3f} ms at p50.",
        "",
        f"CNN, 4 rows per request, deadline {DEADLINE_MS} ms, edge capacity {capacity:.0f} req/s (1 tract replica), open loop {SECONDS} s:",
        "",
        "| offered | hub | sent | goodput/s | offloaded | refused (503) | late | served locally p50 / p99 ms | all served p50 / p99 ms | refusal p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mult, name, r in goodput:
        offered = capacity * mult
        lines.append(f"| {mult}x ({offered:.0f}/s) | {'yes' if name == 'overflow' else 'no'} | {r['sent']} | {r['goodput']:.0f} | "
                     f"{r['offloaded']} | {r['refused']} | {r['late']} | {r['local_p50_ms']:.1f} / {r['local_p99_ms']:.1f} | "
                     f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} | {r['refused_p99_ms']:.1f} |")
    hub_goodput = {m: r["goodput"] for m, n, r in goodput if n == "overflow"}
    local_goodput = {m: r["goodput"] for m, n, r in goodput if n == "local"}
    lines += [
        "",
        f"With a hub, goodput at 5x / goodput at 3x: {hub_goodput[5] / hub_goodput[3]:.2f} (target >= 0.9); "
        f"with / without a hub at 2x, 3x, 5x: " + ", ".join(f"{hub_goodput[m] / local_goodput[m]:.2f}" for m in (2, 3, 5)) + ".",
    ]
    lines += [
        "",
        f"Without a hub: latency-first admission (`queue_wait_pct` = 25, the default) beside a standing queue (100), deadline {DEADLINE_MS} ms; "
        f"each row the median run of {RUNS} by steady goodput (requests due after the first second and before the last), "
        "the two settings alternating (the order flipped every pair); the range is over all runs:",
        "",
        "| offered | admission | sent | steady goodput/s (range) | goodput/s | refused (503) | late | served p50 / p99 ms | served p50 in % of the deadline | refusal p99 ms (range) | engine busy % | engine ms / batch (range) | rows / batch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mult, name, r, runs in alone:
        steady = sorted(x["steady_goodput"] for x in runs)
        # A run with no refusal has no refusal p99 (NaN), left out of the range.
        refusal = sorted(x["refused_p99_ms"] for x in runs if x["refused_p99_ms"] == x["refused_p99_ms"]) or [float("nan")]
        per_batch = sorted(x["engine_ms_per_batch"] for x in runs)
        lines.append(f"| {mult}x ({capacity * mult:.0f}/s) | {'latency first' if name == 'local' else 'standing queue'} | {r['sent']} | "
                     f"{r['steady_goodput']:.0f} ({steady[0]:.0f}-{steady[-1]:.0f}) | {r['goodput']:.0f} | {r['refused']} | {r['late']} | "
                     f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} | {100 * r['p50_ms'] / DEADLINE_MS:.0f}% | "
                     f"{r['refused_p99_ms']:.1f} ({refusal[0]:.1f}-{refusal[-1]:.1f}) | {r['engine_busy_pct']:.0f} | "
                     f"{r['engine_ms_per_batch']:.2f} ({per_batch[0]:.2f}-{per_batch[-1]:.2f}) | {r['rows_per_batch']:.1f} |")
    first = {m: r["steady_goodput"] for m, n, r, _ in alone if n == "local"}
    standing_goodput = {m: r["steady_goodput"] for m, n, r, _ in alone if n == "standing"}
    # Goodput per engine second: what admission itself costs or wins, apart from how fast the shared
    # cores ran the engine in that run.
    per_engine = {(m, n): r["steady_goodput"] / max(1e-9, r["engine_busy_pct"] / 100) for m, n, r, _ in alone}
    lines += ["", "Steady goodput latency first / standing queue at 1.25x, 3x: " +
              ", ".join(f"{first[m] / standing_goodput[m]:.2f}" for m in (1.25, 3)) +
              "; engine busy latency first / standing queue: " +
              ", ".join(f"{next(r['engine_busy_pct'] for mm, n, r, _ in alone if mm == m and n == 'local'):.0f}% / "
                        f"{next(r['engine_busy_pct'] for mm, n, r, _ in alone if mm == m and n == 'standing'):.0f}%" for m in (1.25, 3)) +
              "; steady goodput per engine-busy second: " +
              ", ".join(f"{per_engine[(m, 'local')]:.0f} / {per_engine[(m, 'standing')]:.0f}" for m in (1.25, 3)) + "."]
    save_report("offload", lines)


if __name__ == "__main__":
    main()
