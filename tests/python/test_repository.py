"""Triton's model-repository extension on edge-node (--model-control explicit), driven by tritonclient:
the index, loading a version added to the repository while serving, reloading with a config override,
unloading, and the errors."""

import base64
import json
import pathlib
import shutil
import tempfile
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import BUILD, link_model, start_edge


# The repository API answers only callers with the node's admin token.
TOKEN = "py-test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def repo_and_client():
    repo = tempfile.mkdtemp(prefix="edge-py-repo-")
    link_model(repo, "mlp", 1)
    token_file = pathlib.Path(repo, "admin-token")
    token_file.write_text(TOKEN + "\n")
    proc, url = start_edge(repo, "--model-control", "explicit", "--admin-token-file", str(token_file))
    yield repo, url, httpclient.InferenceServerClient(url=url, network_timeout=60.0)
    proc.terminate()
    proc.wait(timeout=20)
    shutil.rmtree(repo, ignore_errors=True)


def post_json(url, body, headers=AUTH):
    """POSTs JSON with the standard library; returns (status, parsed body)."""
    headers = {"content-type": "application/json", **headers}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def versionless_infer(client):
    t = httpclient.InferInput("input", [1, 784], "FP32")
    t.set_data_from_numpy(np.full((1, 784), 0.25, dtype=np.float32))
    return client.infer("mlp", [t])


def test_load_reload_and_unload_through_the_repository_api(repo_and_client):
    repo, url, client = repo_and_client
    index = client.get_model_repository_index()
    assert [(m["name"], m["version"], m["state"]) for m in index] == [("mlp", "1", "READY")]
    assert "model_repository" in client.get_server_metadata()["extensions"]

    # A version added to the repository while serving; v1 keeps serving until v2 is warm.
    link_model(repo, "mlp", 2, source="mlp_alt")
    client.load_model("mlp", headers=AUTH)
    index = client.get_model_repository_index()
    assert [(m["version"], m["state"]) for m in index] == [("1", "READY"), ("2", "READY")]
    assert client.is_model_ready("mlp", "2")
    # Without a traffic policy, versionless requests go to the newest version (Triton's default).
    assert versionless_infer(client).get_response()["model_version"] == "2"

    # Reload with a config override (Triton's JSON): the new settings serve.
    client.load_model("mlp", headers=AUTH, config='{"max_batch_size": 8, "instance_group": [{"count": 2}]}')
    config = client.get_model_config("mlp", "2")
    assert config["max_batch_size"] == 8
    assert config["instance_group"][0]["count"] == 2

    client.unload_model("mlp", headers=AUTH)
    assert not client.is_model_ready("mlp")
    assert client.get_model_repository_index() == []
    with pytest.raises(InferenceServerException, match="unknown model 'mlp'"):
        versionless_infer(client)
    # And back.
    client.load_model("mlp", headers=AUTH)
    assert client.is_model_ready("mlp", "1") and client.is_model_ready("mlp", "2")


def test_load_and_unload_need_the_admin_token(repo_and_client):
    _, url, client = repo_and_client
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        with pytest.raises(InferenceServerException, match="needs 'Authorization: Bearer <token>'"):
            client.unload_model("mlp", headers=headers)
        status, body = post_json(f"http://{url}/v2/repository/models/mlp/load", {}, headers=headers)
        assert status == 401 and "admin token" in body["error"]
    assert client.is_model_ready("mlp", "1")


def test_load_errors_are_precise(repo_and_client):
    _, url, client = repo_and_client
    with pytest.raises(InferenceServerException, match="not in the repository"):
        client.load_model("no_such_model", headers=AUTH)
    with pytest.raises(InferenceServerException, match="unknown field `max_batch`"):
        client.load_model("mlp", headers=AUTH, config='{"max_batch": 8}')
    # Model bytes handed over in the request (tritonclient's `files` cannot encode them in this version:
    # it puts bytes in json.dumps), so the same request is sent with the standard library.
    load_url = f"http://{url}/v2/repository/models/other/load"
    garbage = base64.b64encode(b"not an onnx model").decode()
    status, body = post_json(load_url, {"parameters": {"file:1/model.onnx": garbage}})
    assert status == 400
    assert "is corrupt or not an ONNX model" in body["error"]
    good = base64.b64encode((BUILD / "models" / "mlp" / "1" / "model.onnx").read_bytes()).decode()
    status, body = post_json(load_url, {"parameters": {"file:1/model.onnx": good}})
    assert status == 200, body
    assert client.is_model_ready("other", "1")
    client.unload_model("other", headers=AUTH)
