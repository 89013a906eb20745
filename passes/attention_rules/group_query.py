"""Attention -> com.microsoft.GroupQueryAttention over an in-place KV cache (`kv_cache: in_place`).

One preallocated buffer is both past and present (the convention is pipeline/core/kv_cache.py's): a decode
step writes its new positions into the cache instead of copying all of it into a new present (at full
ChatTTS size, 128 cached tokens, about 34 MB of traffic a step). The rotary moves inside the op (do_rotary),
from cos/sin tables that become graph inputs: the inverse frequencies are read off the graph (angles = (past
length + 0..S-1) x constants, checked) and stored in its metadata, so a runtime builds the tables once per
generation and every layer's position and angle arithmetic goes away (176 -> 14 nodes a ChatTTS layer).
ONNX Runtime's kernel takes a multi-token step on a cache at batch 1 only (prefill and one-token decode at
any batch).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper

from pipeline.core import kv_cache
from pipeline.core.graph import attribute
from pipeline.core.rewrite import GraphView, Mismatch

from .attention import AttentionMatch, AttentionRule
from .rotary import MS


class GroupQueryAttentionRule(AttentionRule):
    """The attention pattern, and what GroupQueryAttention's cache needs of it: a past, a causal mask, both or
    neither of Q and K rotated by absolute positions. The graph's inputs change to the in-place convention."""

    def check(self, view: GraphView, match: AttentionMatch) -> str | None:
        m = match
        if m.past is None:
            return "the attention has no past key/value graph inputs: no cache to keep in place"
        if not m.causal:
            return "the attention is not causally masked; GroupQueryAttention's cache attention is causal"
        if (m.q.rotary is None) != (m.k.rotary is None):
            return "only one of query and key is rotated"
        if m.q.rotary is not None:
            rotary_inv_freq(view, m)  # raises Mismatch, saying what differs
        return None

    def rewrite(self, view: GraphView, match: AttentionMatch) -> None:
        m = match
        inv_freq = rotary_inv_freq(view, m) if m.q.rotary is not None else None
        attrs = {"num_heads": m.q.heads, "kv_num_heads": m.k.heads, "scale": m.scale,
                 "do_rotary": int(inv_freq is not None)}
        inputs = [m.q.flat, m.k.flat, m.v.flat, *m.past, kv_cache.SEQLENS, kv_cache.TOTAL]
        if inv_freq is not None:
            inputs += [kv_cache.COS, kv_cache.SIN]
        view.remove([m.merge, *m.present_nodes])
        view.add_node("GroupQueryAttention", inputs, [m.out, *m.present], m.softmax, domain=MS, **attrs)
        in_place_interface(view, m, inv_freq)


def rotary_inv_freq(view: GraphView, m: AttentionMatch) -> np.ndarray:
    """The inverse frequencies of a RoPE whose angles are absolute positions x constants, checked to be
    what GroupQueryAttention computes: non-interleaved, full head size, positions past length + 0..S-1."""
    for rotary in (m.q.rotary, m.k.rotary):
        if attribute(rotary, "interleaved", 0) or attribute(rotary, "rotary_embedding_dim", 0):
            raise Mismatch("the rotary embedding is interleaved or partial")
    if m.q.rotary.input[2:4] != m.k.rotary.input[2:4]:
        raise Mismatch("query and key are rotated with different tables")
    cos = view.parent(m.q.rotary.input[2], ["Cos"], "the rotary cos table")
    freqs = view.parent(cos.input[0], ["Mul", "MatMul"], "the rotary angles")
    constants = [view.const(i) for i in freqs.input]
    if sum(c is not None for c in constants) != 1:
        raise Mismatch("the rotary angles are not positions times constant inverse frequencies")
    k = 0 if constants[0] is not None else 1
    inv_freq = np.ravel(constants[k]).astype(np.float32)
    if inv_freq.size * 2 != m.q.head_dim:
        raise Mismatch(f"{inv_freq.size} rotary frequencies for head size {m.q.head_dim}")
    if not absolute_positions(view, freqs.input[1 - k], m.past[0]):
        raise Mismatch("the rotary positions are not past length + 0..S-1")
    return inv_freq


def absolute_positions(view: GraphView, tensor: str, past_key: str) -> bool:
    """Unsqueeze(Range(0, S, 1) + past length, 1), the past length read off past_key's axis 2."""
    node = view.producer.get(tensor)
    if node is None or node.op_type != "Unsqueeze" or \
            (view.ints(node.input[1]) if len(node.input) > 1 else attribute(node, "axes")) != [1]:
        return False
    add = view.parent(node.input[0], ["Add"], "the rotary positions")
    kinds = {}
    for i in add.input:
        p = view.source(i)
        kinds[getattr(p, "op_type", None)] = p
    rng, gather = kinds.get("Range"), kinds.get("Gather")
    if rng is None or gather is None or view.ints(rng.input[0]) != [0] or view.ints(rng.input[2]) != [1]:
        return False
    shape = view.producer.get(gather.input[0])
    return shape is not None and shape.op_type == "Shape" and shape.input[0] == past_key \
        and view.ints(gather.input[1]) == [2]


def in_place_interface(view: GraphView, m: AttentionMatch, inv_freq: np.ndarray | None) -> None:
    """Graph inputs and outputs of the in-place convention, and the metadata a runtime builds tables from."""
    graph = view.graph
    for value in [*graph.input, *graph.output]:
        if value.name in (*m.past, *m.present):
            value.type.tensor_type.shape.dim[2].dim_param = "kv_capacity"
    names = {i.name for i in graph.input}
    new = [helper.make_tensor_value_info(kv_cache.SEQLENS, onnx.TensorProto.INT32, ["batch"]),
           helper.make_tensor_value_info(kv_cache.TOTAL, onnx.TensorProto.INT32, [])]
    if inv_freq is not None:
        elem = graph.input[[i.name for i in graph.input].index(m.past[0])].type.tensor_type.elem_type
        new += [helper.make_tensor_value_info(t, elem, ["positions", inv_freq.size])
                for t in (kv_cache.COS, kv_cache.SIN)]
    graph.input.extend(v for v in new if v.name not in names)
    props = {p.key: p for p in view.model.metadata_props}
    meta = {kv_cache.LAYOUT_KEY: kv_cache.IN_PLACE}
    if inv_freq is not None:
        meta[kv_cache.INV_FREQ_KEY] = json.dumps([float(f) for f in inv_freq])
    for key, value in meta.items():
        (props[key] if key in props else view.model.metadata_props.add(key=key)).value = value
