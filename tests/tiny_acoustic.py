"""A tiny acoustic model built in the tests, whose output length depends on the data, as a TTS model's does.

phonemes x [1, n, 4] -> `/enc` encodes them (h [1, n, 8]) -> `/dur` predicts each one's frames (a `Round`: the
durations), expands h to frames (`CumSum`, `Range`, `Gather`: y [T, 8], T the durations' sum) -> `/pitch` reads
the frames (p [T, 2]) -> `/dur` joins y and p (a `Concat` of two T-long tensors, as Kokoro's decoder joins its
aligned features with F0 and noise) -> `/dec` makes `out` [T, 3].

A candidate built with another `duration_gain` rounds some durations differently: its output has another length.
Fed the reference's p, the candidate's `/dur` block alone cannot run (its own T does not match the reference's):
the case the check must survive.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DURATIONS = "/dur/Round_output_0"


def acoustic(seed: int = 0, duration_gain: float = 3.0, noise: float = 0.0) -> onnx.ModelProto:
    """The model above; `noise`: relative noise on the encoder's weights (a candidate's small error)."""
    rng = np.random.default_rng(seed)
    w_enc = rng.standard_normal((4, 8)).astype(np.float32) * 0.5
    if noise:
        w_enc = w_enc * (1 + noise * np.random.default_rng(seed + 7).standard_normal(w_enc.shape)).astype(np.float32)
    inits = {
        "w_enc": w_enc,
        "w_dur": rng.standard_normal((8, 1)).astype(np.float32) * 0.5,
        "gain": np.array(duration_gain, np.float32),
        "w_pitch": rng.standard_normal((8, 2)).astype(np.float32),
        "w_dec": rng.standard_normal((10, 3)).astype(np.float32),
        "axis1": np.array(1, np.int64),
        "axes0": np.array([0], np.int64),
        "axes1": np.array([1], np.int64),
        "axes2": np.array([2], np.int64),
        "zero": np.array(0, np.int64),
        "one": np.array(1, np.int64),
        "last": np.array([-1], np.int64),
    }
    node = helper.make_node
    nodes = [
        node("MatMul", ["x", "w_enc"], ["h"], name="/enc/MatMul"),
        node("MatMul", ["h", "w_dur"], ["logd"], name="/dur/MatMul"),
        node("Squeeze", ["logd", "axes2"], ["logd2"], name="/dur/Squeeze"),
        node("Softplus", ["logd2"], ["soft"], name="/dur/Softplus"),
        node("Mul", ["soft", "gain"], ["scaled"], name="/dur/Mul"),
        node("Round", ["scaled"], [DURATIONS], name="/dur/Round"),  # [1, n] frames per phoneme
        node("Cast", [DURATIONS], ["dur_i"], name="/dur/Cast", to=TensorProto.INT64),
        node("CumSum", ["dur_i", "axis1"], ["ends"], name="/dur/CumSum"),
        node("Gather", ["ends", "last"], ["total1"], name="/dur/Gather_total", axis=1),
        node("Squeeze", ["total1"], ["total"], name="/dur/Squeeze_total"),
        node("Range", ["zero", "total", "one"], ["frames"], name="/dur/Range"),  # [T]
        node("Unsqueeze", ["frames", "axes1"], ["frames_col"], name="/dur/Unsqueeze"),  # [T, 1]
        node("GreaterOrEqual", ["frames_col", "ends"], ["past"], name="/dur/GreaterOrEqual"),  # [T, n]
        node("Cast", ["past"], ["past_i"], name="/dur/Cast_past", to=TensorProto.INT64),
        node("ReduceSum", ["past_i", "axes1"], ["index"], name="/dur/ReduceSum", keepdims=0),  # [T]: phoneme
        node("Squeeze", ["h", "axes0"], ["h2"], name="/dur/Squeeze_h"),  # [n, 8]
        node("Gather", ["h2", "index"], ["y"], name="/dur/Gather", axis=0),  # [T, 8]
        node("MatMul", ["y", "w_pitch"], ["p_pre"], name="/pitch/MatMul"),
        node("Tanh", ["p_pre"], ["p"], name="/pitch/Tanh"),  # [T, 2]
        node("Concat", ["y", "p"], ["z"], name="/dur/Concat", axis=1),  # [T, 10]
        node("MatMul", ["z", "w_dec"], ["o_pre"], name="/dec/MatMul"),
        node("Tanh", ["o_pre"], ["out"], name="/dec/Tanh"),
    ]
    graph = helper.make_graph(
        nodes, "acoustic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["T", 3])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def phonemes(count: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """`count` feed dicts of 5 to 11 phonemes each."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 5 + 2 * i % 7, 4)).astype(np.float32)} for i in range(count)]
