"""fuse_matmuls: MatMuls that read the same input with constant weights become one MatMul and a Split.

A decode step is memory-bound and runs one token: what it pays per MatMul is
the kernel launch, the thread-pool dispatch and a weight read too small to
keep every core streaming. Attention's q/k/v projections read the same normed
hidden state, and so do the MLP's gate and up: fused, a Llama layer runs 4
weight MatMuls instead of 7 (ONNX Runtime GenAI's builder does the same), and
a weight-only quantizer then makes 4 MatMulNBits of them. The weights are
concatenated along the output axis, so the result is the same numbers.

When a Split's outputs are exactly a GroupQueryAttention's query, key and
value (in that order), the Split goes too: GroupQueryAttention takes the
packed [B, S, (H + 2 KV) D] tensor itself (`pack_attention`).

The fused MatMul is named for the nodes it replaced
(`/self_attn/q_proj+k_proj+v_proj/MatMul`), so it stays in their block. Only
nodes inside the step's scope fuse, and a group fuses whole or not at all.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper
from pydantic import Field

from pipeline.core.errors import PipelineError
from pipeline.core.graph import cleanup, consumers, drop_unused_initializers, producers

from pipeline.core.onnx_io import copy_model

from .base import Params, Pass, PassContext, PassResult, op_counts


class FuseMatmulsParams(Params):
    pack_attention: bool = Field(True, description="Feed GroupQueryAttention the fused q/k/v output as its packed "
                                 "query input instead of splitting it.")
    expect_min_groups: int | None = Field(default=None, ge=0, description="Fail the step when fewer groups than "
                                          "this fuse (e.g. 2 per Llama layer: q/k/v and gate/up).")


class FuseMatmuls(Pass):
    name = "fuse_matmuls"
    Params = FuseMatmulsParams
    # The Split it writes takes the output sizes as an input, which opset 13 brought (an attribute before).
    min_opset = 13

    def apply(self, model: onnx.ModelProto, params: FuseMatmulsParams, ctx: PassContext) -> PassResult:
        out = copy_model(model)
        groups = _groups(out, ctx)
        placed, fused = set(), []
        for group in groups:
            matmul, split = _fuse(out, group)
            placed |= {matmul.name, split.name}
            fused.append({"nodes": [n.name for n in group], "into": matmul.name})
        packed = _pack_attention(out) if params.pack_attention else []
        if fused:
            cleanup(out)
            drop_unused_initializers(out)  # the weights that were concatenated
        if params.expect_min_groups is not None and len(fused) < params.expect_min_groups:
            raise PipelineError(f"fuse_matmuls on {ctx.graph_name!r}: expected at least {params.expect_min_groups} "
                                f"fused groups, got {len(fused)} (MatMuls sharing an input with constant 2-D "
                                f"weights, all in the step's scope)")
        return PassResult.of(ctx, out, changed=bool(fused), placed=placed, stats={
            "groups": fused, "packed_attention": packed,
            "matmuls_before": op_counts(model).get("MatMul", 0), "matmuls_after": op_counts(out).get("MatMul", 0)})


def _groups(model: onnx.ModelProto, ctx: PassContext) -> list[list[onnx.NodeProto]]:
    """In-scope MatMuls by shared input, each with a constant 2-D weight of one dtype, in the order a
    GroupQueryAttention reads them when it does (so its packed input is q, k, v)."""
    inits = {t.name: t for t in model.graph.initializer}
    by_input: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            by_input[n.input[0]].append(n)
    users = consumers(model.graph.node)
    groups = []
    for nodes in by_input.values():
        if len(nodes) < 2 or not all(ctx.in_scope(n) for n in nodes):
            continue
        if len({inits[n.input[1]].data_type for n in nodes}) != 1:
            continue
        nodes.sort(key=lambda n: _attention_slot(users, n.output[0]))
        groups.append(nodes)
    return groups


def _attention_slot(users, tensor: str) -> int:
    for u in users.get(tensor, []):
        if u.op_type == "GroupQueryAttention" and tensor in u.input[:3]:
            return list(u.input).index(tensor)
    return 3


def _fused_name(nodes: list[onnx.NodeProto]) -> str:
    """`/self_attn/q_proj/MatMul` + `/self_attn/k_proj/MatMul` -> `/self_attn/q_proj+k_proj/MatMul`."""
    parts = [n.name.split("/") for n in nodes]
    head = 0
    while all(len(p) > head + 1 and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 and p[-1 - tail] == parts[0][-1 - tail] for p in parts):
        tail += 1
    middle = "+".join("/".join(p[head:len(p) - tail]) for p in parts)
    return "/".join([*parts[0][:head], middle, *parts[0][len(parts[0]) - tail:]]) if tail else \
        "/".join([*parts[0][:head], middle, "MatMul"])


def _fuse(model: onnx.ModelProto, group: list[onnx.NodeProto]) -> tuple[onnx.NodeProto, onnx.NodeProto]:
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    weights = [numpy_helper.to_array(inits[n.input[1]]) for n in group]
    name = _fused_name(group)
    weight = numpy_helper.from_array(np.concatenate(weights, axis=1), f"{name}.weight")
    sizes = numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64), f"{name}.split")
    graph.initializer.extend([weight, sizes])
    fused_out = f"{name}_output_0"
    matmul = helper.make_node("MatMul", [group[0].input[0], weight.name], [fused_out], name=name)
    split = helper.make_node("Split", [fused_out, sizes.name], [n.output[0] for n in group],
                             name=name.rsplit("/", 1)[0] + "/Split", axis=-1)
    at = min(i for i, n in enumerate(graph.node) if n in group)
    gone = {n.output[0] for n in group}
    keep = [n for n in graph.node if n.output[0] not in gone]
    del graph.node[:]
    graph.node.extend(keep[:at] + [matmul, split] + keep[at:])
    return matmul, split


def _pack_attention(model: onnx.ModelProto) -> list[str]:
    """GroupQueryAttention(Split(x) -> q, k, v) -> GroupQueryAttention(x) with empty key and value."""
    graph = model.graph
    made = producers(graph.node)
    users = consumers(graph.node)
    packed = []
    for gqa in [n for n in graph.node if n.op_type == "GroupQueryAttention"]:
        split = made.get(gqa.input[0])
        if split is None or split.op_type != "Split" or list(split.output) != list(gqa.input[:3]):
            continue
        if any(len(users.get(t, [])) != 1 for t in split.output):
            continue
        gqa.input[0], gqa.input[1], gqa.input[2] = split.input[0], "", ""
        packed.append(gqa.name)
    return packed
