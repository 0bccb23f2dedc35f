"""Models big enough to need a GPU, for the benchmarks only (not in CI's path): random weights, the
standard shapes, an honest load for timing (accuracy is the trained digits model's job).

  resnet50/1/model.onnx   ResNet-50 v1.5 (bottlenecks 3-4-6-3, stride on the 3x3), dynamic batch;
                          input `image` UINT8 [N, 3, 224, 224] (150,528 bytes a row): the cast to
                          float and ImageNet's normalisation are inside the graph; output `logits`
                          FP32 [N, 1000]. Batch norms folded into the convolutions' biases, as an
                          inference export has them.
  encoder/1/model.onnx    a BERT-base-shaped encoder: 12 layers, hidden 768, 12 heads, FFN 3072, GELU,
                          post-layer-norm; input `input_ids` INT64 [N, 128]; output `pooled` FP32
                          [N, 768] (the first token's state).

  .venv/bin/python scripts/bench/gen_gpu_models.py [OUT_DIR]     (default build/gpu-models)

About 100 MB and 440 MB of FP32 weights; a few seconds each. Written only where missing.
"""

import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# The IR version ONNX Runtime 1.20 and later read (the onnx package writes a newer one by default).
IR_VERSION = 8
rng = np.random.default_rng(7)


class Graph:
    """Nodes and initializers collected while a network is written layer by layer."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, array, base="w"):
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, kind, inputs, base=None, **attrs):
        out = self.name(base or kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out


def he(shape, fan_in):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in) * 0.5).astype(np.float32)


def conv(g, x, cin, cout, k, stride=1, relu=True):
    w = g.const(he((cout, cin, k, k), cin * k * k))
    b = g.const(np.zeros(cout, np.float32), "b")
    y = g.op("Conv", [x, w, b], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)
    return g.op("Relu", [y]) if relu else y


def bottleneck(g, x, cin, width, stride):
    out = width * 4
    y = conv(g, x, cin, width, 1)
    y = conv(g, y, width, width, 3, stride)
    y = conv(g, y, width, out, 1, relu=False)
    shortcut = x if (stride == 1 and cin == out) else conv(g, x, cin, out, 1, stride, relu=False)
    return g.op("Relu", [g.op("Add", [y, shortcut])]), out


def resnet50():
    g = Graph()
    x = g.op("Cast", ["image"], to=TensorProto.FLOAT)
    mean = g.const((np.array([0.485, 0.456, 0.406], np.float32) * 255).reshape(1, 3, 1, 1), "mean")
    inv_std = g.const((1.0 / (np.array([0.229, 0.224, 0.225], np.float32) * 255)).reshape(1, 3, 1, 1), "inv_std")
    x = g.op("Mul", [g.op("Sub", [x, mean]), inv_std])
    x = conv(g, x, 3, 64, 7, 2)
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(blocks):
            x, cin = bottleneck(g, x, cin, width, stride if i == 0 else 1)
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    w = g.const(he((cin, 1000), cin))
    b = g.const(np.zeros(1000, np.float32), "b")
    g.nodes.append(helper.make_node("Gemm", [x, w, b], ["logits"]))
    graph = helper.make_graph(
        g.nodes, "resnet50",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def dense(g, x, din, dout):
    w = g.const((rng.standard_normal((din, dout)) * 0.02).astype(np.float32))
    b = g.const(np.zeros(dout, np.float32), "b")
    return g.op("Add", [g.op("MatMul", [x, w]), b])


def layer_norm(g, x, hidden):
    scale = g.const(np.ones(hidden, np.float32), "ln_scale")
    bias = g.const(np.zeros(hidden, np.float32), "ln_bias")
    return g.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=1e-12)


def gelu(g, x):
    erf = g.op("Erf", [g.op("Mul", [x, g.const(np.float32(1 / np.sqrt(2)), "c")])])
    return g.op("Mul", [g.op("Mul", [x, g.const(np.float32(0.5), "c")]), g.op("Add", [erf, g.const(np.float32(1.0), "c")])])


def encoder(layers=12, hidden=768, heads=12, ffn=3072, seq=128, vocab=30522):
    g = Graph()
    head_dim = hidden // heads
    words = g.const((rng.standard_normal((vocab, hidden)) * 0.02).astype(np.float32), "word_emb")
    positions = g.const((rng.standard_normal((1, seq, hidden)) * 0.02).astype(np.float32), "pos_emb")
    x = layer_norm(g, g.op("Add", [g.op("Gather", [words, "input_ids"], axis=0), positions]), hidden)
    split = g.const(np.array([0, seq, heads, head_dim], np.int64), "shape")
    merged = g.const(np.array([0, seq, hidden], np.int64), "shape")
    scale = g.const(np.float32(1 / np.sqrt(head_dim)), "scale")
    for _ in range(layers):
        def heads_of(t):
            return g.op("Transpose", [g.op("Reshape", [t, split])], perm=[0, 2, 1, 3])
        q, k, v = (heads_of(dense(g, x, hidden, hidden)) for _ in range(3))
        scores = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), scale])
        context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        context = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), merged])
        x = layer_norm(g, g.op("Add", [x, dense(g, context, hidden, hidden)]), hidden)
        y = dense(g, gelu(g, dense(g, x, hidden, ffn)), ffn, hidden)
        x = layer_norm(g, g.op("Add", [x, y]), hidden)
    first = g.op("Gather", [x, g.const(np.array(0, np.int64), "idx")], axis=1)
    g.nodes.append(helper.make_node("Tanh", [dense(g, first, hidden, hidden)], ["pooled"]))
    graph = helper.make_graph(
        g.nodes, "encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", seq])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", hidden])],
        g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "build/gpu-models"
    for name, make in [("resnet50", resnet50), ("encoder", encoder)]:
        path = os.path.join(out, name, "1", "model.onnx")
        if os.path.exists(path):
            print(f"{path}: already there")
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        model = make()
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        onnx.save(model, path)
        print(f"{path}: {os.path.getsize(path) / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
