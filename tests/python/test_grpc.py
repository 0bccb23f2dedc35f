"""edge-node's gRPC face driven by Triton's own gRPC client (tritonclient.grpc): every RPC the fabric
serves, outputs against the reference, errors as gRPC status codes with the REST face's messages,
and the bidirectional stream."""

import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import load_case


@pytest.fixture(scope="module")
def client(edge_grpc_url):
    return grpcclient.InferenceServerClient(url=edge_grpc_url)


def tensors(inputs):
    out = []
    for name, array in inputs.items():
        dtype = {np.float32: "FP32", np.float64: "FP64", np.int64: "INT64"}[array.dtype.type]
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        out.append(t)
    return out


def test_health_metadata_config_and_index(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "edge-node"
    assert "model_repository" in meta["extensions"]
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("mlp", "1")
    model = client.get_model_metadata("mixed", as_json=True)
    assert [(i["name"], i["datatype"], i["shape"]) for i in model["inputs"]] == [
        ("ids", "INT64", ["-1", "4"]),
        ("weights", "FP64", ["-1", "4"]),
    ]
    config = client.get_model_config("cnn", as_json=True)["config"]
    assert config["max_batch_size"] == 32
    assert config["input"][0]["dims"] == ["3", "64", "64"]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    index = client.get_model_repository_index(as_json=True)["models"]
    assert sorted(m["name"] for m in index) == ["cnn", "digits", "mixed", "mlp"]
    assert all(m["state"] == "READY" for m in index)


@pytest.mark.parametrize("model,case", [("mlp", "batch7"), ("cnn", "batch3"), ("mixed", "batch5"), ("digits", "test")])
def test_outputs_match_the_reference(client, model, case):
    inputs, expected, _ = load_case(model, case)
    outputs = [grpcclient.InferRequestedOutput(o) for o in expected]
    result = client.infer(model, tensors(inputs), outputs=outputs, request_id=f"{model}-{case}")
    assert result.get_response().id == f"{model}-{case}"
    for name, want in expected.items():
        got = result.as_numpy(name)
        assert got.shape == want.shape and got.dtype == want.dtype, name
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_digits_accuracy_over_grpc(client):
    inputs, _, extras = load_case("digits", "test")
    result = client.infer("digits", tensors(inputs), outputs=[grpcclient.InferRequestedOutput("label")])
    labels = result.as_numpy("label")
    assert float((labels == extras["y_true"]).mean()) >= 0.95
    assert (labels == extras["sklearn_label"]).all()


@pytest.mark.parametrize(
    "model,inputs,status,message",
    [
        ("mlp", {"input": np.zeros((1, 783), np.float32)}, "StatusCode.INVALID_ARGUMENT", "dimension 1 must be 784"),
        ("mlp", {"input": np.zeros((1, 784), np.float64)}, "StatusCode.INVALID_ARGUMENT", "has datatype FP64, the model expects FP32"),
        ("mlp", {"wrong": np.zeros((1, 784), np.float32)}, "StatusCode.INVALID_ARGUMENT", "unknown input 'wrong'"),
        ("mixed", {"ids": np.zeros((1, 4), np.int64)}, "StatusCode.INVALID_ARGUMENT", "missing input 'weights'"),
        ("mlp", {"input": np.zeros((33, 784), np.float32)}, "StatusCode.INVALID_ARGUMENT", "maximum batch size of 32"),
        ("nope", {"input": np.zeros((1, 784), np.float32)}, "StatusCode.NOT_FOUND", "unknown model 'nope'"),
    ],
)
def test_errors(client, model, inputs, status, message):
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, tensors(inputs))
    assert err.value.status() == status
    assert message in err.value.message()


def test_unknown_version_and_deadline(client):
    with pytest.raises(InferenceServerException) as err:
        client.infer("mlp", tensors({"input": np.zeros((1, 784), np.float32)}), model_version="9")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert "has no version '9'" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer("cnn", tensors({"input": np.zeros((32, 3, 64, 64), np.float32)}), timeout=1)
    assert err.value.status() == "StatusCode.UNAVAILABLE"
    assert "deadline" in err.value.message()


def test_statistics_count_what_was_served(client):
    before = client.get_inference_statistics("mlp", as_json=True)["model_stats"][0]
    ok_before = int(before["inference_stats"]["success"].get("count", 0))
    inputs, _, _ = load_case("mlp", "batch1")
    for _ in range(3):
        client.infer("mlp", tensors(inputs))
    after = client.get_inference_statistics("mlp", as_json=True)["model_stats"][0]
    assert int(after["inference_stats"]["success"]["count"]) == ok_before + 3


def test_stream_answers_every_request_once(client):
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    inputs, expected, _ = load_case("mlp", "batch1")
    bad = {"input": np.zeros((1, 3), np.float32)}
    for i in range(50):
        client.async_stream_infer("mlp", tensors(bad if i % 10 == 9 else inputs), request_id=f"r{i}")
    got = {}
    for _ in range(50):
        result, error = answers.get(timeout=30)
        if error is not None:
            got.setdefault("errors", []).append(error.message())
        else:
            rid = result.get_response().id
            assert rid not in got
            got[rid] = result.as_numpy("logits")
    client.stop_stream()
    assert len(got.get("errors", [])) == 5
    assert all("dimension 1 must be 784" in e for e in got["errors"])
    assert len(got) == 46  # 45 answers and the list of errors
    for rid, logits in got.items():
        if rid != "errors":
            np.testing.assert_allclose(logits, expected["logits"], atol=1e-4, rtol=0)
