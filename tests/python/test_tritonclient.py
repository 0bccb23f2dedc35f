"""edge-node driven by Triton's own HTTP client (tritonclient.http), a client nobody here wrote."""

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import load_case


@pytest.fixture(scope="module")
def client(edge_url):
    return httpclient.InferenceServerClient(url=edge_url, network_timeout=30.0)


def infer(client, model, inputs, binary, outputs=None, **kwargs):
    tensors = []
    for name, array in inputs.items():
        dtype = {np.float32: "FP32", np.float64: "FP64", np.int64: "INT64"}[array.dtype.type]
        t = httpclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array, binary_data=binary)
        tensors.append(t)
    requested = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in outputs] if outputs else None
    return client.infer(model, tensors, outputs=requested, **kwargs)


def test_health_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "edge-node"
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_and_config(client):
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("mlp", "1")
    meta = client.get_model_metadata("mixed")
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("ids", "INT64", [-1, 4]),
        ("weights", "FP64", [-1, 4]),
    ]
    config = client.get_model_config("cnn")
    assert config["max_batch_size"] == 32
    assert config["input"][0]["dims"] == [3, 64, 64]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("model,case", [("mlp", "batch7"), ("cnn", "batch3"), ("mixed", "batch5"), ("digits", "test")])
def test_outputs_match_the_reference(client, model, case, binary):
    inputs, expected, _ = load_case(model, case)
    result = infer(client, model, inputs, binary, outputs=list(expected), request_id=f"{model}-{case}")
    assert result.get_response()["id"] == f"{model}-{case}"
    for name, want in expected.items():
        got = result.as_numpy(name)
        assert got.shape == want.shape and got.dtype == want.dtype, name
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_digits_accuracy_over_http(client):
    inputs, _, extras = load_case("digits", "test")
    labels = infer(client, "digits", inputs, True, outputs=["label"]).as_numpy("label")
    accuracy = float((labels == extras["y_true"]).mean())
    assert accuracy >= 0.95
    assert (labels == extras["sklearn_label"]).all()


def test_default_outputs_and_version_path(client):
    inputs, expected, _ = load_case("mlp", "batch1")
    result = infer(client, "mlp", inputs, True, model_version="1")
    np.testing.assert_allclose(result.as_numpy("logits"), expected["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "model,inputs,status,message",
    [
        ("mlp", {"input": np.zeros((1, 783), np.float32)}, "400", "dimension 1 must be 784"),
        ("mlp", {"input": np.zeros((1, 784), np.float64)}, "400", "has datatype FP64, the model expects FP32"),
        ("mlp", {"wrong": np.zeros((1, 784), np.float32)}, "400", "unknown input 'wrong'"),
        ("mixed", {"ids": np.zeros((1, 4), np.int64)}, "400", "missing input 'weights'"),
        ("mlp", {"input": np.zeros((33, 784), np.float32)}, "400", "maximum batch size of 32"),
        ("nope", {"input": np.zeros((1, 784), np.float32)}, "404", "unknown model 'nope'"),
    ],
)
def test_errors(client, model, inputs, status, message):
    with pytest.raises(InferenceServerException) as err:
        infer(client, model, inputs, True)
    assert err.value.status() == status
    assert message in err.value.message()


def test_unknown_version(client):
    with pytest.raises(InferenceServerException) as err:
        infer(client, "mlp", {"input": np.zeros((1, 784), np.float32)}, False, model_version="9")
    assert err.value.status() == "404"
    assert "has no version '9'" in err.value.message()


def test_deadline_from_the_timeout_parameter(client):
    with pytest.raises(InferenceServerException) as err:
        infer(client, "cnn", {"input": np.zeros((32, 3, 64, 64), np.float32)}, True, timeout=1)
    assert err.value.status() == "503"
    assert "deadline" in err.value.message()


def test_feedback_on_answers_tritonclient_sent(client, edge_url):
    """Ids tritonclient sets (request_id) are what feedback labels: counted once, unknown ones listed."""
    import json
    import urllib.request

    inputs, _, extras = load_case("digits", "test")
    x, truth = inputs["input"], extras["y_true"]
    predicted = []
    for n in range(20):
        result = infer(client, "digits", {"input": x[n:n + 1]}, True, outputs=["label"], request_id=f"py-{n}")
        assert result.get_response()["id"] == f"py-{n}"
        predicted.append(int(result.as_numpy("label")[0]))
    feedback = [{"id": f"py-{n}", "label": int(truth[n])} for n in range(20)] + [{"id": "never-sent", "label": 1}]

    def post(body):
        request = urllib.request.Request(f"http://{edge_url}/v2/models/digits/feedback", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())

    answer = post({"feedback": feedback})
    assert answer["labelled"] == 20
    assert answer["correct"] == sum(int(p == t) for p, t in zip(predicted, truth[:20]))
    assert answer["unknown"] == ["never-sent"]
    assert post({"feedback": feedback[:1]})["unknown"] == ["py-0"], "a request is labelled once"
