#!/usr/bin/env python3
"""An edge app: streams the held-out digits test set through an edge-node, one image per request from
a few concurrent senders (Triton's own client), and prints the running accuracy, latency percentiles
and how many answers the hub served (the edge offloads what it cannot serve in time).

Start the fabric first (`bash scripts/run-fabric.sh`), then:

    .venv/bin/python examples/edge_app.py [--url 127.0.0.1:8000] [--senders 4] [--rounds 1]

Exits non-zero when the accuracy is under --min-accuracy (default 0.9) or a request failed.
"""

import argparse
import concurrent.futures
import threading
import time

import numpy as np
import tritonclient.http as httpclient
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def test_set():
    """The held-out quarter the trained model never saw (the split scripts/gen_models.py uses)."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    _, x_test, _, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    return x_test, y_test


class Tally:
    """Running counts, shared by the senders."""

    def __init__(self):
        self.lock = threading.Lock()
        self.correct = self.answered = self.failed = self.from_hub = 0
        self.latencies_ms = []

    def add(self, ok, latency_ms, served_by):
        with self.lock:
            self.answered += 1
            self.correct += ok
            self.from_hub += served_by.startswith("hub")
            self.latencies_ms.append(latency_ms)

    def line(self):
        with self.lock:
            lat = np.array(self.latencies_ms or [0.0])
            return (f"{self.answered:5d} answered, accuracy {self.correct / max(self.answered, 1):.4f}, "
                    f"p50 {np.percentile(lat, 50):6.2f} ms, p99 {np.percentile(lat, 99):6.2f} ms, "
                    f"from the hub {self.from_hub}, failed {self.failed}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8000", help="edge-node address (default 127.0.0.1:8000)")
    parser.add_argument("--senders", type=int, default=4, help="concurrent senders (default 4)")
    parser.add_argument("--rounds", type=int, default=1, help="times through the test set (default 1)")
    parser.add_argument("--min-accuracy", type=float, default=0.9, help="fail under this accuracy (default 0.9)")
    args = parser.parse_args()

    x_test, y_test = test_set()
    probe = httpclient.InferenceServerClient(url=args.url)
    if not probe.is_model_ready("digits"):
        raise SystemExit(f"the digits model is not ready on {args.url}: is the fabric running (scripts/run-fabric.sh)?")
    tally = Tally()
    local = threading.local()

    def classify(i):
        if not hasattr(local, "client"):
            local.client = httpclient.InferenceServerClient(url=args.url)
        request = httpclient.InferInput("input", [1, 64], "FP32")
        request.set_data_from_numpy(x_test[i:i + 1], binary_data=True)
        started = time.perf_counter()
        try:
            result = local.client.infer("digits", [request], outputs=[httpclient.InferRequestedOutput("label")])
        except Exception as e:  # an answer with an error: counted, and shown once
            with tally.lock:
                tally.failed += 1
                if tally.failed == 1:
                    print(f"request failed: {e}")
            return
        latency_ms = (time.perf_counter() - started) * 1e3
        served_by = (result.get_response().get("parameters") or {}).get("served_by", "")
        tally.add(int(result.as_numpy("label")[0]) == int(y_test[i]), latency_ms, served_by)

    order = [i for _ in range(args.rounds) for i in range(len(y_test))]
    print(f"streaming {len(order)} held-out digits through {args.url} from {args.senders} senders")
    with concurrent.futures.ThreadPoolExecutor(args.senders) as pool:
        for n, _ in enumerate(pool.map(classify, order), 1):
            if n % 100 == 0 or n == len(order):
                print(tally.line(), flush=True)
    accuracy = tally.correct / max(tally.answered, 1)
    if tally.failed or accuracy < args.min_accuracy:
        raise SystemExit(f"FAILED: accuracy {accuracy:.4f} (minimum {args.min_accuracy}), {tally.failed} failed requests")
    print(f"ok: accuracy {accuracy:.4f} on {tally.answered} answers")


if __name__ == "__main__":
    main()
