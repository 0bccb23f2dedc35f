#!/usr/bin/env python3
"""Serving benchmark: edge-node vs the raw engines vs a Python peer, in one run on one machine.

Load comes from wrk (C, closed loop), never from Python. For each model (MLP, CNN, digits), body
format (JSON, binary tensors) and concurrency (1, 4, 16, 64) it reports infer/s and p50/p90/p99 of
edge-node at default settings (engine `auto`) and of FastAPI + onnxruntime (2 uvicorn workers) on the
same model files and bodies; beside them the raw engines (`cargo bench --bench engines`, same run)
and the engine `auto` chose per model. It also reports edge-node's start-to-ready time and resident
memory with the three models loaded, and the cost of counting drift: the digits served side by side
with and without reference statistics (made by a real model-registry from the training sample),
alternating runs, the ratio of their rates.

Run through scripts/bench/serving.sh, which builds and installs what this needs.
"""

import datetime
import json
import os
import pathlib
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD = ROOT / "build"
DURATION = int(os.environ.get("BENCH_SECONDS", "8"))
CONCURRENCY = [int(c) for c in os.environ.get("BENCH_CONCURRENCY", "1,4,16,64").split(",")]
# BENCH_MODELS= (empty) runs only the drift-counting comparison (and the raw engines).
MODELS = [m for m in os.environ.get("BENCH_MODELS", "mlp,cnn,digits").split(",") if m]
COUNTING_ROUNDS = int(os.environ.get("BENCH_COUNTING_ROUNDS", "3"))
LUA = """
wrk.method = "POST"
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
local n = os.getenv("BENCH_HEADER_LENGTH")
if n ~= "" then wrk.headers["Inference-Header-Content-Length"] = n end
"""


def machine():
    cpu = "unknown CPU"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def save_report(kind, lines):
    """Prints a markdown report and saves it as build/bench/<kind>-<date>.md."""
    report = "\n".join(lines)
    out = BUILD / "bench" / f"{kind}-{time.strftime('%Y-%m-%d')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    print(report + f"\n\nwritten to {out}")


def reference_input(model, case):
    manifest = json.loads((BUILD / "reference" / model / case / "manifest.json").read_text())
    entry = manifest["inputs"][0]
    raw = (BUILD / "reference" / model / case / entry["file"]).read_bytes()
    return entry, raw


def bodies(model, workdir):
    """Writes the JSON and binary request bodies for one batch-1 request; returns {format: (path, header_len)}."""
    import numpy as np

    case = "batch1" if (BUILD / "reference" / model / "batch1").is_dir() else "test"
    entry, raw = reference_input(model, case)
    # One row (the digits case holds the whole test set).
    row_bytes = len(raw) // entry["shape"][0]
    entry, raw = {**entry, "shape": [1, *entry["shape"][1:]]}, raw[:row_bytes]
    values = np.frombuffer(raw, dtype="<f4").tolist()
    json_body = json.dumps({"inputs": [{"name": entry["name"], "shape": entry["shape"], "datatype": "FP32", "data": values}]})
    head = json.dumps({
        "inputs": [{"name": entry["name"], "shape": entry["shape"], "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    paths = {}
    (workdir / f"{model}.json").write_text(json_body)
    paths["json"] = (workdir / f"{model}.json", "")
    (workdir / f"{model}.bin").write_bytes(head + raw)
    paths["binary"] = (workdir / f"{model}.bin", str(len(head)))
    return paths


def to_ms(text):
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def wrk(url, body, header_length, content_type, concurrency, script):
    env = {**os.environ, "BENCH_BODY": str(body), "BENCH_HEADER_LENGTH": header_length, "BENCH_CONTENT_TYPE": content_type}
    threads = 1 if concurrency == 1 else 2
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{DURATION}s", "--latency", "-s", str(script), url],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    pct = {p: to_ms(re.search(rf"^\s+{p}%\s+(\S+)", out, re.M).group(1)) for p in (50, 90, 99)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, **pct, "errors": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else ""}


def wait_http(url, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within {timeout} s")


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_edge(repo, port):
    started = time.perf_counter()
    proc = subprocess.Popen(
        [ROOT / "target/release/edge-node", "--model-repository", repo, "--http-addr", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "RUST_LOG": "warn"},
    )
    line = proc.stdout.readline()
    if "listening on" not in line:
        raise SystemExit(f"edge-node failed to start: {line!r}")
    return proc, time.perf_counter() - started


def reference_stats(workdir):
    """The digits' reference statistics as a model-registry makes them from the training sample."""
    certs, bin_dir = workdir / "certs", ROOT / "target/release"
    subprocess.run([bin_dir / "fabric", "certs", "--out", certs, "--node", "registry-1:registry",
                    "--node", "operator:operator"], check=True, capture_output=True)
    registry = subprocess.Popen(
        [bin_dir / "model-registry", "--listen", "127.0.0.1:18030", "--node-id", "registry-1", "--http-addr", "off",
         "--data-dir", workdir / "registry", "--certs", certs],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "RUST_LOG": "warn"},
    )
    try:
        if "listening on" not in registry.stdout.readline():
            raise SystemExit("model-registry failed to start")
        env = {**os.environ, "FABRIC_REGISTRY": "registry-1@127.0.0.1:18030", "FABRIC_CERTS": str(certs)}
        fabric = lambda *args: subprocess.run([bin_dir / "fabric", *args, "--output", "json"], env=env, check=True,
                                              capture_output=True, text=True).stdout
        fabric("model", "push", "digits", str(BUILD / "models/digits/1/model.onnx"),
               "--reference", str(BUILD / "reference/digits/train.npz"))
        return json.loads(fabric("model", "show", "digits:1"))["reference"]["stats"]
    finally:
        registry.terminate()
        registry.wait(timeout=30)


def raw_engine():
    """The raw engine table from the engines bench: {(model, batch, engine): infer/s}."""
    out = subprocess.run(["cargo", "bench", "-q", "-p", "fabric-engine", "--bench", "engines"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[1].isdigit():
            rows[(cells[0], int(cells[1]), cells[2])] = float(cells[3])
    return out, rows


def main():
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="fabric-bench-"))
    script = workdir / "post.lua"
    script.write_text(LUA)
    repo = workdir / "models"
    for name in ("mlp", "cnn", "digits"):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.onnx").symlink_to(BUILD / "models" / name / "1" / "model.onnx")
    # The digits again, counting drift against its training sample.
    (repo / "digits_watched" / "1").mkdir(parents=True)
    (repo / "digits_watched" / "1" / "model.onnx").symlink_to(BUILD / "models" / "digits" / "1" / "model.onnx")
    (repo / "digits_watched" / "1" / "reference.json").write_text(json.dumps(reference_stats(workdir)))

    print(f"machine: {machine()}", flush=True)
    print("raw engines (cargo bench --bench engines) ...", flush=True)
    engine_table, raw = raw_engine()

    starts, rss_idle = [], []
    for i in range(3):
        proc, took = start_edge(repo, 18000 + i)
        starts.append(took)
        time.sleep(0.5)
        rss_idle.append(rss_mib(proc.pid))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)

    results = []
    edge, _ = start_edge(repo, 18010)
    for model in MODELS:
        paths = bodies(model, workdir)
        for fmt, (body, header_length) in paths.items():
            ctype = "application/json" if fmt == "json" else "application/octet-stream"
            for c in CONCURRENCY:
                r = wrk(f"http://127.0.0.1:18010/v2/models/{model}/infer", body, header_length, ctype, c, script)
                results.append({"server": "edge-node", "model": model, "format": fmt, "c": c, **r})
                print(results[-1], flush=True)
    # Drift counting's cost: the same digits with and without a reference, runs alternating.
    counting = []
    body, header_length = bodies("digits", workdir)["json"]
    for c in (1, 16):
        for _ in range(COUNTING_ROUNDS):
            for model in ("digits", "digits_watched"):
                r = wrk(f"http://127.0.0.1:18010/v2/models/{model}/infer", body, header_length, "application/json", c, script)
                counting.append({"model": model, "c": c, **r})
                print(counting[-1], flush=True)
    rss_loaded = rss_mib(edge.pid)
    chosen = {}
    for model in MODELS:
        config = json.loads(urllib.request.urlopen(f"http://127.0.0.1:18010/v2/models/{model}/config").read())
        chosen[model] = (config["backend"], config["parameters"].get("engine_choice") or "")
    edge.send_signal(signal.SIGTERM)
    edge.wait(timeout=30)

    peer = subprocess.Popen(
        [ROOT / ".venv/bin/uvicorn", "peer_fastapi:app", "--workers", "2", "--port", "18020", "--log-level", "warning"],
        cwd=ROOT / "scripts/bench", env={**os.environ, "PEER_REPO": str(repo)},
    )
    try:
        wait_http("http://127.0.0.1:18020/v2/health/ready")
        for model in MODELS:
            for fmt, (body, header_length) in bodies(model, workdir).items():
                ctype = "application/json" if fmt == "json" else "application/octet-stream"
                for c in CONCURRENCY:
                    r = wrk(f"http://127.0.0.1:18020/v2/models/{model}/infer", body, header_length, ctype, c, script)
                    results.append({"server": "fastapi+onnxruntime", "model": model, "format": fmt, "c": c, **r})
                    print(results[-1], flush=True)
    finally:
        peer.terminate()
        peer.wait(timeout=30)

    date = datetime.date.today().isoformat()
    lines = [
        f"Serving benchmark, {date}, on {machine()}; wrk closed loop, {DURATION} s per row, client on the same cores.",
        "edge-node at default settings (engine `auto`); peer = FastAPI + onnxruntime, 2 uvicorn workers, the same bodies.",
        "served/raw b1 and b32: edge-node's rate over the serving engine's own single-thread loop at batch 1 and 32 (same run).",
        "",
        "| model | body | concurrency | edge-node infer/s | p50 ms | p99 ms | errors | peer infer/s | peer p50 ms | peer errors | edge/peer | served/raw b1 | served/raw b32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in [r for r in results if r["server"] == "edge-node"]:
        engine = "onnxruntime" if chosen[r["model"]][0] == "ort" else "tract"
        b1, b32 = raw.get((r["model"], 1, engine)), raw.get((r["model"], 32, engine))
        peer_row = next((p for p in results if p["server"] != "edge-node" and p["model"] == r["model"]
                         and p["format"] == r["format"] and p["c"] == r["c"]), None)
        peer_cells = (f"{peer_row['rps']:.0f} | {peer_row[50]:.2f} | {peer_row['errors']} | {r['rps'] / peer_row['rps']:.2f}x"
                      if peer_row else "| | |")
        lines.append(
            f"| {r['model']} | {r['format']} | {r['c']} | {r['rps']:.0f} | {r[50]:.2f} | {r[99]:.2f} | "
            f"{r['errors']} | {peer_cells} | {r['rps'] / b1:.2f} | {r['rps'] / b32:.2f} |"
        )
    lines += ["", "Drift counting (digits, JSON, batch 1; the same model with and without reference statistics, "
              f"{COUNTING_ROUNDS} alternating runs each, medians; every request's 64 features and predicted class counted):", "",
              "| concurrency | without infer/s | with infer/s | with/without |", "|---:|---:|---:|---:|"]
    for c in (1, 16):
        plain = statistics.median(r["rps"] for r in counting if r["c"] == c and r["model"] == "digits")
        watched = statistics.median(r["rps"] for r in counting if r["c"] == c and r["model"] == "digits_watched")
        lines.append(f"| {c} | {plain:.0f} | {watched:.0f} | {watched / plain:.3f} |")
    lines += [
        "",
        "Engine chosen by `auto` (edge-node's /config): "
        + "; ".join(f"{m}: {engine} ({why})" for m, (engine, why) in chosen.items()) + ".",
        f"edge-node with MLP, CNN and digits loaded: start to ready {statistics.median(starts) * 1e3:.0f} ms (median of 3), "
        f"resident memory {statistics.median(rss_idle):.0f} MiB idle, {rss_loaded:.0f} MiB after the load above.",
        "",
        "Raw engines (same run):",
        "",
        engine_table.strip(),
    ]
    report = "\n".join(lines)
    out = BUILD / "bench" / f"serving-{date}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    print("\n" + report)
    print(f"\nwritten to {out}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
