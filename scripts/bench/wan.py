#!/usr/bin/env python3
"""Offload across an emulated WAN link, in one run on one machine (the first part of the WAN
benchmark: how much of the link offload can use, by QUIC congestion controller).

A release cloud-hub (ONNX Runtime) behind the test kit's link relay (`wan_link`: delay each way,
rate limit, random loss), and release edge-nodes (tract) sending every request to it
(`offload.mode = "always"`, local serving the fallback), one per congestion controller. Open loop
(edge-node's `openloop`) of 4-row CNN requests (196 KB) at 1.5x what the link carries, deadline
500 ms; reported: requests offloaded and answered by the hub per second, against the link's bound
R / (8 x request bytes).

Run through scripts/bench/wan.sh.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from offload import REL, binary_body, start  # noqa: E402
from serving import BUILD, machine  # noqa: E402

DEADLINE_MS = 500
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
# (round trip ms, Mbit/s, loss)
LINKS = [tuple(float(x) for x in link.split("/")) for link in
         os.environ.get("BENCH_LINKS", "40/50/0.01 40/50/0 150/10/0 150/10/0.01").split()]
CONTROLLERS = os.environ.get("BENCH_CONTROLLERS", "cubic bbr").split()


def edge_link_metrics(url):
    """What the edge measured of its link and how its offload attempts ended, from its /metrics."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    found = {"rtt_s": float("nan"), "uplink_bytes_s": float("nan"), "attempts": {}}
    for line in text.splitlines():
        if line.startswith("fabric_hub_rtt_seconds{"):
            found["rtt_s"] = float(line.split()[-1])
        elif line.startswith("fabric_hub_uplink_bytes_per_second{"):
            found["uplink_bytes_s"] = float(line.split()[-1])
        elif line.startswith("fabric_offload_attempts_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            found["attempts"][outcome] = int(float(line.split()[-1]))
    return found


def main():
    work = pathlib.Path(tempfile.mkdtemp(prefix="fabric-wan-bench-"))
    subprocess.run([REL / "fabric", "certs", "--out", work / "certs", "--node", "hub-1:hub", "--node", "edge-1:edge"],
                   check=True, capture_output=True)
    for repo in ("hub", "edge"):
        (work / repo / "cnn" / "1").mkdir(parents=True)
        (work / repo / "cnn" / "1" / "model.onnx").symlink_to(BUILD / "models" / "cnn" / "1" / "model.onnx")
    (work / "edge" / "cnn" / "config.toml").write_text(f'default_timeout_ms = {DEADLINE_MS}\nmax_batch_size = 8\nengine = "tract"\n')
    (work / "hub.toml").write_text('[autoscale]\nenabled = false\n')
    for cc in CONTROLLERS:
        (work / f"edge-{cc}.toml").write_text(f'[offload]\nmode = "always"\ncongestion = "{cc}"\n[autoscale]\nenabled = false\n')
    body_n = binary_body(work / "cnn.bin", 4, [3, 64, 64])
    request_bytes = (work / "cnn.bin").stat().st_size
    hub, line = start([REL / "cloud-hub", "--model-repository", work / "hub", "--certs", work / "certs",
                       "--http-addr", "127.0.0.1:0", "--quic-addr", "127.0.0.1:0", "--config", work / "hub.toml"],
                      "cloud-hub listening")
    quic = line.split("quic://")[1]
    rows = []
    procs = [hub]
    try:
        for rtt, mbit, loss in LINKS:
            bound = mbit * 1e6 / (8 * request_bytes)
            for cc in CONTROLLERS:
                relay = subprocess.Popen([REL / "examples" / "wan_link", "--to", quic, "--delay-ms", str(rtt / 2),
                                          "--mbit", str(mbit), "--loss", str(loss)],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                link_addr = relay.stdout.readline().split()[3]
                edge, eline = start([REL / "edge-node", "--model-repository", work / "edge", "--http-addr", "127.0.0.1:0",
                                     "--hub", f"hub-1@{link_addr}", "--certs", work / "certs",
                                     "--config", work / f"edge-{cc}.toml"], "listening")
                url = eline.split("listening on ")[1]
                try:
                    # The first answer from the hub: the link is up.
                    deadline = time.time() + 30
                    while time.time() < deadline:
                        out = subprocess.run([REL / "examples" / "openloop", f"{url}/v2/models/cnn/infer", work / "cnn.bin",
                                              str(body_n), "2", "1", str(DEADLINE_MS)], capture_output=True, text=True).stdout
                        if out and json.loads(out)["offloaded"] > 0:
                            break
                    out = subprocess.run([REL / "examples" / "openloop", f"{url}/v2/models/cnn/infer", work / "cnn.bin",
                                          str(body_n), str(1.5 * bound), str(SECONDS), str(DEADLINE_MS)],
                                         capture_output=True, text=True, check=True).stdout
                    r = json.loads(out)
                    r["link"] = edge_link_metrics(url)
                finally:
                    edge.send_signal(signal.SIGTERM)
                    edge.wait(timeout=30)
                    relay.send_signal(signal.SIGTERM)
                    relay.wait(timeout=10)
                rows.append((rtt, mbit, loss, cc, bound, r))
                print((rtt, mbit, loss, cc, json.dumps(r)), flush=True)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=30)

    lines = [
        f"WAN benchmark (congestion controllers), {time.strftime('%Y-%m-%d')}, on {machine()}; edge-node, cloud-hub, "
        "the link relay and the client on the same cores.",
        "",
        f"CNN 4 rows ({request_bytes} bytes a request), deadline {DEADLINE_MS} ms, `offload.mode = \"always\"`, "
        f"open loop at 1.5x the link's bound for {SECONDS} s:",
        "",
        "| round trip ms | Mbit/s | loss | controller | link bound req/s | offloaded req/s | % of bound | served p50 / p99 ms | served here | refused | late | edge measured: rtt ms / uplink Mbit/s | attempts: served / not sent, link too slow / failed |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rtt, mbit, loss, cc, bound, r in rows:
        a = r["link"]["attempts"]
        per_s = r["offloaded"] / SECONDS
        local = r["ok"] - r["offloaded"]
        lines.append(f"| {rtt:g} | {mbit:g} | {100 * loss:.0f}% | {cc} | {bound:.1f} | {per_s:.1f} | {100 * per_s / bound:.0f}% | "
                     f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f} | {local} | {r['refused']} | {r['late']} | "
                     f"{1e3 * r['link']['rtt_s']:.0f} / {8 * r['link']['uplink_bytes_s'] / 1e6:.1f} | "
                     f"{a.get('served', 0)} / {a.get('link_too_slow', 0)} / {a.get('failed', 0)} |")
    report = "\n".join(lines)
    out = BUILD / "bench" / f"wan-{time.strftime('%Y-%m-%d')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    print("\n" + report + f"\n\nwritten to {out}")


if __name__ == "__main__":
    main()
