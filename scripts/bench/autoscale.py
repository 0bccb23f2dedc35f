#!/usr/bin/env python3
"""Autoscaling benchmark: an edge-node (release, default autoscaling, CNN) through a load step.

Load comes from wrk (C): 1 connection pausing 10 ms between requests for 15 s (about a tenth of one
replica), 12 connections closed loop for 40 s (more than one replica can serve), the paced connection
again for 75 s. Meanwhile the node's admin load report is sampled every 250 ms (a few small GETs; the load
itself never comes from Python). Writes build/bench/autoscale.png (offered load, replicas, p50/p99,
refusals over time, drawn with matplotlib) and a markdown table with the reaction times, compared
with the figures the issue gives for Knative, Ray Serve and KEDA + HPA.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from offload import REL, binary_body  # noqa: E402
from serving import BUILD, ROOT, machine  # noqa: E402

PHASES = [(1, 15), (12, 40), (1, 75)]  # (wrk connections, seconds); one connection is paced (10 ms pauses)
TOKEN = "autoscale-bench-token-0123456789"


def main():
    work = pathlib.Path(tempfile.mkdtemp(prefix="fabric-autoscale-bench-"))
    lua = (pathlib.Path(__file__).parent / "serving.py").read_text().split('LUA = """')[1].split('"""')[0]
    (work / "post.lua").write_text(lua)
    # wrk waits delay() milliseconds before each request: a light, steady load.
    (work / "paced.lua").write_text(lua + "function delay()\n  return 10\nend\n")
    (work / "repo" / "cnn" / "1").mkdir(parents=True)
    (work / "repo" / "cnn" / "1" / "model.onnx").symlink_to(BUILD / "models" / "cnn" / "1" / "model.onnx")
    (work / "repo" / "cnn" / "config.toml").write_text("max_batch_size = 8\n")
    os.environ["FABRIC_ADMIN_TOKEN"] = TOKEN
    cmd = [REL / "edge-node", "--model-repository", work / "repo", "--http-addr", "127.0.0.1:0",
           "--admin-addr", "127.0.0.1:18999"]
    edge = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, text=True, env={**os.environ, "RUST_LOG": "error"})
    line = ""
    while "listening on" not in line:  # the admin API's line comes first
        line = edge.stdout.readline()
        if not line:
            raise SystemExit("edge-node failed to start")
    url = line.strip().split("listening on ")[1]
    body_n = binary_body(work / "cnn.bin", 1, [3, 64, 64])
    samples, stop = [], threading.Event()
    t0 = time.monotonic()

    def sample():
        while not stop.is_set():
            try:
                with urllib.request.urlopen("http://127.0.0.1:18999/v2/fabric/load", timeout=5) as r:
                    report = json.load(r)
                v = next(v for v in report["versions"] if v["name"] == "cnn")
                samples.append({"t": time.monotonic() - t0, **v})
            except Exception as e:  # the node may be busy; the next sample comes anyway
                print(f"sample failed: {e}", file=sys.stderr)
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    step_at, marks = None, []
    try:
        for connections, secs in PHASES:
            if connections > 1 and step_at is None:
                step_at = time.monotonic() - t0
            marks.append((time.monotonic() - t0, connections))
            env = {**os.environ, "BENCH_BODY": str(work / "cnn.bin"), "BENCH_HEADER_LENGTH": str(body_n),
                   "BENCH_CONTENT_TYPE": "application/octet-stream"}
            script = work / ("paced.lua" if connections == 1 else "post.lua")
            subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{secs}s", "-s", str(script),
                            f"{url}/v2/models/cnn/infer"], env=env, capture_output=True, check=True)
        end_of_step = marks[2][0]
    finally:
        stop.set()
        sampler.join(timeout=5)
        edge.terminate()
        edge.wait(timeout=20)

    decided = next((s["t"] for s in samples if s["t"] >= step_at and s["target_replicas"] > 1), None)
    serving = next((s["t"] for s in samples if s["t"] >= step_at and s["ready_replicas"] > 1), None)
    down = next((s["t"] for s in samples if s["t"] >= end_of_step and s["target_replicas"] == 1), None)
    refused = sum(sum(s["rejected_per_s"].values()) * 0.25 for s in samples)
    peak = max(s["ready_replicas"] for s in samples)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(9, 9), sharex=True)
    axes[0].plot(t, [s["arrivals_per_s"] for s in samples], label="offered (arrivals/s)")
    axes[0].plot(t, [s["served_per_s"] for s in samples], label="served/s")
    axes[0].set_ylabel("requests/s")
    axes[0].legend(loc="upper right")
    axes[1].step(t, [s["target_replicas"] for s in samples], where="post", label="target")
    axes[1].step(t, [s["ready_replicas"] for s in samples], where="post", label="ready")
    axes[1].set_ylabel("replicas")
    axes[1].legend(loc="upper right")
    axes[2].plot(t, [s["p50_ms"] or 0 for s in samples], label="p50")
    axes[2].plot(t, [s["p99_ms"] or 0 for s in samples], label="p99")
    axes[2].set_ylabel("ms")
    axes[2].legend(loc="upper right")
    axes[3].plot(t, [sum(s["rejected_per_s"].values()) for s in samples], label="refused/s")
    axes[3].set_ylabel("refused/s")
    axes[3].set_xlabel("seconds")
    for ax in axes:
        for at, c in marks:
            ax.axvline(at, color="grey", linestyle=":", linewidth=0.8)
    fig.suptitle(f"edge-node autoscaling through a load step (CNN; wrk 1 paced -> 12 -> 1 paced)\n{machine()}")
    fig.tight_layout()
    out = BUILD / "bench"
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "autoscale.png", dpi=90)
    # The copy docs/benchmarks.md shows.
    (ROOT / "scripts" / "bench" / "autoscale.png").write_bytes((out / "autoscale.png").read_bytes())

    def ms(x):
        return "never" if x is None else f"{(x - step_at) * 1e3:,.0f} ms"

    lines = [
        f"Autoscaling benchmark, {time.strftime('%Y-%m-%d')}, on {machine()}; edge-node release, default autoscaling,",
        "CNN (tract), wrk 1 paced connection -> 12 closed-loop -> 1 paced; the node's load report sampled every 250 ms.",
        "",
        "| what | ours | Knative KPA | Ray Serve | KEDA + HPA |",
        "|---|---|---|---|---|",
        f"| load step -> more replicas decided | {ms(decided)} | 6 s panic window | 9.6 s fastest, 38 s default | 30 s + 15 s |",
        f"| load step -> added replica serving | {ms(serving)} | | | |",
        f"| load end -> back to 1 replica | {'never' if down is None else f'{(down - end_of_step):,.0f} s'} (down delay 60 s) | 60 s stable window | | |",
        f"| peak replicas; requests refused over the run | {peak}; {refused:,.0f} | | | |",
    ]
    (out / "autoscale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"plot: {out / 'autoscale.png'}")


if __name__ == "__main__":
    main()
