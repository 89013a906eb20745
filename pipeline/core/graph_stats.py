"""Graph statistics for `pipeline inspect`: multiply-accumulates of one node from its shapes, the blocks folded
into a tree of their scopes, and where a model's durations come from.

FLOPs depend on input lengths (a TTS model's frame count depends on the text), so the shapes come from a real
run (ONNX Runtime's profile, see `pipeline.engine.profile`), not from the graph's symbolic shapes.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx

from pipeline.core.blocks import GRAPH_LEVEL, BlockPartition
from pipeline.core.graph import attribute, length_setters, producers

Shape = Sequence[int] | None

# Ops whose multiply-accumulates `node_macs` counts; ORT's fused and quantized forms included, since the profile
# names the kernel that ran (a MatMulInteger runs as MatMulIntegerToFloat, a Conv+Relu as FusedConv).
MATMUL_OPS = frozenset({"MatMul", "FusedMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                        "QLinearMatMul", "FusedMatMulActivation"})
CONV_OPS = {"Conv": 1, "FusedConv": 1, "ConvInteger": 1, "NhwcConv": 1, "QLinearConv": 3}  # op -> weight input
RNN_OPS = frozenset({"LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"})
COUNTED_OPS = MATMUL_OPS | set(CONV_OPS) | RNN_OPS | {"ConvTranspose", "Gemm", "Attention", "MultiHeadAttention"}


def node_macs(op: str, inputs: Sequence[Shape], outputs: Sequence[Shape], node: onnx.NodeProto | None = None) -> int | None:
    """Multiply-accumulates of one run of a node, from its input and output shapes; None where the op is not one
    that counts or the shapes it needs are unknown. `node` (the graph's node, where it has one) gives attributes."""
    def shape(shapes: Sequence[Shape], i: int) -> Shape:
        return shapes[i] if i < len(shapes) else None

    x, w, y = shape(inputs, 0), shape(inputs, 1), shape(outputs, 0)
    trans_a = bool(attribute(node, "transA", 0)) if node is not None else False
    if op in MATMUL_OPS or op == "Gemm":
        if x is None or y is None or not x:
            return None
        k = x[-2] if trans_a and len(x) >= 2 else x[-1]
        return math.prod(y) * k
    if op in CONV_OPS:
        w = shape(inputs, CONV_OPS[op])
        return None if w is None or y is None else math.prod(y) * math.prod(w[1:])
    if op == "ConvTranspose":  # each input element scatters into (C_out / group) * kernel outputs
        return None if w is None or x is None else math.prod(x) * math.prod(w[1:])
    if op in RNN_OPS:  # per step and batch row: the input weights W and the recurrent weights R, every direction
        r = shape(inputs, 2)
        return None if x is None or w is None or r is None else math.prod(x[:2]) * (math.prod(w) + math.prod(r))
    if op == "Attention":  # contrib: packed QKV projection, then Q.K^T and weights.V over the sequence
        if x is None or w is None or y is None or len(x) != 3:
            return None
        batch, seq = x[0], x[1]
        return batch * seq * math.prod(w) + 2 * batch * seq * seq * y[-1]
    if op == "MultiHeadAttention":  # q [B, S, D], k [B, L, D] (3-D only): Q.K^T and weights.V
        if x is None or w is None or y is None or len(x) != 3 or len(w) != 3:
            return None
        return x[0] * x[1] * w[1] * (x[2] + y[-1])
    return None


@dataclass
class BlockStats:
    """One block's (or one tree node's, summed over its blocks) numbers. `macs`/`kernel_us` are None until a
    profiled run measured them."""

    nodes: int = 0
    params: int = 0
    weight_bytes: int = 0
    ops: Counter = field(default_factory=Counter)
    macs: int | None = None
    kernel_us: int | None = None

    def add(self, other: BlockStats) -> None:
        self.nodes += other.nodes
        self.params += other.params
        self.weight_bytes += other.weight_bytes
        self.ops.update(other.ops)
        if other.macs is not None:
            self.macs = (self.macs or 0) + other.macs
        if other.kernel_us is not None:
            self.kernel_us = (self.kernel_us or 0) + other.kernel_us


@dataclass
class TreeRow:
    """One line of the scope tree: `label` is the scope (single-child chains joined: `/decoder/decoder/generator`),
    `depth` its indent, `block` whether it is a block itself (a leaf, or the own nodes of a scope that has
    deeper blocks too)."""

    label: str
    depth: int
    stats: BlockStats
    block: bool


@dataclass
class _Scope:
    own: BlockStats | None = None
    children: dict[str, _Scope] = field(default_factory=dict)

    def total(self) -> BlockStats:
        total = BlockStats()
        for part in ([self.own] if self.own else []) + [c.total() for c in self.children.values()]:
            total.add(part)
        return total


def scope_tree(blocks: dict[str, BlockStats]) -> list[TreeRow]:
    """The blocks (in graph order) as a tree of their `/`-separated scopes; inner rows sum their children. A scope
    that is a block and also holds deeper blocks shows its own nodes as a child row `(own nodes)`."""
    root = _Scope()
    for block_id, stats in blocks.items():
        parts = [GRAPH_LEVEL] if block_id == GRAPH_LEVEL else [p for p in block_id.split("/") if p] or [block_id]
        scope = root
        for part in parts:
            scope = scope.children.setdefault(part, _Scope())
        scope.own = stats
    rows: list[TreeRow] = []
    for name, child in root.children.items():
        _rows(name if name == GRAPH_LEVEL else "/" + name, child, 0, rows)
    return rows


def _rows(label: str, scope: _Scope, depth: int, rows: list[TreeRow]) -> None:
    while scope.own is None and len(scope.children) == 1:  # a chain of single scopes reads as one path
        name, scope = next(iter(scope.children.items()))
        label = f"{label}/{name}"
    rows.append(TreeRow(label, depth, scope.total(), block=not scope.children))
    if scope.own is not None and scope.children:
        rows.append(TreeRow("(own nodes)", depth + 1, scope.own, block=True))
    for name, child in scope.children.items():
        _rows(f"{label}/{name}", child, depth + 1, rows)


@dataclass
class DurationsCandidate:
    tensor: str
    node: str
    block: str


def durations_candidates(model: onnx.ModelProto, partition: BlockPartition) -> list[DurationsCandidate]:
    """The tensors `length_setters` finds (a Round/Ceil output that sets a length downstream), with the node
    that makes each and that node's block: what a recipe's `model.audio.durations` or `--durations` names."""
    made_by = producers(model.graph.node)
    return [DurationsCandidate(t, made_by[t].name, partition.node_block[made_by[t].name])
            for t in length_setters(model)]
