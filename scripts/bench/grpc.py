#!/usr/bin/env python3
"""The gRPC face beside the REST one, in one run on one machine: edge-node (release, engine `auto`,
one replica per model) serving the MLP and the CNN, driven by Triton's own perf_analyzer over gRPC
and over HTTP (binary tensors, the same requests), by wrk over HTTP (binary bodies), and the FastAPI
peer (FastAPI + onnxruntime, 2 uvicorn workers) by wrk with the same bodies. Batch 1, concurrency 1
and 16. Load from compiled clients only.

Run through scripts/bench/grpc.sh.
"""

import csv
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from serving import BUILD, DURATION, LUA, ROOT, bodies, machine, save_report, wait_http, wrk  # noqa: E402

MODELS = ["mlp", "cnn"]
CONCURRENCY = [1, 16]
HTTP, GRPC, PEER = 18110, 18111, 18120


def perf_analyzer(model, protocol, concurrency, workdir):
    """perf_analyzer at one concurrency: (infer/s, p50 ms, p99 ms)."""
    url = f"127.0.0.1:{GRPC if protocol == 'grpc' else HTTP}"
    out = workdir / f"pa-{model}-{protocol}-{concurrency}.csv"
    cmd = [*os.environ["PERF_ANALYZER"].split(), "-m", model, "-u", url, "-i", protocol, "-b", "1",
           "--concurrency-range", str(concurrency), "--measurement-interval", str(DURATION * 1000 // 2),
           "--stability-percentage", "25", "--max-trials", "6", "-f", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        # Unstable on a busy machine (exit 2): once more, with longer windows and a looser bound.
        cmd[cmd.index("--stability-percentage") + 1] = "50"
        cmd[cmd.index("--measurement-interval") + 1] = str(DURATION * 1000)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"perf_analyzer failed on {model} over {protocol}: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    row = next(csv.DictReader(out.open()))
    return float(row["Inferences/Second"]), int(row["p50 latency"]) / 1e3, int(row["p99 latency"]) / 1e3


def main():
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="fabric-grpc-bench-"))
    script = workdir / "post.lua"
    script.write_text(LUA)
    repo = workdir / "models"
    for name in MODELS:
        (repo / name / "1").mkdir(parents=True)
        shutil.copy(BUILD / "models" / name / "1" / "model.onnx", repo / name / "1" / "model.onnx")
    edge = subprocess.Popen(
        [ROOT / "target/release/edge-node", "--model-repository", repo, "--http-addr", f"127.0.0.1:{HTTP}",
         "--grpc-addr", f"127.0.0.1:{GRPC}"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "RUST_LOG": "warn"},
    )
    peer = subprocess.Popen(
        [ROOT / ".venv/bin/uvicorn", "peer_fastapi:app", "--workers", "2", "--port", str(PEER), "--log-level", "warning"],
        cwd=ROOT / "scripts/bench", env={**os.environ, "PEER_REPO": str(repo)},
    )
    rows = []
    try:
        wait_http(f"http://127.0.0.1:{HTTP}/v2/health/ready")
        wait_http(f"http://127.0.0.1:{PEER}/v2/health/ready")
        for model in MODELS:
            body, header_length = bodies(model, workdir)["binary"]
            for c in CONCURRENCY:
                for protocol in ("grpc", "http"):
                    rps, p50, p99 = perf_analyzer(model, protocol, c, workdir)
                    rows.append((model, c, f"edge-node, perf_analyzer -i {protocol}", rps, p50, p99))
                    print(rows[-1], flush=True)
                for name, port in (("edge-node", HTTP), ("FastAPI peer", PEER)):
                    r = wrk(f"http://127.0.0.1:{port}/v2/models/{model}/infer", body, header_length,
                            "application/octet-stream", c, script)
                    rows.append((model, c, f"{name}, wrk (binary REST)", r["rps"], r[50], r[99]))
                    print(rows[-1], flush=True)
    finally:
        for p in (edge, peer):
            p.terminate()
            p.wait(timeout=30)
    lines = [
        f"gRPC beside REST, {time.strftime('%Y-%m-%d')}, on {machine()}; server and clients on the same cores, {DURATION} s windows.",
        "",
        "| model | concurrency | server, client | infer/s | p50 ms | p99 ms |",
        "|---|---:|---|---:|---:|---:|",
        *[f"| {m} | {c} | {who} | {rps:.0f} | {p50:.2f} | {p99:.2f} |" for m, c, who, rps, p50, p99 in rows],
    ]
    get = lambda m, c, who: next(r[3] for r in rows if r[0] == m and r[1] == c and r[2].startswith(who))
    lines += ["", "gRPC / HTTP with perf_analyzer: " + ", ".join(
        f"{m} c{c} {get(m, c, 'edge-node, perf_analyzer -i grpc') / get(m, c, 'edge-node, perf_analyzer -i http'):.2f}"
        for m in MODELS for c in CONCURRENCY) + "; edge-node gRPC / FastAPI peer REST: " + ", ".join(
        f"{m} c{c} {get(m, c, 'edge-node, perf_analyzer -i grpc') / get(m, c, 'FastAPI peer'):.2f}"
        for m in MODELS for c in CONCURRENCY) + "."]
    save_report("grpc", lines)


if __name__ == "__main__":
    main()
