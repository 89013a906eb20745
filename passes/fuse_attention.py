"""fuse_attention: ONNX Runtime's transformer fusions, with declared expectations.

Runs onnxruntime.transformers' fusion engine (`optimize_model`, opt_level 0:
fusions only, no generic ORT rewrites baked into the file) for the given
`model_type`, which rewrites attention into MultiHeadAttention/Attention,
rotary into RotaryEmbedding and RMSNorm into (Skip)SimplifiedLayerNormalization
contrib ops where its patterns match. Stats count each fused op per block
(fused nodes are renamed into the block of the nodes they replaced).

`expect` declares how many of each fused op the graph must end up with, e.g.
`{MultiHeadAttention: 1, SimplifiedLayerNormalization: 1}` per layer graph: a
shortfall fails the step naming the block and the pattern that did not match,
instead of shipping a model that silently stayed unfused.

Known today: on the chattts_gpt exporter's layers ORT's patterns fuse both
RMSNorms (SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization) but
neither the attention nor the rotary embedding.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Literal

import onnx
from pydantic import Field

from pipeline.errors import PipelineError

from .base import Params, Pass, PassContext, PassResult, copy_model

FUSED_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "RotaryEmbedding",
             "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
             "SkipLayerNormalization", "Gelu", "FastGelu", "BiasGelu")


class FuseParams(Params):
    model_type: Literal["gpt2", "bert", "gpt_neox", "phi", "t5"] = "gpt2"
    num_heads: int = Field(default=0, ge=0)  # 0: let ORT infer from the graph
    hidden_size: int = Field(default=0, ge=0)
    expect: dict[str, int] = Field(default_factory=dict)  # fused op -> minimum count in the graph


class FuseAttention(Pass):
    name = "fuse_attention"
    Params = FuseParams
    scoped = False

    def apply(self, model: onnx.ModelProto, params: FuseParams, ctx: PassContext) -> PassResult:
        from onnxruntime.transformers import optimizer
        from onnxruntime.transformers.fusion_options import FusionOptions

        unknown = sorted(set(params.expect) - set(FUSED_OPS))
        if unknown:
            raise PipelineError(f"fuse_attention: expect names unknown fused ops {unknown} (known: {', '.join(FUSED_OPS)})")
        logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
        try:
            fused = optimizer.optimize_model(copy_model(model), model_type=params.model_type,
                                             num_heads=params.num_heads, hidden_size=params.hidden_size,
                                             optimization_options=FusionOptions(params.model_type), opt_level=0)
        except Exception as e:  # ORT's fusion code raises assorted errors on graphs it does not know
            raise PipelineError(f"fuse_attention on {ctx.graph_name!r} failed: {' '.join(str(e).split())[:300]}") from None
        out = fused.model
        # ORT's fusion writes com.microsoft nodes without always declaring the domain.
        declared = {o.domain for o in out.opset_import}
        for domain in sorted({n.domain for n in out.graph.node if n.domain} - declared):
            out.opset_import.add(domain=domain, version=1)
        counts = Counter(n.op_type for n in out.graph.node if n.op_type in FUSED_OPS)
        before = Counter(n.op_type for n in model.graph.node if n.op_type in FUSED_OPS)
        new = counts - before
        short = {op: (n, counts.get(op, 0)) for op, n in params.expect.items() if counts.get(op, 0) < n}
        if short:
            detail = "; ".join(f"{op}: expected {n}, found {got}" for op, (n, got) in short.items())
            raise PipelineError(f"fuse_attention on graph {ctx.graph_name!r}: pattern not matched ({detail}); "
                                f"fused: {dict(new) or 'nothing'}")
        per_block: dict[str, dict[str, int]] = {}
        producers = {o: n.name for n in model.graph.node for o in n.output}
        for n in out.graph.node:
            if n.op_type in FUSED_OPS and n.name not in ctx.blocks.node_block:
                # A fused node replaced nodes of one block: the producer of its last output says which.
                block = ctx.blocks.node_block.get(producers.get(n.output[0], ""), "(new)")
                per_block.setdefault(block, Counter())[n.op_type] += 1
        return PassResult(out, changed=bool(new), stats={"fused": dict(new), "nodes_before": len(model.graph.node),
                                                          "nodes_after": len(out.graph.node),
                                                          "fused_per_block": {b: dict(c) for b, c in per_block.items()}})
