#!/usr/bin/env python3
"""Wake-ups per request: edge-node builds compared in one run, under the same wrk load.

For each edge-node binary given, serves the MLP (binary tensors) at concurrency 64 with wrk for 8 s,
and counts, with `perf stat`, the context switches of the edge-node process over 5 s of it: switches
per request is the cost of the hand-offs between threads (HTTP worker, queue, replica, answer).
Then `perf record` samples the same load for the share of time in the kernel's task switch.

    scripts/bench/wakeups.py NAME=BINARY [NAME=BINARY ...]
"""

import os
import pathlib
import re
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from serving import BUILD, save_report, LUA, machine, reference_input  # noqa: E402

SECONDS = 8


def run(name, binary, work, body, header_length):
    repo = work / "repo"
    proc = subprocess.Popen([binary, "--model-repository", str(repo), "--http-addr", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "RUST_LOG": "error"})
    url = proc.stdout.readline().split("listening on ")[1].strip()
    env = {**os.environ, "BENCH_BODY": str(body), "BENCH_HEADER_LENGTH": str(header_length),
           "BENCH_CONTENT_TYPE": "application/octet-stream"}
    result = {}

    def load():
        out = subprocess.run(["wrk", "-t1", "-c64", f"-d{SECONDS}s", "-s", str(work / "post.lua"),
                              f"{url}/v2/models/mlp/infer"], env=env, capture_output=True, text=True).stdout
        result["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    wrk = threading.Thread(target=load)
    wrk.start()
    time.sleep(1.5)
    stat = subprocess.run(["perf", "stat", "-x,", "-e", "context-switches", "-p", str(proc.pid), "--", "sleep", "5"],
                          capture_output=True, text=True).stderr
    switches = float(next(l for l in stat.splitlines() if "context-switches" in l).split(",")[0])
    wrk.join()
    # A second load, sampled, for where the time goes.
    wrk = threading.Thread(target=load)
    rps_first = result["rps"]
    wrk.start()
    time.sleep(1.5)
    data = work / f"perf-{name}.data"
    subprocess.run(["perf", "record", "-F", "499", "-g", "-o", str(data), "-p", str(proc.pid), "--", "sleep", "4"],
                   capture_output=True)
    wrk.join()
    proc.terminate()
    proc.wait(timeout=30)
    report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--stdio", "--sort", "symbol"],
                            capture_output=True, text=True).stdout
    task_switch = sum(float(m.group(1)) for m in re.finditer(r"^\s+([\d.]+)%.*finish_task_switch", report, re.M))
    top = [re.sub(r"\s+-\s+-\s*$", "", l.strip()) for l in report.splitlines() if re.match(r"^\s+[\d.]+%", l)][:8]
    return {"name": name, "rps": rps_first, "per_request": switches / (rps_first * 5), "task_switch": task_switch,
            "top": top}


def main():
    builds = [a.split("=", 1) for a in sys.argv[1:]]
    work = pathlib.Path(tempfile.mkdtemp(prefix="fabric-wakeups-"))
    (work / "post.lua").write_text(LUA)
    (work / "repo" / "mlp" / "1").mkdir(parents=True)
    (work / "repo" / "mlp" / "1" / "model.onnx").symlink_to(BUILD / "models" / "mlp" / "1" / "model.onnx")
    entry, raw = reference_input("mlp", "batch1")
    import json
    head = json.dumps({"inputs": [{"name": entry["name"], "shape": entry["shape"], "datatype": entry["datatype"],
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    (work / "body.bin").write_bytes(head + raw)
    rows = [run(name, binary, work, work / "body.bin", len(head)) for name, binary in builds]
    lines = [f"Wake-ups per request, {time.strftime('%Y-%m-%d')}, on {machine()}; MLP, binary, wrk concurrency 64, same run.",
             "", "| build | infer/s | context switches per request | samples in finish_task_switch |", "|---|---:|---:|---:|"]
    lines += [f"| {r['name']} | {r['rps']:.0f} | {r['per_request']:.2f} | {r['task_switch']:.1f}% |" for r in rows]
    for r in rows:
        lines += ["", f"Top symbols, {r['name']}:", "", "```", *r["top"], "```"]
    save_report("wakeups", lines)


if __name__ == "__main__":
    main()
