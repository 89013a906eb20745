"""What precision a graph's nodes compute in and store their weights in: the one classifier of node precision.

Two questions, one reading of the graph:
- **compute** (`compute_mix`, `block_compute_mix`): the precision a node runs in: int8 for an integer op or a
  node fed by a DequantizeLinear (ONNX Runtime fuses the QDQ pair into an integer kernel), else fp16 or fp32
  by its output's type, else other. The Q/DQ/Cast helpers a converter adds are not counted. The check's
  per-block `precision` column.
- **weights** (`weight_precision`): the narrowest precision the weights of some nodes are stored in: int4 or
  int8 (MatMulNBits by its `bits`; integer ops; integer initializers into DequantizeLinear), fp16 (FP16
  initializers read by a matrix product, convolution, gather or cast), else fp32. Activations do not count.
  What a format beside ONNX carries over from the ONNX steps (`pipeline.formats.targets`).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import onnx
from onnx import TensorProto

if TYPE_CHECKING:
    from pipeline.core.blocks import BlockPartition

# Ops that compute on INT8 (or fewer-bit) data: a node counts as quantized when it became one.
INTEGER_OPS = {"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul",
               "MatMulIntegerToFloat", "QAttention", "QGemm", "MatMulNBits"}
# Narrowest first: a graph's precision is the narrowest its weights use.
PRECISIONS = ("int4", "int8", "fp16", "fp32")
# Converters' helper nodes: they move data between precisions and compute nothing themselves.
HELPER_OPS = {"QuantizeLinear", "DequantizeLinear", "Cast", "DynamicQuantizeLinear"}
# Ops whose FP16 initializer inputs are FP16-stored weights.
WEIGHT_READERS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "Cast"}
_INT4 = {TensorProto.INT4, TensorProto.UINT4}
_INT8 = {TensorProto.INT8, TensorProto.UINT8}


def is_integer_op(node: onnx.NodeProto) -> bool:
    """An op that computes on integer data: the quantizers' integer ops, and the QOperator format's QLinear* ops."""
    return node.op_type in INTEGER_OPS or node.op_type.startswith("QLinear")


class NodePrecision:
    """Classifies the nodes of one graph; what it reads off the graph (initializers, DequantizeLinear outputs,
    tensor types) is read once."""

    def __init__(self, model: onnx.ModelProto, types: dict[str, int] | None = None):
        self.initializers = {t.name: t.data_type for t in model.graph.initializer}
        self.dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        self.types = types or {}  # tensor name -> element type; only `compute` reads it

    def compute(self, node: onnx.NodeProto) -> str | None:
        """int8, fp16, fp32 or other; None for a helper (Q/DQ/Cast) node."""
        if node.op_type in HELPER_OPS:
            return None
        if is_integer_op(node) or any(i in self.dequantized for i in node.input):
            return "int8"
        if any(self.types.get(o) == TensorProto.FLOAT16 for o in node.output):
            return "fp16"
        if any(self.types.get(o) == TensorProto.FLOAT for o in node.output):
            return "fp32"
        return "other"

    def weights(self, node: onnx.NodeProto) -> str:
        """int4, int8, fp16 or fp32: the precision of the weights this node reads (fp32 when it reads none)."""
        if node.op_type == "MatMulNBits":
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            return "int4" if bits <= 4 else "int8"
        if is_integer_op(node):
            return "int8"
        if node.op_type == "DequantizeLinear" and node.input[0] in self.initializers:
            kind = self.initializers[node.input[0]]
            return "int4" if kind in _INT4 else "int8" if kind in _INT8 else "fp32"
        if node.op_type in WEIGHT_READERS and any(self.initializers.get(i) == TensorProto.FLOAT16 for i in node.input):
            return "fp16"
        return "fp32"


def weight_precision(model: onnx.ModelProto, nodes: Iterable[onnx.NodeProto] | None = None) -> str:
    """The narrowest weight precision of `nodes` (default: the whole graph): int4, int8, fp16 or fp32."""
    classify = NodePrecision(model)
    seen = {"fp32", *(classify.weights(n) for n in (model.graph.node if nodes is None else nodes))}
    return min(seen, key=PRECISIONS.index)


def compute_mix(model: onnx.ModelProto, types: dict[str, int]) -> dict[str, int]:
    """Compute nodes of the whole graph by the precision they run in (helpers not counted), in the order each
    precision first appears."""
    classify = NodePrecision(model, types)
    mix: dict[str, int] = {}
    for n in model.graph.node:
        kind = classify.compute(n)
        if kind is not None:
            mix[kind] = mix.get(kind, 0) + 1
    return mix


def block_compute_mix(model: onnx.ModelProto, partition: BlockPartition,
                      types: dict[str, int]) -> dict[str, dict[str, int]]:
    """`compute_mix` of every block of `partition` (blocks without a compute node left out)."""
    classify = NodePrecision(model, types)
    mix: dict[str, dict[str, int]] = {}
    for n in model.graph.node:
        kind = classify.compute(n)
        if kind is not None:
            counts = mix.setdefault(partition.node_block[n.name], {})
            counts[kind] = counts.get(kind, 0) + 1
    return mix
