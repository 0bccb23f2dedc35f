#!/usr/bin/env python3
"""The control plane across an emulated WAN link, in one run on one machine.

A release model-registry; a release edge-node that reaches it only through the test kit's link relay
(`wan_link`: BENCH_RTT_MS round trip, BENCH_MBIT Mbit/s each way, BENCH_LOSS random loss each way;
defaults 100 ms, 10 Mbit/s, 1%). Two parts:

- `fetch`: a model file of BENCH_FETCH_MB megabytes (default 500; a MatMul with random weights, made
  here) pushed by an operator next to the registry and deployed to the edge; half way through the
  edge's download the link is cut for 8 s (longer than a download may stall, 5 s, so the download is
  given up and started again). Reported: the time to the model served, the rate, where the download
  resumed, what the link carried against the file's size.
- `rollout`: the operator also behind a link of the same settings: a push of the MLP (1.6 MB), a
  deploy, a 50% canary, a promote, each timed from the command to the edge routing it.

Run through scripts/bench/wan_control.sh.
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
from offload import REL, start  # noqa: E402
from serving import BUILD, machine, save_report  # noqa: E402

RTT_MS = float(os.environ.get("BENCH_RTT_MS", "100"))
MBIT = float(os.environ.get("BENCH_MBIT", "10"))
LOSS = float(os.environ.get("BENCH_LOSS", "0.01"))
FETCH_MB = int(os.environ.get("BENCH_FETCH_MB", "500"))
PARTS = os.environ.get("BENCH_PARTS", "fetch rollout").split()
CUT_S = 8


def big_model(path, mb):
    """A valid ONNX model of about `mb` megabytes: y = x @ W, W random float32 [d, d]."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    d = int((mb * 1e6 / 4) ** 0.5)
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((d, d), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", d])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


class Relay:
    """The link relay as a process, cut and read through its standard input."""

    def __init__(self, to):
        self.proc = subprocess.Popen([REL / "examples" / "wan_link", "--to", to, "--delay-ms", str(RTT_MS / 2),
                                      "--mbit", str(MBIT), "--loss", str(LOSS)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.addr = self.proc.stdout.readline().split()[3]

    def say(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def stats(self):
        self.say("stats")
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


class Bench:
    def __init__(self):
        self.work = pathlib.Path(tempfile.mkdtemp(prefix="fabric-wan-control-"))
        w = self.work
        subprocess.run([REL / "fabric", "certs", "--out", w / "certs", "--node", "registry-1:registry",
                        "--node", "edge-1:edge", "--node", "operator:operator"], check=True, capture_output=True)
        self.registry, line = start([REL / "model-registry", "--listen", "127.0.0.1:0", "--node-id", "registry-1",
                                     "--http-addr", "off", "--data-dir", w / "registry", "--certs", w / "certs"],
                                    "listening on quic://")
        self.quic = line.split("quic://")[1].split()[0]
        self.edge_relay = Relay(self.quic)
        (w / "repo").mkdir()
        self.edge_log = open(w / "edge.log", "w")
        self.edge = subprocess.Popen(
            [str(c) for c in [REL / "edge-node", "--http-addr", "127.0.0.1:0", "--node-id", "edge-1",
                              "--model-repository", w / "repo", "--certs", w / "certs",
                              "--registry", f"registry-1@{self.edge_relay.addr}", "--data-dir", w / "edge-data"]],
            stdout=subprocess.PIPE, stderr=self.edge_log, text=True, env={**os.environ, "RUST_LOG": "info"})
        line = self.edge.stdout.readline()
        self.url = line.split("listening on ")[1].split()[0]

    def cli(self, registry, *args):
        env = {**os.environ, "FABRIC_REGISTRY": f"registry-1@{registry}", "FABRIC_CERTS": str(self.work / "certs"),
               "FABRIC_ID": "operator"}
        out = subprocess.run([str(REL / "fabric"), *map(str, args), "--output", "json"], env=env,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"fabric {args} failed: {out.stderr}")
        return json.loads(out.stdout)

    def ready(self, model, version):
        try:
            with urllib.request.urlopen(f"{self.url}/v2/models/{model}/versions/{version}/ready", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def routed(self, registry, model, weights):
        nodes = self.cli(registry, "rollout", "status", model).get("nodes", [])
        return len(nodes) == 1 and nodes[0]["policy"]["weights"] == weights and nodes[0]["converged"]

    def close(self):
        for p in (self.edge, self.registry):
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=60)
        self.edge_relay.close()


def wait(what, limit_s, done, every=0.1):
    start_t = time.time()
    while not done():
        if time.time() - start_t > limit_s:
            raise SystemExit(f"timed out after {limit_s} s waiting for {what}")
        time.sleep(every)
    return time.time() - start_t


def partial_bytes(b):
    for f in (b.work / "edge-data" / "models").glob("*.partial"):
        return f.stat().st_size
    return None


def fetch_part(b):
    path = b.work / "big.onnx"
    big_model(path, FETCH_MB)
    size = path.stat().st_size
    t0 = time.time()
    b.cli(b.quic, "model", "push", "big", path)
    push_s = time.time() - t0
    print(f"pushed {size} bytes next to the registry in {push_s:.1f} s", flush=True)
    before = b.edge_relay.stats()
    t0 = time.time()
    b.cli(b.quic, "deploy", "big", "--to", "all")
    wait("half the download", 3 * 3600, lambda: (partial_bytes(b) or 0) >= size // 2, every=0.2)
    at_cut = partial_bytes(b)
    half_s = time.time() - t0
    b.edge_relay.say("cut")
    time.sleep(CUT_S)
    b.edge_relay.say("restore")
    print(f"cut at {at_cut} bytes ({half_s:.0f} s), restored after {CUT_S} s", flush=True)
    wait("the big model served", 3 * 3600, lambda: b.ready("big", 1), every=0.5)
    served_s = time.time() - t0
    after = b.edge_relay.stats()
    log = re.sub(r"\x1b\[[0-9;]*m", "", (b.work / "edge.log").read_text())  # tracing's colours
    resumed = re.findall(r"download resumed.*?offset=(\d+)", log)
    offset = resumed[-1] if resumed else "none"
    carried = after["down_bytes"] - before["down_bytes"]
    transfer_s = served_s - CUT_S
    return [
        f"A {size / 1e6:.0f} MB model file (`fabric model push` next to the registry: {push_s:.1f} s) deployed to an edge "
        f"behind the link; the link cut for {CUT_S} s once half had arrived:",
        "",
        "| file MB | deploy to served s | less the cut: Mbit/s | resumed at byte | link carried / file | datagrams lost on the way down |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {size / 1e6:.0f} | {served_s:.0f} | {8 * size / transfer_s / 1e6:.2f} | {offset} | "
        f"{carried / size:.3f} | {after['down_lost'] - before['down_lost']} |",
    ]


def rollout_part(b):
    op = Relay(b.quic)
    try:
        timings = []
        mlp = BUILD / "models" / "mlp" / "1" / "model.onnx"
        alt = BUILD / "models" / "mlp_alt" / "1" / "model.onnx"
        t0 = time.time()
        b.cli(op.addr, "model", "push", "mlp", mlp)
        timings.append(("push v1 (1.6 MB) from behind the link", time.time() - t0))
        t0 = time.time()
        b.cli(op.addr, "deploy", "mlp", "--to", "all")
        wait("v1 served", 300, lambda: b.ready("mlp", 1))
        timings.append(("deploy -> v1 served at the edge (its fetch across the link)", time.time() - t0))
        b.cli(op.addr, "model", "push", "mlp", alt)
        t0 = time.time()
        b.cli(op.addr, "rollout", "canary", "mlp", "2", "--weight", "50")
        wait("the canary routed", 300, lambda: b.routed(op.addr, "mlp", {"1": 50, "2": 50}), every=0.2)
        timings.append(("canary 50% -> routed at the edge (v2 fetched and warmed)", time.time() - t0))
        t0 = time.time()
        b.cli(op.addr, "rollout", "promote", "mlp")
        wait("the promote routed", 300, lambda: b.routed(op.addr, "mlp", {"2": 100}), every=0.2)
        timings.append(("promote -> v2 only at the edge", time.time() - t0))
        t0 = time.time()
        b.cli(op.addr, "rollout", "rollback", "mlp")
        wait("the rollback routed", 300, lambda: b.routed(op.addr, "mlp", {"1": 100}), every=0.2)
        timings.append(("rollback -> v1 only at the edge", time.time() - t0))
    finally:
        op.close()
    lines = ["The operator and the edge each behind a link of these settings (a CLI command's own round trips "
             "count, and the time includes polling `rollout status` across the link every 200 ms):", "",
             "| step | seconds |", "|---|---:|"]
    lines += [f"| {what} | {s:.2f} |" for what, s in timings]
    return lines


def main():
    b = Bench()
    lines = [f"WAN control-plane benchmark, {time.strftime('%Y-%m-%d')}, on {machine()}; link {RTT_MS:g} ms round trip, "
             f"{MBIT:g} Mbit/s each way, {100 * LOSS:g}% loss each way (the test kit's relay); the registry, the edge "
             f"and the relays on the same cores."]
    try:
        wait("the edge heartbeating across the link", 60, lambda: any(
            n["node"] == "edge-1" and n["state"] == "up" for n in b.cli(b.quic, "nodes")))
        if "rollout" in PARTS:
            lines += [""] + rollout_part(b)
        if "fetch" in PARTS:
            lines += [""] + fetch_part(b)
    finally:
        b.close()
    save_report("wan-control", lines)


if __name__ == "__main__":
    main()
