"""compress_weights: store weights as INT8 or FP16, decompressed when the model loads.

Weight-only compression: each selected FP32 weight becomes a compact
initializer followed by `Cast` (and, for INT8, a `Mul` by its per-channel
scale). ONNX Runtime constant-folds those nodes when it builds the session, so
the model computes exactly as an FP32 model with rounded weights: it saves
download and disk (INT8 about 4x, FP16 2x), not RAM or time.

Why not `DequantizeLinear`: ONNX Runtime 1.31 does not fold a weight-only
DequantizeLinear; it runs it on every inference (measured about 3% slower on
the Piper voice). Cast+Mul folds.

INT8 is symmetric, one scale per output channel (axis 0 for Conv weights and
Gather tables, axis 1 for ConvTranspose and MatMul, each direction's gate row
for an LSTM's or GRU's W and R), `q = round(w / scale)`,
`scale = max|w| / 127`. A weight is compressed only when every consumer is in
the step's scope and uses it as a weight (Conv/ConvTranspose/Gemm/MatMul input
1, LSTM/GRU inputs 1 and 2, Gather input 0), so a shared tensor never changes
under a block kept exact. Recurrent weights matter for size: 13% of Kokoro-82M's
weights are LSTMs.
"""
from __future__ import annotations

from collections import Counter
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pydantic import Field

from pipeline.core.onnx_io import tensor_array

from pipeline.core.onnx_io import copy_model

from .base import Params, Pass, PassContext, PassResult

# (op type, input index) pairs where an initializer is a weight.
_WEIGHT_SLOTS = {("Conv", 1), ("ConvTranspose", 1), ("Gemm", 1), ("MatMul", 1), ("Gather", 0), ("LSTM", 1),
                 ("LSTM", 2), ("GRU", 1), ("GRU", 2)}
# Recurrent weights are [directions, gates x hidden, inputs]: one scale per direction and gate row.
_RECURRENT = ("LSTM", "GRU")


class CompressWeightsParams(Params):
    dtype: Literal["int8", "fp16"] = Field(description="Storage type: `int8` (per-channel symmetric scale, "
                                           "Cast+Mul at load) or `fp16` (Cast at load).")
    min_elements: int = Field(default=1024, ge=1, description="Smallest weight (in elements) worth compressing; "
                              "small tensors such as biases and norms stay FP32.")
    op_types: list[str] = Field(default_factory=lambda: sorted({op for op, _ in _WEIGHT_SLOTS}),
                                description="Op types whose weight input is compressed (Conv, ConvTranspose, "
                                "Gemm, MatMul: input 1; LSTM, GRU: W and R; Gather: its table).")
    expect_min_tensors: int | None = Field(default=None, ge=0, description="Fail the step when fewer weights than "
                                           "this are compressed (a scope or op list that matches nothing).")


class CompressWeights(Pass):
    name = "compress_weights"
    Params = CompressWeightsParams
    changes_precision = True

    def large_model_problem(self, params: CompressWeightsParams) -> str | None:
        return None  # reads each weight from its file; only the compressed ones are held

    def apply(self, model: onnx.ModelProto, params: CompressWeightsParams, ctx: PassContext) -> PassResult:
        from pipeline.core.errors import PipelineError

        model = copy_model(model)
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:
            for k, name in enumerate(node.input):
                if name in inits:
                    uses.setdefault(name, []).append((node, k))
        slots = {s for s in _WEIGHT_SLOTS if s[0] in params.op_types}
        new_nodes, new_inits, replaced = [], [], set()
        before = after = 0
        per_block: Counter[str] = Counter()
        for name, users in uses.items():
            t = inits[name]
            if t.data_type != TensorProto.FLOAT or int(np.prod(t.dims)) < params.min_elements:
                continue
            if not all((n.op_type, k) in slots and ctx.in_scope(n) for n, k in users):
                continue
            w = tensor_array(t, ctx.weights_dir)  # a large model's weight is read from its file, one at a time
            nodes, tensors, out = _compress(name, w, params.dtype, users[0][0].op_type)
            for n, k in users:
                n.input[k] = out
            new_nodes += nodes
            new_inits += tensors
            replaced.add(name)
            before += w.nbytes
            after += sum(numpy_helper.to_array(x).nbytes for x in tensors)
            per_block[ctx.blocks.node_block.get(users[0][0].name, "?")] += 1
        if params.expect_min_tensors is not None and len(replaced) < params.expect_min_tensors:
            raise PipelineError(f"compress_weights on {ctx.graph_name!r}: expected at least "
                                f"{params.expect_min_tensors} weights, found {len(replaced)} in scope "
                                f"(op_types {params.op_types}, min_elements {params.min_elements})")
        kept = [t for t in graph.initializer if t.name not in replaced]
        del graph.initializer[:]
        graph.initializer.extend(kept + new_inits)
        nodes = new_nodes + list(graph.node)  # inputs are initializers: first is topologically fine
        del graph.node[:]
        graph.node.extend(nodes)
        stats = {"dtype": params.dtype, "tensors": len(replaced), "bytes_before": before, "bytes_after": after,
                 "tensors_per_block": dict(per_block), "blocks_changed": dict(per_block)}
        return PassResult.of(ctx, model, changed=bool(replaced), stats=stats)


def _compress(name: str, w: np.ndarray, dtype: str, op_type: str):
    """Nodes, initializers and the output name that rebuild `w` (rounded) at load time."""
    if dtype == "fp16":
        stored = numpy_helper.from_array(w.astype(np.float16), f"{name}_fp16")
        cast = helper.make_node("Cast", [stored.name], [f"{name}_decompressed"], name=f"{name}_Cast",
                                to=TensorProto.FLOAT)
        return [cast], [stored], cast.output[0]
    if op_type in _RECURRENT and w.ndim == 3:
        reduce: tuple[int, ...] = (2,)
    else:
        axis = 1 if op_type in ("ConvTranspose", "MatMul", "Gemm") and w.ndim >= 2 else 0
        reduce = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=reduce, keepdims=True) if reduce else np.abs(w)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    stored = numpy_helper.from_array(q, f"{name}_int8")
    scale_t = numpy_helper.from_array(scale, f"{name}_scale")
    cast = helper.make_node("Cast", [stored.name], [f"{name}_int8_float"], name=f"{name}_Cast", to=TensorProto.FLOAT)
    mul = helper.make_node("Mul", [cast.output[0], scale_t.name], [f"{name}_decompressed"], name=f"{name}_Mul")
    return [cast, mul], [stored, scale_t], mul.output[0]
