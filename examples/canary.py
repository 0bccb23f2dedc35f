#!/usr/bin/env python3
"""A canary walk-through on the running fabric (`bash scripts/run-fabric.sh`):

  1. retrain the digits classifier with other settings (same inputs and outputs) and push it;
  2. canary it at 10%, then 50% of the traffic, showing `fabric rollout status`, then promote it;
  3. push a deliberately bad version (same signature, hidden layers with thousands of times the work)
     as a 50% canary with automatic rollback, and watch the registry roll it back by itself.

Traffic runs through the edge the whole time (a few threads of Triton's client); every request must be
answered. Each run pushes new versions.

    .venv/bin/python examples/canary.py [--url 127.0.0.1:8000] [--registry registry-1@127.0.0.1:7000]
        [--certs build/fabric/certs] [--fabric target/release/fabric]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import onnx
import tritonclient.http as httpclient
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier


def train(hidden, iterations, seed, path):
    """Trains an MLP on the digits training split and writes it as the served model's signature."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=0,
                                                        stratify=digits.target)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few iterations of the big one do not converge: not the point
        clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=iterations, random_state=seed).fit(x_train, y_train)
    model = convert_sklearn(clf, "digits", initial_types=[("input", FloatTensorType([None, 64]))],
                            options={type(clf): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) > 0 and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "N"  # the batch dimension, named as the served model names it
    onnx.save(model, path)
    return float((clf.predict(x_test) == y_test).mean())


class Traffic:
    """Closed-loop digits requests through the edge until stopped; counts answers by status."""

    def __init__(self, url, threads=3):
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.ok = self.failed = 0
        self.first_error = None
        x = (load_digits().data[:64] / 16.0).astype(np.float32)
        self.threads = [threading.Thread(target=self.run, args=(url, x), daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def run(self, url, x):
        client = httpclient.InferenceServerClient(url=url)
        i = 0
        while not self.stop_flag.is_set():
            request = httpclient.InferInput("input", [1, 64], "FP32")
            request.set_data_from_numpy(x[i % len(x):i % len(x) + 1], binary_data=True)
            i += 1
            try:
                client.infer("digits", [request])
                with self.lock:
                    self.ok += 1
            except Exception as e:
                with self.lock:
                    self.failed += 1
                    self.first_error = self.first_error or str(e)

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=30)
        return self.ok, self.failed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8000", help="the edge-node (default 127.0.0.1:8000)")
    parser.add_argument("--registry", default=os.environ.get("FABRIC_REGISTRY", "registry-1@127.0.0.1:7000"))
    parser.add_argument("--certs", default=os.environ.get("FABRIC_CERTS", "build/fabric/certs"))
    parser.add_argument("--fabric", default="target/release/fabric", help="the fabric CLI binary")
    args = parser.parse_args()
    env = {**os.environ, "FABRIC_REGISTRY": args.registry, "FABRIC_CERTS": args.certs, "FABRIC_ID": "operator"}

    def fabric(*words, show=False):
        cmd = [args.fabric, *words]
        if show:
            print("$ fabric " + " ".join(words), flush=True)
            subprocess.run(cmd, env=env, check=True)
            return None
        out = subprocess.run(cmd + ["--output", "json"], env=env, check=True, capture_output=True, text=True)
        return json.loads(out.stdout)

    def wait_until(what, done, limit_s=90):
        deadline = time.monotonic() + limit_s
        while not done():
            if time.monotonic() > deadline:
                raise SystemExit(f"FAILED: {what} did not happen within {limit_s} s")
            time.sleep(0.5)

    work = tempfile.mkdtemp(prefix="fabric-canary-")
    print("==> retraining digits with other settings (128 hidden units, another seed)")
    accuracy = train((128,), 600, 1, f"{work}/v2.onnx")
    print(f"    held-out accuracy {accuracy:.4f}")
    v2 = fabric("model", "push", "digits", f"{work}/v2.onnx")["version"]
    print(f"    pushed as digits version {v2}")
    traffic = Traffic(args.url)
    try:
        for weight in (10, 50):
            print(f"==> canary: version {v2} takes {weight}% of the traffic")
            fabric("rollout", "canary", "digits", str(v2), "--weight", str(weight), show=True)
            time.sleep(2)
            fabric("rollout", "status", "digits", show=True)
        print(f"==> promote version {v2}")
        fabric("rollout", "promote", "digits", show=True)
        wait_until("the promotion", lambda: fabric("rollout", "status", "digits")["rollout"]["stable"] == v2)

        print("==> a deliberately bad version: four hidden layers of 2048 (thousands of times the work)")
        train((2048, 2048, 2048, 2048), 1, 2, f"{work}/v3.onnx")
        v3 = fabric("model", "push", "digits", f"{work}/v3.onnx")["version"]
        print(f"    pushed as digits version {v3}; canary at 50% with automatic rollback")
        fabric("rollout", "canary", "digits", str(v3), "--weight", "50", "--auto-rollback", show=True)

        def rolled_back():
            status = fabric("rollout", "status", "digits")
            return status["rollout"]["stable"] == v2 and not status["rollout"].get("canary")

        wait_until("the automatic rollback", rolled_back)
        fabric("rollout", "status", "digits", show=True)
        why = fabric("rollout", "status", "digits")["rollout"].get("auto_rolled_back")
        if not why:
            raise SystemExit("FAILED: the canary is gone but the registry gives no automatic-rollback reason")
        print(f"==> rolled back by the registry: {why}")
    finally:
        ok, failed = traffic.stop()
    print(f"==> traffic through the edge meanwhile: {ok} answered, {failed} failed")
    if failed:
        raise SystemExit(f"FAILED: {failed} requests failed (first: {traffic.first_error})")
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
