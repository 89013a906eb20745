"""ONNX Runtime's transformer fusions, after the rules: `optimize_model` for a `model_type` at opt_level 0
(fusions only, no generic ORT rewrites baked into the file): RMSNorm into SimplifiedLayerNormalization, the
residual Add + RMSNorm into SkipSimplifiedLayerNormalization, and whatever else of theirs matches. They must
run before onnxsim, whose rewrite of the RMSNorm arithmetic ORT's pattern no longer matches (the rules do
not mind); `unfused_norms` names the RMSNorms they left.
"""
from __future__ import annotations

import logging
from collections.abc import Collection

import onnx

from pipeline.core.errors import PipelineError, one_line
from pipeline.core.graph import producers
from pipeline.core.rewrite import GraphView, NoMatch, name_into_scope


def ort_fusions(model: onnx.ModelProto, model_type: str, num_heads: int, hidden_size: int, graph_name: str,
                fused_ops: Collection[str]) -> onnx.ModelProto:
    """The fused model; its new nodes of `fused_ops` named into the scope of the node whose output they make."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    producer = producers(model.graph.node)
    names = {n.name for n in model.graph.node}
    try:
        fused = optimizer.optimize_model(model, model_type=model_type, num_heads=num_heads, hidden_size=hidden_size,
                                         optimization_options=FusionOptions(model_type), opt_level=0)
    except Exception as e:  # ORT's fusion code raises assorted errors on graphs it does not know
        raise PipelineError(f"fuse_attention on {graph_name!r} failed: {one_line(e)}") from None
    out = fused.model
    taken = {n.name for n in out.graph.node}
    for n in out.graph.node:
        if n.op_type in fused_ops and n.name not in names:
            # ORT names them `SimplifiedLayerNormalization_0`: the node that made its output before says whose it is.
            anchor = producer.get(n.output[0])
            if anchor is not None:
                name_into_scope(n, anchor, taken)
    return out


def unfused_norms(model: onnx.ModelProto) -> list[NoMatch]:
    """ReduceMean(Pow(x, 2)) left after ORT's fusions is an RMSNorm its patterns did not take;
    one whose x is a residual Add is what SkipSimplifiedLayerNormalization would have taken."""
    view = GraphView(model)
    misses = []
    for n in model.graph.node:
        square = view.source(n.input[0]) if n.op_type == "ReduceMean" else None
        if square is not None and square.op_type == "Pow":
            residual = getattr(view.source(square.input[0]), "op_type", None) == "Add"
            misses.append(NoMatch("ONNX Runtime's fusion did not take this RMSNorm (onnxsim before fusion rewrites "
                                  "it past ORT's pattern)", n, "residual Add + RMSNorm" if residual else "RMSNorm"))
    return misses
