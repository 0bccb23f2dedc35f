#!/usr/bin/env python3
"""An edge app: classifies scikit-learn's handwritten digits with the `digits` model served by a
local edge-node, through Triton's own client. Start the node first (`bash scripts/run-fabric.sh`), then:

    .venv/bin/python examples/edge_client.py [--url 127.0.0.1:8000] [--count 20]
"""

import argparse

import numpy as np
import tritonclient.http as httpclient
from sklearn.datasets import load_digits


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8000", help="edge-node address (default 127.0.0.1:8000)")
    parser.add_argument("--count", type=int, default=20, help="how many digits to classify (default 20)")
    args = parser.parse_args()

    digits = load_digits()
    images = (digits.data[-args.count:] / 16.0).astype(np.float32)
    truth = digits.target[-args.count:]

    client = httpclient.InferenceServerClient(url=args.url)
    if not client.is_model_ready("digits"):
        raise SystemExit(f"the digits model is not ready on {args.url}: is edge-node running?")
    request = httpclient.InferInput("input", list(images.shape), "FP32")
    request.set_data_from_numpy(images, binary_data=True)
    result = client.infer("digits", [request], outputs=[httpclient.InferRequestedOutput("label")])
    labels = result.as_numpy("label")
    for predicted, actual in zip(labels, truth):
        print(f"predicted {predicted}  actual {actual}  {'ok' if predicted == actual else 'WRONG'}")
    print(f"{(labels == truth).mean():.0%} correct, served by {result.get_response()['parameters']['served_by']}")


if __name__ == "__main__":
    main()
