#!/usr/bin/env python3
"""Memory benchmark: edge-node's peak resident memory while loading a model with a large input, and
while serving one 64 MiB JSON request to it.

The model (`wide`, from scripts/gen_models.py) takes float32 [N, 1048576] (4 MiB a row) and returns
row sums. The request carries 4 rows as JSON numbers, 64 MiB of text. Peak figures are the
kernel's high-water mark (VmHWM in /proc/<pid>/status), so nothing between two samples is missed.

Run through scripts/bench/memory.sh.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from serving import BUILD, save_report, ROOT, machine  # noqa: E402

REL = ROOT / "target" / "release"
ROW = 1 << 20
MIB = 1 << 20


def status(pid):
    fields = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def reset_peak(pid):
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    pathlib.Path(f"/proc/{pid}/clear_refs").write_text("5")


def start_edge(repo, config):
    proc = subprocess.Popen([str(REL / "edge-node"), "--model-repository", str(repo), "--http-addr", "127.0.0.1:0",
                             "--config", str(config)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "RUST_LOG": "error"})
    line = proc.stdout.readline()
    if "listening on" not in line:
        raise SystemExit(f"edge-node failed to start: {line!r}")
    return proc, line.split("listening on ")[1].strip()


def repo_with(work, name):
    repo = work / f"repo-{name}"
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.onnx").symlink_to(BUILD / "models" / name / "1" / "model.onnx")
    return repo


def main():
    work = pathlib.Path(tempfile.mkdtemp(prefix="fabric-memory-bench-"))
    config = work / "edge.toml"
    config.write_text("[http]\nmax_body_bytes = 134217728\n")

    # Loading: peak of an edge serving only the MLP, against one serving the wide model.
    base, _ = start_edge(repo_with(work, "mlp"), config)
    time.sleep(0.5)
    base_peak = status(base.pid)["VmHWM"]
    base.terminate()
    base.wait(timeout=30)
    edge, url = start_edge(repo_with(work, "wide"), config)
    time.sleep(0.5)
    load_peak = status(edge.pid)["VmHWM"]

    # Serving: one JSON request of 3 rows, about 64 MiB of text.
    rows = 4
    values = ",".join("0.1234567890123" for _ in range(rows * ROW))
    body = ('{"inputs":[{"name":"x","shape":[%d,%d],"datatype":"FP32","data":[%s]}]}' % (rows, ROW, values)).encode()
    del values
    reset_peak(edge.pid)
    before = status(edge.pid)["VmRSS"]
    request = urllib.request.Request(f"{url}/v2/models/wide/infer", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    assert answer["outputs"][0]["shape"] == [rows, 1], answer
    serve_peak = status(edge.pid)["VmHWM"]
    edge.terminate()
    edge.wait(timeout=30)

    growth = serve_peak - before
    lines = [
        f"Memory benchmark, {time.strftime('%Y-%m-%d')}, on {machine()}; edge-node release build, tract engine.",
        "",
        "| what | peak resident memory | growth | ratio |",
        "|---|---:|---:|---:|",
        f"| edge-node serving the MLP (baseline) | {base_peak / MIB:.0f} MiB | | |",
        f"| loading the wide model (4 MiB a row; warm-up within its 64 MiB budget) | {load_peak / MIB:.0f} MiB | {(load_peak - base_peak) / MIB:.0f} MiB over the baseline | |",
        f"| serving one JSON request of {len(body) / MIB:.1f} MiB ({rows} rows) | {serve_peak / MIB:.0f} MiB | {growth / MIB:.0f} MiB over {before / MIB:.0f} MiB before it | {growth / len(body):.2f}x the body (target at most 2x) |",
    ]
    save_report("memory", lines)


if __name__ == "__main__":
    main()
