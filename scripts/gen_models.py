#!/usr/bin/env python3
"""Generate the fabric's test models and their reference outputs.

Writes, under OUT (default build/):
  models/<name>/1/model.onnx      a model repository in Triton's layout (what edge-node serves)
  reference/<name>/<case>/        inputs and onnxruntime's own outputs for each case:
                                  manifest.json + one little-endian raw file per tensor
  bad-models/<name>/model.onnx    models for the error tests (corrupt, op tract lacks, opset 999)

Every number the Rust tests compare against comes from here: onnxruntime (Python, CPU provider)
computes the reference outputs, scikit-learn its own predictions for the trained classifier.
Deterministic: fixed seeds, so a re-run writes the same files.
"""

import argparse
import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
KSERVE_DTYPE = {
    np.dtype("float32"): "FP32",
    np.dtype("float64"): "FP64",
    np.dtype("int64"): "INT64",
    np.dtype("int32"): "INT32",
    np.dtype("uint8"): "UINT8",
    np.dtype("bool"): "BOOL",
}


def save_model(model, path, check=True):
    model.ir_version = IR_VERSION
    if check:  # the checker insists on declared output shapes, which a valid model may lack
        onnx.checker.check_model(model)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    onnx.save(model, path)


def write_case(case_dir, inputs, outputs, extras=None):
    """Write named tensors as raw little-endian files plus a manifest describing them."""
    os.makedirs(case_dir, exist_ok=True)

    def entries(tensors, prefix):
        out = []
        for name, arr in tensors.items():
            arr = np.require(arr, requirements="C")  # keeps 0-d scalars 0-d (ascontiguousarray does not)
            fname = f"{prefix}-{name}.bin"
            arr.astype(arr.dtype.newbyteorder("<")).tofile(os.path.join(case_dir, fname))
            out.append({
                "name": name,
                "datatype": KSERVE_DTYPE[arr.dtype],
                "shape": list(arr.shape),
                "file": fname,
            })
        return out

    manifest = {
        "inputs": entries(inputs, "in"),
        "outputs": entries(outputs, "out"),
        "extras": entries(extras or {}, "extra"),
    }
    with open(os.path.join(case_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


def ort_run(path, inputs):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, inputs)))


def reference_cases(out, name, path, cases):
    for case, inputs in cases.items():
        write_case(os.path.join(out, "reference", name, case), inputs, ort_run(path, inputs))


def make_mlp(rng):
    """float32 [N,784] -> Gemm 512 -> Relu -> Gemm 10 -> [N,10]."""
    w1 = (rng.standard_normal((784, 512)) * np.sqrt(2.0 / 784)).astype(np.float32)
    b1 = (rng.standard_normal(512) * 0.01).astype(np.float32)
    w2 = (rng.standard_normal((512, 10)) * np.sqrt(1.0 / 512)).astype(np.float32)
    b2 = (rng.standard_normal(10) * 0.01).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["input", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 784])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(a, n) for a, n in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2")]],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def make_cnn(rng):
    """float32 [N,3,64,64] -> 3 x (Conv 3x3 / Relu / MaxPool 2) -> Flatten -> Gemm 10 -> [N,10]."""
    nodes, inits = [], []
    channels = [3, 16, 32, 64]
    x = "input"
    for i in range(3):
        cin, cout = channels[i], channels[i + 1]
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"conv{i}.w"), numpy_helper.from_array(b, f"conv{i}.b")]
        nodes += [
            helper.make_node("Conv", [x, f"conv{i}.w", f"conv{i}.b"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
            helper.make_node("MaxPool", [f"r{i}"], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]),
        ]
        x = f"p{i}"
    wf = (rng.standard_normal((64 * 8 * 8, 10)) * np.sqrt(1.0 / 4096)).astype(np.float32)
    bf = (rng.standard_normal(10) * 0.01).astype(np.float32)
    inits += [numpy_helper.from_array(wf, "fc.w"), numpy_helper.from_array(bf, "fc.b")]
    nodes += [
        helper.make_node("Flatten", [x], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def make_cnn_slow(rng, extra=23):
    """The CNN's signature, float32 [N,3,64,64] -> [N,10], with about 20x its work: `extra` more 3x3
    convolutions (64 -> 64 channels, one shared weight so the file stays small) at the 16x16 stage."""
    model = make_cnn(rng)
    graph = model.graph
    w = (rng.standard_normal((64, 64, 3, 3)) * np.sqrt(1.0 / (64 * 9))).astype(np.float32)
    b = np.zeros(64, dtype=np.float32)
    graph.initializer.extend([numpy_helper.from_array(w, "slow.w"), numpy_helper.from_array(b, "slow.b")])
    # Re-wire: r2 (the third Relu, 16x16x64) -> extra Conv/Relu steps -> the third MaxPool.
    nodes = list(graph.node)
    pool = next(n for n in nodes if n.op_type == "MaxPool" and n.input[0] == "r2")
    x, added = "r2", []
    for i in range(extra):
        added += [
            helper.make_node("Conv", [x, "slow.w", "slow.b"], [f"s{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"s{i}"], [f"sr{i}"]),
        ]
        x = f"sr{i}"
    pool.input[0] = x
    at = nodes.index(pool)
    del graph.node[:]
    graph.node.extend(nodes[:at] + added + nodes[at:])
    graph.name = "cnn_slow"
    return model


def make_mixed():
    """Two inputs, two outputs, none of them float32.

    ids int64 [N,4], weights float64 [N,4]
    -> scaled float64 [N,4] = double(ids) * weights
    -> positive uint8 [N,4] = uint8(weights > 0)
    """
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids_f64"], to=TensorProto.DOUBLE),
        helper.make_node("Mul", ["ids_f64", "weights"], ["scaled"]),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float64))),
        helper.make_node("Greater", ["weights", "zero"], ["gt"]),
        helper.make_node("Cast", ["gt"], ["positive"], to=TensorProto.UINT8),
    ]
    graph = helper.make_graph(
        nodes, "mixed",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4]),
            helper.make_tensor_value_info("weights", TensorProto.DOUBLE, ["N", 4]),
        ],
        [
            helper.make_tensor_value_info("scaled", TensorProto.DOUBLE, ["N", 4]),
            helper.make_tensor_value_info("positive", TensorProto.UINT8, ["N", 4]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def make_unsupported():
    """A valid model (onnxruntime runs it) built on an op tract-onnx does not implement: Det."""
    graph = helper.make_graph(
        [helper.make_node("Det", ["input"], ["det"])], "unsupported",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 3])],
        [helper.make_tensor_value_info("det", TensorProto.FLOAT, ["N"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def make_shape_use():
    """A batched model that needs the batch size at run time: Shape of its input feeds a Reshape.

    x float32 [N,4] -> Reshape(x, [Shape(x)[0], 2, 2]) * 2 * (N / N) -> y float32 [N,2,2]
    """
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Constant", [], ["start"], value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("Constant", [], ["end"], value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("Slice", ["shape", "start", "end"], ["n"]),
        helper.make_node("Constant", [], ["tail"], value=numpy_helper.from_array(np.array([2, 2], np.int64))),
        helper.make_node("Concat", ["n", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["r"]),
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
        helper.make_node("Mul", ["r", "two"], ["r2"]),
        # The batch size as a float, divided by itself: 1.0, but only known at run time (Shape -> Cast).
        helper.make_node("Cast", ["n"], ["n_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["n_f", "n_f"], ["one"]),
        helper.make_node("Mul", ["r2", "one"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "shape_use",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def make_shape_out():
    """The shape of the batched input as an output, beside a batch-major one (an issue-23 defect: tract
    folded Shape(x) into a constant holding the symbol N and failed every request).

    x float32 [N,4] -> y float32 [N,4] (x * 2), s int64 [2] (Shape(x))
    """
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
        helper.make_node("Mul", ["x", "two"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "shape_out",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def make_odd_outputs():
    """A batch-major input but outputs that are not batch-major: the pool must serve it one request at a time.

    x float32 [N,4] ->
      total  float32 []     sum of every element (a scalar)
      colsum float32 [1,4]  column sums (fixed first dimension)
      flat   float32 [M]    x flattened (another symbol first)
      relu   float32 (no shape declared)
    """
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Constant", [], ["axis0"], value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("ReduceSum", ["x", "axis0"], ["colsum"], keepdims=1),
        helper.make_node("Constant", [], ["minus1"], value=numpy_helper.from_array(np.array([-1], np.int64))),
        helper.make_node("Reshape", ["x", "minus1"], ["flat"]),
        helper.make_node("Relu", ["x"], ["relu"]),
    ]
    shapeless = helper.make_tensor_value_info("relu", TensorProto.FLOAT, None)
    graph = helper.make_graph(
        nodes, "odd_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("total", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("colsum", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["M"]),
            shapeless,
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def make_partly():
    """One batched and one unbatched input: x float32 [N,4] + bias float32 [4] -> y float32 [N,4]."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"])], "partly",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def make_wide():
    """A model with a large input, for the memory benchmark: x float32 [N, 1048576] -> row sums [N, 1]."""
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([1], np.int64))),
            helper.make_node("ReduceSum", ["x", "axes"], ["sum"], keepdims=1),
        ],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1 << 20])],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def export_digits(clf):
    """A digits classifier as ONNX: input float32 [N, 64] -> label int64 [N], probabilities [N, 10]."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    model = convert_sklearn(
        clf, "digits",
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={type(clf): {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": 3},
    )
    model = onnx.load_from_string(model.SerializeToString())
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) > 0 and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "N"
    return model


def make_digits(out):
    """Train an MLP classifier on scikit-learn's bundled digits, export it, save the held-out split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=0)
    clf.fit(x_train, y_train)
    sk_label = clf.predict(x_test).astype(np.int64)
    accuracy = float((sk_label == y_test).mean())

    model = convert_sklearn(
        clf, "digits",
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={type(clf): {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": 3},
    )
    # The export exactly as skl2onnx writes it by default: unnamed dynamic batch dims (`None`), as most
    # exporters do. The server must serve this one as it is.
    raw_path = os.path.join(out, "models", "digits_raw", "1", "model.onnx")
    save_model(model, raw_path)
    write_case(os.path.join(out, "reference", "digits_raw", "test"), {"input": x_test}, ort_run(raw_path, {"input": x_test}))
    # The same export with the batch dim named afterwards (skl2onnx cannot take a string dim).
    model = onnx.load_from_string(model.SerializeToString())
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) > 0 and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "N"
    path = os.path.join(out, "models", "digits", "1", "model.onnx")
    save_model(model, path)
    ort_out = ort_run(path, {"input": x_test})
    write_case(
        os.path.join(out, "reference", "digits", "test"),
        {"input": x_test},
        ort_out,
        extras={"y_true": y_test, "sklearn_label": sk_label},
    )
    # The training inputs as a reference sample for drift (`fabric model push ... --reference`), as
    # numpy.savez writes it, named after the model's input.
    np.savez(os.path.join(out, "reference", "digits", "train.npz"), input=x_train)
    # The same network trained on labels with every 3 and every 5 relabelled 8: a canary that is worse
    # on the digits while as fast as the stable version (same shape, same size), for rollback on
    # accuracy.
    y_bad = np.where(np.isin(y_train, [3, 5]), 8, y_train)
    bad = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=0).fit(x_train, y_bad)
    save_model(export_digits(bad), os.path.join(out, "models", "digits_mislabelled", "1", "model.onnx"))
    # The small model of a cascade on the digits: 4 hidden units, 310 parameters (the MLP above has
    # 4,810), confident about most digits and escalating the rest to the big one.
    small = MLPClassifier(hidden_layer_sizes=(4,), max_iter=3000, random_state=0).fit(x_train, y_train)
    save_model(export_digits(small), os.path.join(out, "models", "digits_small", "1", "model.onnx"))
    return accuracy, len(y_test)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="build", help="output folder (default: build)")
    args = parser.parse_args()
    out = args.out
    for sub in ("models", "reference", "bad-models"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)

    rng = np.random.default_rng(20261123)

    mlp_path = os.path.join(out, "models", "mlp", "1", "model.onnx")
    save_model(make_mlp(rng), mlp_path)
    reference_cases(out, "mlp", mlp_path, {
        "batch1": {"input": rng.random((1, 784), dtype=np.float32)},
        "batch7": {"input": rng.random((7, 784), dtype=np.float32)},
    })

    cnn_path = os.path.join(out, "models", "cnn", "1", "model.onnx")
    save_model(make_cnn(rng), cnn_path)
    reference_cases(out, "cnn", cnn_path, {
        "batch1": {"input": rng.random((1, 3, 64, 64), dtype=np.float32)},
        "batch3": {"input": rng.random((3, 3, 64, 64), dtype=np.float32)},
    })

    mixed_path = os.path.join(out, "models", "mixed", "1", "model.onnx")
    save_model(make_mixed(), mixed_path)
    reference_cases(out, "mixed", mixed_path, {
        "batch5": {
            "ids": rng.integers(-1000, 1000, (5, 4), dtype=np.int64),
            "weights": rng.standard_normal((5, 4)),
        },
    })

    accuracy, n_test = make_digits(out)

    for name, model, cases in [
        ("shape_use", make_shape_use(), {"batch3": {"x": rng.standard_normal((3, 4)).astype(np.float32)}}),
        ("shape_out", make_shape_out(), {
            "batch3": {"x": rng.standard_normal((3, 4)).astype(np.float32)},
            "batch1": {"x": rng.standard_normal((1, 4)).astype(np.float32)},
        }),
        ("odd_outputs", make_odd_outputs(), {"batch3": {"x": rng.standard_normal((3, 4)).astype(np.float32)}}),
        ("partly", make_partly(), {"batch2": {
            "x": rng.standard_normal((2, 4)).astype(np.float32),
            "bias": rng.standard_normal(4).astype(np.float32),
        }}),
    ]:
        path = os.path.join(out, "models", name, "1", "model.onnx")
        save_model(model, path, check=name != "odd_outputs")
        reference_cases(out, name, path, cases)

    save_model(make_wide(), os.path.join(out, "models", "wide", "1", "model.onnx"))

    # The MLP's shape with other weights (its own seed, so the models above stay as they were): a
    # version whose answers differ, for the shadow-traffic tests.
    save_model(make_mlp(np.random.default_rng(7)), os.path.join(out, "models", "mlp_alt", "1", "model.onnx"))
    # The CNN's signature with 20x its multiply-adds: a slower canary, for automatic rollback.
    save_model(make_cnn_slow(np.random.default_rng(12)), os.path.join(out, "models", "cnn_slow", "1", "model.onnx"))

    bad = os.path.join(out, "bad-models")
    save_model(make_unsupported(), os.path.join(bad, "unsupported", "model.onnx"))
    # The MLP declaring an operator-set version no engine implements.
    wrong_opset = make_mlp(np.random.default_rng(7))
    wrong_opset.opset_import[0].version = 999
    save_model(wrong_opset, os.path.join(bad, "wrong_opset", "model.onnx"), check=False)
    os.makedirs(os.path.join(bad, "corrupt"), exist_ok=True)
    with open(mlp_path, "rb") as f:
        head = f.read(4096)
    # A truncated protobuf: the first 4 KiB of a real model, then garbage.
    with open(os.path.join(bad, "corrupt", "model.onnx"), "wb") as f:
        f.write(head[:3000] + bytes(range(256)) * 4)

    print(f"models written to {out}/models; digits: sklearn accuracy {accuracy:.4f} on {n_test} held-out samples")


if __name__ == "__main__":
    main()
