"""Starts a real edge-node (built by `cargo test`/`cargo build`) on an ephemeral port for tritonclient."""

import json
import os
import pathlib
import subprocess
import tempfile
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD = ROOT / "build"


def edge_binary():
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    path = target / "debug" / "edge-node"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `cargo build -p edge-node` first (scripts/test.sh does)")
    return path


def load_case(model, case):
    """Reads a reference case written by scripts/gen_models.py as numpy arrays."""
    import numpy as np

    folder = BUILD / "reference" / model / case
    manifest = json.loads((folder / "manifest.json").read_text())
    dtypes = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "UINT8": "u1"}

    def read(entries):
        return {
            e["name"]: np.fromfile(folder / e["file"], dtype=dtypes[e["datatype"]]).reshape(e["shape"])
            for e in entries
        }

    return read(manifest["inputs"]), read(manifest["outputs"]), read(manifest.get("extras", []))


def start_edge(repo, *args, grpc=None):
    """Starts edge-node on `repo` with extra arguments; returns (process, "host:port"). With `grpc`
    (a dict), the gRPC API is on too and grpc["url"] is set to its "host:port"."""
    if grpc is not None:
        args = (*args, "--grpc-addr", "127.0.0.1:0")
    proc = subprocess.Popen(
        [edge_binary(), "--model-repository", repo, "--http-addr", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "RUST_LOG": "warn"},
    )
    found = {}

    def wait_for_ready():
        for line in proc.stdout:
            if line.startswith("edge-node gRPC on ") and grpc is not None:
                grpc["url"] = line.strip().removeprefix("edge-node gRPC on ")
            if line.startswith("edge-node listening on http://"):
                found["url"] = line.strip().removeprefix("edge-node listening on http://")
                return

    reader = threading.Thread(target=wait_for_ready, daemon=True)
    reader.start()
    reader.join(timeout=60)
    if "url" not in found:
        proc.kill()
        pytest.fail("edge-node did not become ready within 60 s")
    return proc, found["url"]


def link_model(repo, name, version, source=None):
    """Puts a generated model into `repo` as `name`/`version` (a symlink)."""
    folder = pathlib.Path(repo, name, str(version))
    folder.mkdir(parents=True)
    (folder / "model.onnx").symlink_to(BUILD / "models" / (source or name) / "1" / "model.onnx")


def start_model_edge(prefix, grpc=None):
    """An edge-node serving mlp, cnn, mixed and digits (batches of 512) from a temporary repository."""
    repo = tempfile.mkdtemp(prefix=prefix)
    for name in ("mlp", "cnn", "mixed", "digits"):
        link_model(repo, name, 1)
    pathlib.Path(repo, "digits", "config.toml").write_text("max_batch_size = 512\n")
    return start_edge(repo, grpc=grpc)


@pytest.fixture(scope="session")
def edge_grpc_url():
    """An edge-node with the gRPC API on; yields its gRPC "host:port"."""
    grpc = {}
    proc, _ = start_model_edge("edge-py-grpc-", grpc=grpc)
    if "url" not in grpc:
        proc.kill()
        pytest.fail("edge-node printed no 'edge-node gRPC on' line")
    yield grpc["url"]
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="session")
def edge_url():
    proc, url = start_model_edge("edge-py-")
    yield url
    proc.terminate()
    proc.wait(timeout=20)
