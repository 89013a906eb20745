"""RoPE -> com.microsoft.RotaryEmbedding.

The pattern is `x * cos + rotate_half(x) * sin` on heads split to [B, H, S, D], the tables being
`cos/sin(cat(freqs, freqs))` and rotate_half slicing at a constant head_size / 2 (the chattts_gpt exporter
slices at a Python int for this). It is matched by op structure, never by node names: ONNX Runtime's
transformer fusions (every model_type) and onnxscript's ort_fusions (0.7, written for dynamo exports with
static shapes) match neither the attention nor the rotary of a layer written out with explicit past/present
KV tensors (measured with onnxruntime 1.31).

The fused op's cos/sin caches are `cos/sin(freqs)` of the current positions only, with position_ids [0]: the
same arithmetic as the unfused graph, and no maximum sequence length baked into the file.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.core.graph import attribute
from pipeline.core.rewrite import GraphView, Mismatch, NoMatch, Rule

from .heads import head_split

MS = "com.microsoft"
START_POSITION = "fuse_attention_position_zero"


@dataclass
class Rope:
    x: str  # the tensor rotated, heads split: [B, H, S, D]
    freqs: str  # positions x inverse frequencies, [S, D/2]; the tables are cos/sin(cat(freqs, freqs))
    table_type: int | None  # the dtype the tables are cast to, if they are
    out: str
    anchor: onnx.NodeProto  # the final Add


class RotaryRule(Rule[Rope]):
    """Anchored at rotate_half's Concat(Neg, Slice); the rewrite replaces the final Add."""

    pattern = "rotary embedding"

    def setup(self, view: GraphView) -> None:
        # Every RoPE of one angle tensor (a layer's Q and K) shares one pair of tables.
        self.tables: dict[str, tuple[str, str]] = {}

    def anchors(self, view: GraphView) -> list[onnx.NodeProto]:
        return [n for n in view.graph.node if n.op_type == "Concat" and is_rotate_half_candidate(view, n)]

    def match(self, view: GraphView, anchor: onnx.NodeProto) -> Rope | NoMatch:
        users = view.consumers.get(anchor.output[0], [])
        add = next((a for m in users if m.op_type == "Mul" for a in view.consumers.get(m.output[0], [])
                    if a.op_type == "Add"), None)
        if add is None:
            return NoMatch("rotate_half(x) * sin is not added to x * cos", anchor)
        return match_rope(view, add)

    def rewrite(self, view: GraphView, match: Rope) -> None:
        if match.freqs not in self.tables:
            self.tables[match.freqs] = rope_tables(view, match)
        cos, sin = self.tables[match.freqs]
        view.remove([match.anchor])
        view.add_node("RotaryEmbedding", [match.x, start_position(view), cos, sin], [match.out], match.anchor,
                      domain=MS)


def is_rotate_half_candidate(view: GraphView, concat: onnx.NodeProto) -> bool:
    kinds = [getattr(view.producer.get(i), "op_type", None) for i in concat.input]
    return kinds == ["Neg", "Slice"]


def match_rope(view: GraphView, add: onnx.NodeProto) -> Rope:
    a, b = (view.producer.get(i) for i in add.input)
    if a is None or b is None or a.op_type != "Mul" or b.op_type != "Mul":
        raise Mismatch("the RoPE sum is not Add(Mul, Mul)")
    error = None
    for cos_term, sin_term in ((a, b), (b, a)):
        try:
            return rope_from(view, add, cos_term, sin_term)
        except Mismatch as e:
            error = error or e
    raise error


def rope_from(view: GraphView, add: onnx.NodeProto, cos_term: onnx.NodeProto, sin_term: onnx.NodeProto) -> Rope:
    rotated = next((i for i in sin_term.input if getattr(view.producer.get(i), "op_type", None) == "Concat"), None)
    if rotated is None:
        raise Mismatch("no rotate_half Concat in the RoPE sum")
    x, half = rotate_half(view, view.producer[rotated])
    if x not in cos_term.input:
        raise Mismatch("x * cos and rotate_half(x) * sin rotate different tensors")
    cos_freqs, table_type = table(view, other(cos_term.input, x), "Cos")
    sin_freqs, _ = table(view, other(sin_term.input, rotated), "Sin")
    if cos_freqs != sin_freqs:
        raise Mismatch("cos and sin come from different angles")
    _, head_dim = head_split(view, x, "the rotated tensor")
    if 2 * half != head_dim:
        raise Mismatch(f"rotate_half splits at {half}, not at head_size / 2 = {head_dim // 2} (partial rotary)")
    return Rope(x, cos_freqs, table_type, add.output[0], add)


def other(pair, one: str) -> str:
    return pair[1] if pair[0] == one else pair[0]


def rotate_half(view: GraphView, concat: onnx.NodeProto) -> tuple[str, int]:
    """Concat(Neg(x[..., half:]), x[..., :half], axis=-1) -> (x, half)."""
    if attribute(concat, "axis") not in (-1, 3):
        raise Mismatch("rotate_half's Concat is not on the last axis")
    neg, low = (view.producer[i] for i in concat.input)
    high = view.parent(neg.input[0], ["Slice"], "rotate_half's negated half")
    if high.input[0] != low.input[0]:
        raise Mismatch("rotate_half's halves come from different tensors")
    hs, he = slice_bounds(view, high)
    ls, le = slice_bounds(view, low)
    if ls != 0 or hs != le or he < 2 * hs:
        raise Mismatch(f"rotate_half does not split at one constant point (slices {ls}:{le} and {hs}:{he})")
    return low.input[0], hs


def slice_bounds(view: GraphView, node: onnx.NodeProto) -> tuple[int, int]:
    """(start, end) of a Slice on the last axis with step 1 and constant bounds."""
    args = [view.ints(i) if i else None for i in list(node.input[1:]) + [""] * (5 - len(node.input))]
    starts, ends, axes, steps = args[:4]
    if starts is None or ends is None or len(starts) != 1:
        raise Mismatch("rotate_half's slice bounds are not constants")
    if axes not in ([-1], [3]) or steps not in (None, [1]):
        raise Mismatch("rotate_half does not slice the last axis with step 1")
    return starts[0], ends[0]


def table(view: GraphView, tensor: str, op: str) -> tuple[str, int | None]:
    """cos/sin(cat(freqs, freqs)), maybe cast -> (freqs, the dtype cast to)."""
    node, cast_to = view.producer.get(tensor), None
    while node is not None and node.op_type == "Cast":
        cast_to = cast_to if cast_to is not None else attribute(node, "to")
        node = view.producer.get(node.input[0])
    if node is None or node.op_type != op:
        raise Mismatch(f"the {op.lower()} table is {getattr(node, 'op_type', 'an input')}, not {op}(angles)")
    cat = view.producer.get(node.input[0])
    if cat is None or cat.op_type != "Concat" or len(cat.input) != 2 or cat.input[0] != cat.input[1] \
            or attribute(cat, "axis") not in (-1, 1):
        raise Mismatch(f"the {op.lower()} angles are not cat(freqs, freqs) on the last axis")
    return cat.input[0], cast_to


def rope_tables(view: GraphView, rope: Rope) -> tuple[str, str]:
    """cos/sin caches of the current positions only, [S, D/2]: with position_ids [0] they line up with x."""
    tables = []
    for op in ("Cos", "Sin"):
        out = view.fresh(f"{rope.freqs}_{op.lower()}_cache")
        view.add_node(op, [rope.freqs], [out], rope.anchor)
        if rope.table_type is not None:
            cast = view.fresh(out + "_cast")
            view.add_node("Cast", [out], [cast], rope.anchor, to=rope.table_type)
            out = cast
        tables.append(out)
    return tables[0], tables[1]


def start_position(view: GraphView) -> str:
    """The position_ids input of every RotaryEmbedding: [0], the tables holding the current positions only."""
    if START_POSITION not in view.initializers:
        view.add_initializer(numpy_helper.from_array(np.zeros(1, np.int64), START_POSITION))
    return START_POSITION
