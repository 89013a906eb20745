"""Attention -> com.microsoft.MultiHeadAttention.

The pattern, anchored at the Softmax: the Q/K/V head splits (Reshape + Transpose, RotaryEmbedding on Q and K
from the rotary rule), the past concat along the sequence, the scaled `Q K^T`, an optional causal mask
(`Where(key_pos > query_pos, fill, scores)`, the positions from Range), Softmax over the last axis and the
product with V merged back to [B, S, hidden]. It becomes one MultiHeadAttention, `unidirectional` for the
causal mask (ORT 1.31's CPU kernel offsets it by the past length: checked for prefill, decode and
multi-token steps on a cache). MHA takes past_key/past_value and returns present_key/present_value in
[B, H, S, D], so the graph keeps its inputs and outputs; RotaryEmbedding moves in front of the head split
(it takes [B, S, hidden] too). A mask of another shape (additive, sliding window, not causal) is left
unfused, and said so, rather than guessed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from pipeline.core.graph import attribute
from pipeline.core.rewrite import GraphView, Mismatch, Rule

from .heads import BNSH_TO_BSNH, head_split, shape_rank
from .rotary import MS


@dataclass
class Heads:
    flat: str  # [B, S, H * D], before the head split
    heads: int
    head_dim: int
    rotary: onnx.NodeProto | None = None  # a RotaryEmbedding on the split heads, to re-apply on `flat`


@dataclass
class AttentionMatch:
    softmax: onnx.NodeProto  # the anchor: fused nodes are named into its scope
    q: Heads
    k: Heads
    v: Heads
    past: tuple[str, str] | None  # graph inputs past_key, past_value
    present: tuple[str, str] | None
    present_nodes: list[onnx.NodeProto] = field(default_factory=list)
    scale: float = 1.0
    causal: bool = False
    fill: float | None = None
    out: str = ""
    merge: onnx.NodeProto | None = None  # the Reshape back to [B, S, hidden]


class AttentionRule(Rule[AttentionMatch]):
    """The attention pattern at each Softmax; subclasses say what it becomes."""

    pattern = "attention"

    def __init__(self, num_heads: int = 0):
        self.num_heads = num_heads  # 0: whatever the head split says

    def anchors(self, view: GraphView) -> list[onnx.NodeProto]:
        return [n for n in view.graph.node if n.op_type == "Softmax"]

    def match(self, view: GraphView, anchor: onnx.NodeProto) -> AttentionMatch:
        return match_attention(view, anchor, self.num_heads)


class MultiHeadAttentionRule(AttentionRule):
    """present = past ++ new: the graph keeps its inputs and outputs."""

    def rewrite(self, view: GraphView, match: AttentionMatch) -> None:
        m = match
        view.remove([m.merge, *m.present_nodes])
        query, key = with_rotary(view, m.q), with_rotary(view, m.k)
        inputs = [query, key, m.v.flat, "", "", "", *(m.past or ())]
        attrs = {"num_heads": m.q.heads, "unidirectional": int(m.causal), "scale": m.scale}
        if m.causal and m.fill is not None and np.isfinite(m.fill):
            attrs["mask_filter_value"] = m.fill
        outputs = [m.out, *(m.present or ())]
        view.add_node("MultiHeadAttention", inputs[:len(inputs) if m.past else 3], outputs, m.softmax, domain=MS,
                      **attrs)


def with_rotary(view: GraphView, heads: Heads) -> str:
    """RoPE on [B, S, hidden] instead of [B, H, S, D]: same rotation, and MHA takes Q and K unsplit."""
    if heads.rotary is None:
        return heads.flat
    attrs = {a.name: helper.get_attribute_value(a) for a in heads.rotary.attribute}
    if attrs.get("rotary_embedding_dim"):
        attrs["num_heads"] = heads.heads  # 3D input with a partial rotary needs the head count
    out = view.fresh(heads.flat + "_rotary")
    view.add_node("RotaryEmbedding", [heads.flat, *heads.rotary.input[1:]], [out], heads.rotary, domain=MS, **attrs)
    return out


def match_attention(view: GraphView, softmax: onnx.NodeProto, num_heads: int) -> AttentionMatch:
    if attribute(softmax, "axis", -1) not in (-1, 3):
        raise Mismatch("Softmax is not over the last axis")
    scores = view.parent(softmax.input[0], ["Where", "Div", "Mul", "MatMul", "Add"], "the Softmax input")
    causal, fill, scaled = False, None, softmax.input[0]
    if scores.op_type == "Add":
        raise Mismatch("the scores get an additive mask, which this fusion does not take")
    if scores.op_type == "Where":
        check_causal(view, scores.input[0])
        fill_value = view.const(scores.input[1])
        if fill_value is None or fill_value.size != 1 or float(fill_value.ravel()[0]) > -1e4:
            raise Mismatch("the masked scores are not filled with a large negative constant")
        causal, fill, scaled = True, float(fill_value.ravel()[0]), scores.input[2]
    qk, scale = scaled_qk(view, scaled)
    kt = view.parent(qk.input[1], ["Transpose"], "the key side of Q K^T")
    if attribute(kt, "perm") != [0, 1, 3, 2]:
        raise Mismatch("the keys are not transposed to [B, H, D, S]")
    k4, past_key, present_key = past_concat(view, kt.input[0], "key")
    pv = view.child(softmax.output[0], "MatMul", "the attention probabilities")
    if pv.input[0] != softmax.output[0] and pv.input[0] not in cast_outputs(view, softmax):
        raise Mismatch("the probabilities are the right operand of the MatMul with V")
    v4, past_value, present_value = past_concat(view, pv.input[1], "value")
    if (past_key is None) != (past_value is None):
        raise Mismatch("only one of key and value has a past")
    q, k, v = (head_split_of(view, t, what) for t, what in ((qk.input[0], "query"), (k4, "key"), (v4, "value")))
    if v.rotary is not None:
        raise Mismatch("the values are rotated")
    if {(h.heads, h.head_dim) for h in (q, k, v)} != {(q.heads, q.head_dim)}:
        raise Mismatch("query, key and value split into different head counts or sizes")
    if num_heads and q.heads != num_heads:
        raise Mismatch(f"the heads split into {q.heads}, not num_heads {num_heads}")
    merge_t = view.child(pv.output[0], "Transpose", "the attention output")
    merge = view.child(merge_t.output[0], "Reshape", "the transposed attention output")
    if attribute(merge_t, "perm") != BNSH_TO_BSNH or shape_rank(view, merge.input[1]) != 3:
        raise Mismatch("the attention output is not merged back to [B, S, hidden]")
    past = (past_key, past_value) if past_key else None
    present = (present_key.output[0], present_value.output[0]) if past_key else None
    return AttentionMatch(softmax, q, k, v, past, present, [present_key, present_value] if past else [], scale,
                          causal, fill, merge.output[0], merge)


def cast_outputs(view: GraphView, node: onnx.NodeProto) -> set[str]:
    """The outputs of the Casts (chained) that read `node`'s first output."""
    outs, frontier = set(), [node.output[0]]
    while frontier:
        t = frontier.pop()
        for c in view.consumers.get(t, []):
            if c.op_type == "Cast":
                outs.add(c.output[0])
                frontier.append(c.output[0])
    return outs


def scaled_qk(view: GraphView, scaled: str) -> tuple[onnx.NodeProto, float]:
    """`Q K^T`, maybe divided or multiplied by a constant -> (the MatMul, the scale)."""
    node = view.parent(scaled, ["Div", "Mul", "MatMul"], "the attention scores")
    if node.op_type == "MatMul":
        return node, 1.0
    factor = view.const(node.input[1])
    if factor is None or factor.size != 1:
        raise Mismatch(f"the scores are scaled ({node.op_type}) by something other than a constant")
    qk = view.parent(node.input[0], ["MatMul"], "the scaled scores")
    value = float(factor.ravel()[0])
    return qk, 1.0 / value if node.op_type == "Div" else value


def past_concat(view: GraphView, tensor: str, what: str) -> tuple[str, str | None, onnx.NodeProto | None]:
    """Concat(past, new, axis=2) with `past` a graph input -> (new, past, the Concat); else (tensor, None, None)."""
    node = view.producer.get(tensor)
    if node is None or node.op_type != "Concat":
        return tensor, None, None
    if len(node.input) != 2 or attribute(node, "axis") not in (2, -2) or node.input[0] not in view.inputs:
        raise Mismatch(f"the {what}s are a Concat, but not of a past {what} graph input along the sequence axis")
    return node.input[1], node.input[0], node


def head_split_of(view: GraphView, tensor: str, what: str) -> Heads:
    """Query, key or value heads, maybe rotated: the flat tensor before the split, the split, the rotary."""
    node = view.producer.get(tensor)
    rotary = node if node is not None and node.op_type == "RotaryEmbedding" and node.domain == MS else None
    flat_4d = rotary.input[0] if rotary else tensor
    heads, head_dim = head_split(view, flat_4d, f"the {what}")
    reshape = view.producer[view.producer[flat_4d].input[0]]
    return Heads(reshape.input[0], heads, head_dim, rotary)


def check_causal(view: GraphView, condition: str) -> None:
    """Where's condition must be key_pos > query_pos (or query_pos < key_pos), positions from Range."""
    cmp = view.parent(condition, ["Greater", "Less"], "the mask condition")
    key, query = cmp.input if cmp.op_type == "Greater" else reversed(cmp.input)
    if not (positions(view, key, axis=0) and positions(view, query, axis=1)):
        raise Mismatch(f"the mask is not causal ({cmp.op_type} of key positions [1, T] and query positions [S, 1])")


def positions(view: GraphView, tensor: str, axis: int) -> bool:
    """Unsqueeze(Range(0, n, 1) [+ offset], axis): a row or column of positions."""
    node = view.producer.get(tensor)
    if node is None or node.op_type != "Unsqueeze":
        return False
    axes = view.ints(node.input[1]) if len(node.input) > 1 else attribute(node, "axes")
    if axes != [axis]:
        return False
    src = view.producer.get(node.input[0])
    while src is not None and src.op_type in ("Add", "Cast"):
        src = next((p for p in (view.producer.get(i) for i in src.input) if p is not None and p.op_type in
                    ("Range", "Add", "Cast")), None)
    return src is not None and src.op_type == "Range" and view.ints(src.input[0]) == [0] and \
        view.ints(src.input[2]) == [1]
