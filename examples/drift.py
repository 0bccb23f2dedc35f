#!/usr/bin/env python3
"""A drift walk-through on the running fabric (`bash scripts/run-fabric.sh`):

  1. push the digits classifier as `digits-watch` with its training inputs as the reference sample
     (`fabric model push digits-watch model.onnx --reference train.npz`) and deploy it to the edge;
  2. stream the held-out digits through the edge (Triton's own client): `fabric drift digits-watch`
     finds no drift;
  3. then the world changes: three times as many digits arrive with the left half of each image
     brightened by 0.5 (a sensor fault, say): within the same window `fabric drift` calls drift on the
     brightened pixels, and on the predicted classes, and names the most drifted features.

    .venv/bin/python examples/drift.py [--url 127.0.0.1:8000] [--registry registry-1@127.0.0.1:7000]
        [--certs build/fabric/certs] [--fabric target/release/fabric]

Exits non-zero when a request fails or a verdict is not the expected one. The nodes keep 5 to 10
minutes of counts: run it again sooner and the first step sees the last run's brightened digits.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import tritonclient.http as httpclient
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAME = "digits-watch"


def held_out():
    """The held-out quarter the model never saw (the split scripts/gen_models.py uses)."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    _, x_test, _, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    return x_test, y_test


def brightened(x):
    """The left half (columns 0-3) of each 8x8 image brightened by 0.5, clipped at 1."""
    images = x.reshape(-1, 8, 8).copy()
    images[:, :, :4] = np.minimum(1.0, images[:, :, :4] + 0.5)
    return images.reshape(-1, 64)


def send(client, rows):
    for row in rows:
        tensor = httpclient.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(row.reshape(1, 64))
        client.infer(NAME, [tensor])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8000", help="edge-node address (default 127.0.0.1:8000)")
    parser.add_argument("--registry", default="registry-1@127.0.0.1:7000")
    parser.add_argument("--certs", default="build/fabric/certs")
    parser.add_argument("--fabric", default="target/release/fabric", help="the fabric CLI")
    args = parser.parse_args()
    env = {**os.environ, "FABRIC_REGISTRY": args.registry, "FABRIC_CERTS": args.certs, "FABRIC_ID": "operator"}

    def fabric(*cli, json_out=True):
        out = subprocess.run([args.fabric, *cli, *(["--output", "json"] if json_out else [])], env=env,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"fabric {' '.join(cli)} failed: {out.stderr.strip()}")
        return json.loads(out.stdout) if json_out else out.stdout

    models = fabric("model", "list")
    if not any(m["name"] == NAME for m in models):
        print(f"==> fabric model push {NAME} ... --reference build/reference/digits/train.npz")
        print(fabric("model", "push", NAME, str(ROOT / "build/models/digits/1/model.onnx"),
                     "--reference", str(ROOT / "build/reference/digits/train.npz"), json_out=False).strip())
    fabric("deploy", NAME, "--to", "edge")
    client = httpclient.InferenceServerClient(url=args.url, network_timeout=30.0)
    deadline = time.time() + 60
    while not client.is_model_ready(NAME):
        if time.time() > deadline:
            raise SystemExit(f"{NAME} not ready on the edge within 60 s")
        time.sleep(0.2)

    def verdict_after(rows, want_rows):
        """Waits until the registry holds the counts of `want_rows` rows; returns the version's view."""
        deadline = time.time() + 30
        while True:
            view = fabric("drift", NAME)["versions"][0]
            if view["rows"] >= want_rows or time.time() > deadline:
                return view
            time.sleep(0.3)

    x, _ = held_out()
    start = fabric("drift", NAME)["versions"][0]["rows"]
    print(f"==> {len(x)} held-out digits through the edge")
    send(client, x)
    view = verdict_after(x, start + len(x))
    print(fabric("drift", NAME, json_out=False))
    if start == 0 and view["verdict"] != "none":
        raise SystemExit(f"expected no drift on the held-out digits, got {view['verdict']}")

    shifted = brightened(np.concatenate([x, x, x]))
    print(f"==> {len(shifted)} digits with the left half brightened")
    send(client, shifted)
    view = verdict_after(shifted, start + len(x) + len(shifted))
    print(fabric("drift", NAME, "--features", "8", json_out=False))
    drifted = [f["feature"] for f in view["features"] if f["drifted"]]
    if view["verdict"] != "drift" or not drifted or any(f % 8 >= 4 for f in drifted):
        raise SystemExit(f"expected drift on the brightened (left-half) pixels only: {view['verdict']}, {drifted}")
    print(f"drift on {len(drifted)} features, all in the brightened left half; predictions drifted: "
          f"{view['prediction']['drifted']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
