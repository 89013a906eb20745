"""Tiny ONNX models built in the tests: scoped node names like a PyTorch export."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def conv_net(seed: int = 0, channels: int = 8, layers: int = 3) -> onnx.ModelProto:
    """x [1, 4, T] -> layers of Conv+Relu under /enc/layers.N -> /dec/proj Conv -> y [1, 1, T].

    Includes a constant-foldable scale (Add of two constants) so `simplify` has
    something to fold.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def weight(name: str, shape: tuple[int, ...]) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name))
        return name

    current, cin = "x", 4
    for i in range(layers):
        scope = f"/enc/layers.{i}"
        w = weight(f"enc.layers.{i}.conv.weight", (channels, cin, 3))
        b = weight(f"enc.layers.{i}.conv.bias", (channels,))
        nodes.append(helper.make_node("Conv", [current, w, b], [f"{scope}/conv/Conv_output_0"],
                                      name=f"{scope}/conv/Conv", pads=[1, 1]))
        nodes.append(helper.make_node("Relu", [f"{scope}/conv/Conv_output_0"], [f"{scope}/Relu_output_0"],
                                      name=f"{scope}/Relu"))
        current, cin = f"{scope}/Relu_output_0", channels
    inits.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    nodes.append(helper.make_node("Add", ["half", "half"], ["/dec/one"], name="/dec/Add"))
    nodes.append(helper.make_node("Mul", [current, "/dec/one"], ["/dec/Mul_output_0"], name="/dec/Mul"))
    w = weight("dec.proj.weight", (1, channels, 1))
    nodes.append(helper.make_node("Conv", ["/dec/Mul_output_0", w], ["y"], name="/dec/proj/Conv"))
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, "T"])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_npz_feeds(folder: Path, count: int = 6, seed: int = 1, lengths=(16, 24, 32)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        t = lengths[i % len(lengths)]
        np.savez(folder / f"sample_{i:02d}.npz", x=rng.standard_normal((1, 4, t)).astype(np.float32))
    return folder


def two_upsamplers(stride_1: int = 5) -> onnx.ModelProto:
    """x -> /dec/ups.0 (s 2) -> LeakyRelu -> /dec/ups.1 (s `stride_1`) -> y: two blocks, each one ConvTranspose."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
             [("ups.0.weight", (6, 4, 4)), ("ups.0.bias", (4,)), ("ups.1.weight", (4, 2, 2 * stride_1))]]
    node = helper.make_node
    nodes = [node("ConvTranspose", ["x", "ups.0.weight", "ups.0.bias"], ["u0"], name="/dec/ups.0/ConvTranspose",
                  strides=[2], pads=[1, 1]),
             node("LeakyRelu", ["u0"], ["a0"], name="/dec/LeakyRelu", alpha=0.1),
             node("ConvTranspose", ["a0", "ups.1.weight"], ["y"], name="/dec/ups.1/ConvTranspose",
                  strides=[stride_1], pads=[stride_1 // 2, stride_1 - stride_1 // 2])]
    graph = helper.make_graph(nodes, "ups2", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, "T"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, "T_out"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
