"""The Python peer for the serving benchmark: FastAPI + onnxruntime behind uvicorn, speaking the
KServe v2 infer protocol (JSON, and the binary tensor extension: `Inference-Header-Content-Length`)
for the models in PEER_REPO (Triton layout). One intra-op thread per worker, like the fabric's
replicas; run it with `uvicorn peer_fastapi:app --workers 2`."""

import json
import os
import pathlib

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}

options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
sessions = {
    path.parent.parent.name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for path in sorted(pathlib.Path(os.environ["PEER_REPO"]).glob("*/1/model.onnx"))
}
app = FastAPI()


@app.get("/v2/health/ready")
def ready():
    return {"ready": True}


@app.post("/v2/models/{model}/infer")
async def infer(model: str, request: Request):
    session = sessions.get(model)
    if session is None:
        return JSONResponse({"error": f"unknown model '{model}'"}, status_code=404)
    raw = await request.body()
    header_length = request.headers.get("inference-header-content-length")
    if header_length is None:
        body, blob = json.loads(raw), b""
    else:
        body, blob = json.loads(raw[: int(header_length)]), raw[int(header_length):]
    feeds, offset = {}, 0
    for i in body["inputs"]:
        size = i.get("parameters", {}).get("binary_data_size")
        if size is None:
            feeds[i["name"]] = np.asarray(i["data"], dtype=DTYPES[i["datatype"]]).reshape(i["shape"])
        else:
            feeds[i["name"]] = np.frombuffer(blob[offset : offset + size], dtype=DTYPES[i["datatype"]]).reshape(i["shape"])
            offset += size
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(names, feeds)
    if body.get("parameters", {}).get("binary_data_output"):
        arrays = [np.ascontiguousarray(o) for o in outputs]
        head = json.dumps({
            "model_name": model,
            "model_version": "1",
            "outputs": [
                {"name": n, "datatype": NAMES[o.dtype], "shape": list(o.shape), "parameters": {"binary_data_size": o.nbytes}}
                for n, o in zip(names, arrays)
            ],
        }).encode()
        return Response(
            head + b"".join(o.tobytes() for o in arrays),
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(len(head))},
        )
    return Response(
        json.dumps({
            "model_name": model,
            "model_version": "1",
            "outputs": [
                {"name": n, "datatype": NAMES[o.dtype], "shape": list(o.shape), "data": o.ravel().tolist()}
                for n, o in zip(names, outputs)
            ],
        }),
        media_type="application/json",
    )
