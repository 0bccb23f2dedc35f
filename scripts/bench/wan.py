#!/usr/bin/env python3
"""Offload across an emulated WAN link, in one run on one machine.

A release cloud-hub (ONNX Runtime) behind the test kit's link relay (`wan_link`: delay each way,
rate limit, random loss) and release edge-nodes (tract) in front of it. Open loops (edge-node's
`openloop`) of CNN requests, deadline 500 ms. Two parts (BENCH_PARTS, default both):

- `overflow`: the edge as deployed (`offload.mode = "overflow"`, BBR), at BENCH_LOADS times its
  capacity (measured first with wrk, closed loop), each right after the same edge with no hub at the same
  load; 4-row requests (196 KB), and 1-row ones (49 KB) at 1.5x on the first link (at more the
  open-loop client alone takes the 2 cores here). Reported: goodput,
  what the hub answered, the link's share used, late answers.
- `controllers`: every request sent to the hub (`offload.mode = "always"`) at 1.5x what the link
  carries, by QUIC congestion controller (BENCH_CONTROLLERS).

The link's bound: R / (8 x request bytes) requests a second. Writes build/bench/wan-DATE.md and a plot
of the overflow part (build/bench/wan.png, copied to scripts/bench/wan.png for the docs); `--plot-from
REPORT.md` redraws the plot from a report. Run through scripts/bench/wan.sh.
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
from offload import REL, binary_body, start, wrk  # noqa: E402
from serving import BUILD, machine, save_report  # noqa: E402

DEADLINE_MS = 500
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
# (round trip ms, Mbit/s, loss)
LINKS = [tuple(float(x) for x in link.split("/")) for link in
         os.environ.get("BENCH_LINKS", "40/50/0.01 150/10/0 150/10/0.01 5/100/0").split()]
CONTROLLERS = os.environ.get("BENCH_CONTROLLERS", "cubic bbr").split()
LOADS = [float(x) for x in os.environ.get("BENCH_LOADS", "2 3 5").split()]
PARTS = os.environ.get("BENCH_PARTS", "overflow controllers").split()
# BENCH_PIN=1: the edge on CPU 0, the hub, the relay and the client on CPU 1, so that what the link
# and the hub cost (QUIC, the relay, the hub's engine) does not come out of the edge's own CPU as it
# would not on separate machines.
PIN = os.environ.get("BENCH_PIN") == "1"


def pinned(cmd, cpu):
    """`cmd` bound to one CPU when BENCH_PIN is set."""
    return ["taskset", "-c", str(cpu), *cmd] if PIN else cmd


# The controller of the overflow part's edge (the edge's default, bbr, unless set).
OVERFLOW_CC = os.environ.get("BENCH_OVERFLOW_CC", "bbr")


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


def open_loop(url, body, n, rate, secs):
    out = subprocess.run(pinned([REL / "examples" / "openloop", f"{url}/v2/models/cnn/infer", body, str(n), str(rate),
                                 str(secs), str(DEADLINE_MS)], 1), capture_output=True, text=True, check=True).stdout
    return json.loads(out)


class Bench:
    def __init__(self):
        self.work = pathlib.Path(tempfile.mkdtemp(prefix="fabric-wan-bench-"))
        w = self.work
        subprocess.run([REL / "fabric", "certs", "--out", w / "certs", "--node", "hub-1:hub", "--node", "edge-1:edge"],
                       check=True, capture_output=True)
        for repo in ("hub", "edge"):
            (w / repo / "cnn" / "1").mkdir(parents=True)
            (w / repo / "cnn" / "1" / "model.onnx").symlink_to(BUILD / "models" / "cnn" / "1" / "model.onnx")
        (w / "edge" / "cnn" / "config.toml").write_text(
            f'default_timeout_ms = {DEADLINE_MS}\nmax_batch_size = 8\nengine = "tract"\n')
        (w / "hub.toml").write_text('[autoscale]\nenabled = false\n')
        (w / "post.lua").write_text(
            (pathlib.Path(__file__).parent / "serving.py").read_text().split('LUA = """')[1].split('"""')[0])
        self.bodies = {rows: (w / f"cnn{rows}.bin", binary_body(w / f"cnn{rows}.bin", rows, [3, 64, 64])) for rows in (1, 4)}
        self.hub, line = start(pinned([REL / "cloud-hub", "--model-repository", w / "hub", "--certs", w / "certs",
                                       "--http-addr", "127.0.0.1:0", "--quic-addr", "127.0.0.1:0", "--config",
                                       w / "hub.toml"], 1), "cloud-hub listening")
        self.quic = line.split("quic://")[1]

    def request_bytes(self, rows):
        return self.bodies[rows][0].stat().st_size

    def edge(self, name, config, link_addr):
        path = self.work / f"edge-{name}.toml"
        path.write_text(config + '[autoscale]\nenabled = false\n')
        cmd = [REL / "edge-node", "--model-repository", self.work / "edge", "--http-addr", "127.0.0.1:0",
               "--certs", self.work / "certs", "--config", path]
        if link_addr:
            cmd += ["--hub", f"hub-1@{link_addr}"]
        proc, line = start(pinned(cmd, 0), "listening")
        return proc, line.split("listening on ")[1]

    def relay(self, rtt, mbit, loss):
        relay = subprocess.Popen([str(c) for c in pinned([REL / "examples" / "wan_link", "--to", self.quic, "--delay-ms",
                                                          str(rtt / 2), "--mbit", str(mbit), "--loss", str(loss)], 1)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return relay, relay.stdout.readline().split()[3]

    def wait_usable(self, url):
        """Until the edge says the hub is usable across the link (bounded)."""
        deadline = time.time() + 30
        while time.time() < deadline:
            text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
            if any(line.startswith("fabric_hub_usable{") and line.split()[-1] == "1" for line in text.splitlines()):
                return
            time.sleep(0.1)
        raise SystemExit("the hub never became usable across the link")

    def with_link(self, name, config, link, rows, rate):
        relay, addr = self.relay(*link)
        edge, url = self.edge(name, config, addr)
        try:
            self.wait_usable(url)
            body, n = self.bodies[rows]
            r = open_loop(url, body, n, rate, SECONDS)
            r["link"] = edge_link_metrics(url)
            return r
        finally:
            for p in (edge, relay):
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=30)

    def close(self):
        self.hub.send_signal(signal.SIGTERM)
        self.hub.wait(timeout=30)


def overflow_part(b):
    """The edge as deployed, at multiples of its capacity, each case right after the edge alone at the
    same load (pairs: the machine's speed drifts over a run, and a drift between all the runs alone
    and all those with the hub would read as the hub's doing)."""
    alone, url = b.edge("alone", "", None)
    try:
        body, n = b.bodies[4]
        capacity, _ = wrk(f"{url}/v2/models/cnn/infer", body, n, 4, 5, b.work / "post.lua")
        print(f"edge capacity, CNN 4 rows: {capacity:.0f} req/s", flush=True)
        capacity1, _ = wrk(f"{url}/v2/models/cnn/infer", b.bodies[1][0], b.bodies[1][1], 4, 5, b.work / "post.lua")
        print(f"edge capacity, CNN 1 row: {capacity1:.0f} req/s", flush=True)
        cases = [(link, 4, mult) for link in LINKS for mult in LOADS]
        cases += [(LINKS[0], 1, 1.5)]
        results = []
        for link, rows, mult in cases:
            cap = capacity if rows == 4 else capacity1
            alone_r = open_loop(url, *b.bodies[rows], cap * mult, SECONDS)
            print(("alone", rows, mult, json.dumps(alone_r)), flush=True)
            config = f'[offload]\nmode = "overflow"\ncongestion = "{OVERFLOW_CC}"\n'
            r = b.with_link("overflow", config, link, rows, cap * mult)
            results.append((link, rows, mult, cap, alone_r, r))
            print((link, rows, mult, json.dumps(r)), flush=True)
    finally:
        alone.send_signal(signal.SIGTERM)
        alone.wait(timeout=30)
    lines = [
        f"Overflow offload across the link, the edge at {', '.join(f'{m:g}x' for m in LOADS)} its capacity "
        f"({capacity:.0f} 4-row / {capacity1:.0f} 1-row requests a second, 1 tract replica), {OVERFLOW_CC}, open loop {SECONDS} s, "
        f"each right after the edge alone at the same load:",
        "",
        "| round trip ms | Mbit/s | loss | rows | load | alone goodput/s | with the hub goodput/s | hub answered/s | link bound req/s | % of bound | late | refused | edge measured: rtt ms / uplink Mbit/s | attempts: served / link too slow / failed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    drawn = []
    for (rtt, mbit, loss), rows, mult, cap, alone_r, r in results:
        bound = mbit * 1e6 / (8 * b.request_bytes(rows))
        hub_s = r["offloaded"] / SECONDS
        a = r["link"]["attempts"]
        lines.append(f"| {rtt:g} | {mbit:g} | {100 * loss:.0f}% | {rows} | {mult:g}x ({cap * mult:.0f}/s) | "
                     f"{alone_r['goodput']:.1f} | {r['goodput']:.1f} | {hub_s:.1f} | {bound:.1f} | {100 * hub_s / bound:.0f}% | "
                     f"{r['late']} of {r['ok']} | {r['refused']} | "
                     f"{1e3 * r['link']['rtt_s']:.0f} / {8 * r['link']['uplink_bytes_s'] / 1e6:.1f} | "
                     f"{a.get('served', 0)} / {a.get('link_too_slow', 0)} / {a.get('failed', 0)} |")
        drawn.append((f"{rtt:g}/{mbit:g}/{100 * loss:.0f}%", f"{rows} rows {mult:g}x", alone_r["goodput"], r["goodput"],
                      hub_s, 100 * hub_s / bound))
    plot(drawn, BUILD / "bench" / "wan.png")
    return lines


def plot(rows, out):
    """Draws the overflow part's table: the link's share used, and goodput alone and with the hub,
    per link and load. `rows`: (link label, load, alone goodput, with-hub goodput, hub/s, % of bound)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{link}\n{load}" for link, load, *_ in rows]
    x = range(len(rows))
    fig, (share, goodput) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    share.bar(x, [r[5] for r in rows], color="tab:blue")
    share.axhline(80, color="tab:green", linestyle="--", linewidth=1, label="80% target (40 ms link)")
    share.axhline(60, color="tab:orange", linestyle="--", linewidth=1, label="60% target (150 ms link)")
    share.set_ylabel("link bound used, %")
    share.set_ylim(0, 125)
    share.legend(loc="upper center", fontsize=8, ncol=2)
    width = 0.4
    goodput.bar([i - width / 2 for i in x], [r[2] for r in rows], width, label="edge alone", color="tab:gray")
    goodput.bar([i + width / 2 for i in x], [r[3] for r in rows], width, label="with the hub", color="tab:blue")
    goodput.bar([i + width / 2 for i in x], [r[4] for r in rows], width, label="of which the hub", color="tab:cyan")
    goodput.set_ylabel("answers in time / s")
    goodput.legend(loc="upper left", fontsize=8, ncol=3)
    goodput.set_xticks(list(x))
    goodput.set_xticklabels(labels, fontsize=8)
    fig.suptitle("Overflow offload across an emulated WAN link (round trip ms / Mbit/s / loss; request rows, load)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    (pathlib.Path(__file__).parent / "wan.png").write_bytes(out.read_bytes())


def plot_rows_from_report(text):
    """The overflow table's rows, read back from a report this script wrote."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 14 and cells[0].replace(".", "").isdigit():
            link = f"{cells[0]}/{cells[1]}/{cells[2]}"
            rows.append((link, f"{cells[3]} rows {cells[4].split()[0]}", float(cells[5]), float(cells[6]), float(cells[7]),
                         float(cells[9].rstrip("%"))))
    return rows


def controllers_part(b):
    """Every request to the hub at 1.5x the link's bound, by congestion controller."""
    request_bytes = b.request_bytes(4)
    results = []
    for rtt, mbit, loss in LINKS:
        bound = mbit * 1e6 / (8 * request_bytes)
        for cc in CONTROLLERS:
            r = b.with_link(cc, f'[offload]\nmode = "always"\ncongestion = "{cc}"\n', (rtt, mbit, loss), 4, 1.5 * bound)
            results.append((rtt, mbit, loss, cc, bound, r))
            print((rtt, mbit, loss, cc, json.dumps(r)), flush=True)
    lines = [
        f"Every request to the hub (`offload.mode = \"always\"`), CNN 4 rows ({request_bytes} bytes a request), "
        f"open loop at 1.5x the link's bound for {SECONDS} s:",
        "",
        "| round trip ms | Mbit/s | loss | controller | link bound req/s | offloaded req/s | % of bound | served p50 / p99 ms | served here | refused | late | edge measured: rtt ms / uplink Mbit/s | attempts: served / not sent, link too slow / failed |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rtt, mbit, loss, cc, bound, r in results:
        a = r["link"]["attempts"]
        per_s = r["offloaded"] / SECONDS
        local = r["ok"] - r["offloaded"]
        lines.append(f"| {rtt:g} | {mbit:g} | {100 * loss:.0f}% | {cc} | {bound:.1f} | {per_s:.1f} | {100 * per_s / bound:.0f}% | "
                     f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f} | {local} | {r['refused']} | {r['late']} | "
                     f"{1e3 * r['link']['rtt_s']:.0f} / {8 * r['link']['uplink_bytes_s'] / 1e6:.1f} | "
                     f"{a.get('served', 0)} / {a.get('link_too_slow', 0)} / {a.get('failed', 0)} |")
    return lines


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--plot-from":
        # Redraws the plot from a report written earlier (no run).
        plot(plot_rows_from_report(pathlib.Path(sys.argv[2]).read_text()), BUILD / "bench" / "wan.png")
        return
    b = Bench()
    lines = [
        f"WAN benchmark, {time.strftime('%Y-%m-%d')}, on {machine()}; "
        + ("edge-node on CPU 0, cloud-hub, the link relay and the client on CPU 1 (BENCH_PIN)" if PIN else
           "edge-node, cloud-hub, the link relay and the client on the same cores")
        + f"; deadline {DEADLINE_MS} ms.",
    ]
    try:
        if "overflow" in PARTS:
            lines += [""] + overflow_part(b)
        if "controllers" in PARTS:
            lines += [""] + controllers_part(b)
    finally:
        b.close()
    save_report("wan", lines)


if __name__ == "__main__":
    main()
