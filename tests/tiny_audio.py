"""A tiny vocoder built in the tests: 80-band mels in, audio out, so a real check has audio to report.

`vocoder(insert_at=..., gap=...)` splices `gap` samples of silence into its output at sample `insert_at`:
a candidate whose length changed at a known time, as a changed duration does in a real voice.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HOP = 256  # samples per mel frame: the ConvTranspose's stride, and the metric's default hop


def vocoder(seed: int = 0, noise: float = 0.0, insert_at: int | None = None, gap: int = 0) -> onnx.ModelProto:
    """mel [1, 80, T] -> audio [1, 1, T * 256 (+ gap)]: a ConvTranspose upsampler and a Tanh.

    `noise`: relative noise on the kernel (a candidate's small error)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((80, 1, HOP)) * 0.02).astype(np.float32)
    if noise:
        w += (noise * np.abs(w).mean() * np.random.default_rng(seed + 99).standard_normal(w.shape)).astype(np.float32)
    out = "audio" if insert_at is None else "wave"
    nodes = [helper.make_node("ConvTranspose", ["mel", "w"], ["pre"], name="/ups.0/ConvTranspose", strides=[HOP]),
             helper.make_node("Tanh", ["pre"], [out], name="/post/Tanh")]
    inits = [numpy_helper.from_array(w, "w")]
    if insert_at is not None:
        inits += [numpy_helper.from_array(np.array([v], np.int64), name)
                  for name, v in (("start", 0), ("cut", insert_at), ("end", 1 << 40), ("time", 2))]
        inits.append(numpy_helper.from_array(np.zeros((1, 1, gap), np.float32), "gap"))
        nodes += [helper.make_node("Slice", [out, "start", "cut", "time"], ["head"], name="/post/Slice"),
                  helper.make_node("Slice", [out, "cut", "end", "time"], ["tail"], name="/post/Slice_1"),
                  helper.make_node("Concat", ["head", "gap", "tail"], ["audio"], name="/post/Concat", axis=2)]
    graph = helper.make_graph(nodes, "vocoder", [helper.make_tensor_value_info("mel", TensorProto.FLOAT, [1, 80, "T"])],
                              [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, 1, "S"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def vocoder_set(folder: Path, model: onnx.ModelProto, sample_rate: int):
    """A one-graph ModelSet of the `hifigan` family at `sample_rate` (its audio metrics run at that rate)."""
    from pipeline.core.modelset import GraphFile, ModelSet

    folder.mkdir(parents=True, exist_ok=True)
    ms = ModelSet(folder, [GraphFile("model", "vocoder.onnx")], meta={"family": "hifigan", "sample_rate": sample_rate})
    ms.save_graph("model", model)
    ms.write_manifest()
    return ms


def mels(count: int = 3, frames: int = 60, step: int = 20) -> list[dict[str, np.ndarray]]:
    """Feeds of `count` log-mel-like inputs, `frames`, `frames + step`, ... frames long."""
    return [{"mel": (np.random.default_rng(i).standard_normal((1, 80, frames + step * i)) - 2).astype(np.float32)}
            for i in range(count)]
