#!/usr/bin/env python3
"""A cascade on the digits, through the running fabric (`bash scripts/run-fabric.sh`): the edge serves
`digits-small` (4 hidden units, 310 parameters) and sends the digits it is less sure of than a
threshold to `digits` on the hub (64 hidden units, 4,810 parameters), within each request's deadline.

For each threshold it streams the held-out digits through the edge one at a time (Triton's own
client, each request carrying its threshold as the `cascade_threshold` parameter) and measures the
accuracy of the answers, the share escalated, and the median latency of the answers the small model
gave, against the small model alone (threshold 0) and the big one alone (threshold above 1: every
request escalated). It prints the curve as a table and, with matplotlib (scripts/bench/requirements.txt),
plots it.

    .venv/bin/python examples/cascade.py [--url 127.0.0.1:8000] [--plot docs/cascade.png]

Exits non-zero when a request failed or an answer does not say which model gave it.
"""

import argparse
import sys
import time

import numpy as np
import tritonclient.http as httpclient
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

THRESHOLDS = [0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.01]


def test_set():
    """The held-out quarter the models never saw (the split scripts/gen_models.py uses)."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    _, x_test, _, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    return x_test, y_test


def run(client, x, y, threshold):
    """The held-out digits at one threshold: accuracy, share escalated, outcomes, p50 of small answers."""
    correct, outcomes, small_ms = 0, {}, []
    for row, truth in zip(x, y):
        tensor = httpclient.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(row.reshape(1, 64))
        started = time.perf_counter()
        result = client.infer("digits-small", [tensor], parameters={"cascade_threshold": threshold},
                              outputs=[httpclient.InferRequestedOutput("label")])
        took_ms = (time.perf_counter() - started) * 1e3
        parameters = result.get_response().get("parameters", {})
        outcome = parameters.get("cascade")
        if outcome not in ("small", "escalated", "fallback") or "answered_by_model" not in parameters:
            raise SystemExit(f"an answer that does not say which model gave it: {result.get_response()}")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome == "small":
            small_ms.append(took_ms)
        correct += int(result.as_numpy("label")[0] == truth)
    escalated = outcomes.get("escalated", 0) / len(y)
    p50 = float(np.median(small_ms)) if small_ms else float("nan")
    return correct / len(y), escalated, outcomes, p50


def plot(points, big_accuracy, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p[2] * 100 for p in points]
    ys = [p[1] * 100 for p in points]
    ax.plot(xs, ys, "o-", label="cascade (digits-small on the edge, digits on the hub)")
    for t, acc, esc, _, _ in points:
        ax.annotate(f"{t:g}", (esc * 100, acc * 100), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.axhline(big_accuracy * 100, color="gray", linestyle="--", label="big model alone")
    ax.axhline(big_accuracy * 100 - 0.5, color="gray", linestyle=":", label="big model - 0.5 points")
    ax.axvline(20, color="red", linestyle=":", label="20% escalated")
    ax.set_xlabel("requests escalated to the hub (%)")
    ax.set_ylabel("accuracy on the held-out digits (%)")
    ax.set_title("Cascade on the digits: accuracy against the share escalated\n(labels: confidence threshold)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8000", help="edge-node address (default 127.0.0.1:8000)")
    parser.add_argument("--plot", help="write the curve as a PNG here (needs matplotlib)")
    args = parser.parse_args()
    client = httpclient.InferenceServerClient(url=args.url, network_timeout=30.0)
    x, y = test_set()
    points = []
    print("threshold | accuracy | escalated | outcomes | p50 of small answers (ms)")
    for t in THRESHOLDS:
        accuracy, escalated, outcomes, p50 = run(client, x, y, t)
        points.append((t, accuracy, escalated, outcomes, p50))
        print(f"{t:9g} | {accuracy * 100:7.2f}% | {escalated * 100:8.1f}% | {outcomes} | {p50:.2f}")
    small_alone, big_alone = points[0], points[-1]
    if big_alone[2] < 1.0:
        print(f"note: with every request asked to escalate only {big_alone[2] * 100:.1f}% were (is the hub up?)")
    best = [p for p in points if p[2] <= 0.20 and p[1] >= big_alone[1] - 0.005]
    print(f"small model alone: {small_alone[1] * 100:.2f}%; big model alone: {big_alone[1] * 100:.2f}%")
    if best:
        t, acc, esc, _, p50 = min(best, key=lambda p: p[2])
        print(f"within 0.5 points of the big model with the fewest escalated: threshold {t:g}, {acc * 100:.2f}% with "
              f"{esc * 100:.1f}% escalated; p50 of the small answers {p50:.2f} ms (small alone {small_alone[4]:.2f} ms)")
    else:
        print("no threshold reached within 0.5 points of the big model with at most 20% escalated")
    if args.plot:
        try:
            plot(sorted(points[:-1], key=lambda p: p[2]), big_alone[1], args.plot)
        except ImportError:
            print("no plot: matplotlib is not installed (pip install -r scripts/bench/requirements.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
