"""fuse_attention: rotary attention and RMSNorm into ONNX Runtime's contrib ops, with declared expectations.

Fused graphs run fewer, bigger kernels: a ChatTTS layer goes from 176 nodes to 34 (14 with `kv_cache:
in_place`), same inputs, outputs and results. The rules of passes/attention_rules run first (RoPE ->
RotaryEmbedding, attention -> MultiHeadAttention, or GroupQueryAttention over an in-place cache, where every
attention must match: a half-converted graph would mix cache conventions), then ONNX Runtime's fusions
(RMSNorm -> SimplifiedLayerNormalization, ...). Fused nodes are named into the scope, so the block, of the
nodes they replaced. `expect` makes a shortfall fail, naming graph, block, node and why the pattern did not
match, instead of shipping a model that silently stayed unfused.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Literal

import onnx
from pydantic import Field

from pipeline.core import kv_cache
from pipeline.core.blocks import block_of
from pipeline.core.errors import PipelineError
from pipeline.core.graph import declare_domains
from pipeline.core.recipe import user_pattern
from pipeline.core.rewrite import GraphView, NoMatch, apply_rules

from .attention_rules import MS, attention_rules, ort_fusions, unfused_norms
from pipeline.core.onnx_io import copy_model

from .base import Params, Pass, PassContext, PassResult

ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention")
FUSED_OPS = (*ATTENTION_OPS, "RotaryEmbedding",
             "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
             "SkipLayerNormalization", "Gelu", "FastGelu", "BiasGelu")
# What a shortfall of each op names as the pattern that did not match (the rules' and unfused_norms' `pattern`).
PATTERN = {**{op: "attention" for op in ATTENTION_OPS}, "RotaryEmbedding": "rotary embedding",
           "SimplifiedLayerNormalization": "RMSNorm", "SkipSimplifiedLayerNormalization": "residual Add + RMSNorm",
           "LayerNormalization": "LayerNorm", "SkipLayerNormalization": "residual Add + LayerNorm"}


class FuseParams(Params):
    model_type: Literal["gpt2", "bert", "gpt_neox", "phi", "t5"] = Field(
        "gpt2", description="Model type of ONNX Runtime's transformer fusions (`optimize_model`), run after "
                            "the structural matcher.")
    num_heads: int = Field(default=0, ge=0, description="Attention heads; 0: read from the graph (structural "
                           "matcher) and let ONNX Runtime infer them.")
    hidden_size: int = Field(default=0, ge=0, description="Hidden size for ONNX Runtime's fusions; 0: let it "
                             "infer it.")
    rotary_attention: bool = Field(True, description="Run the structural matcher: RoPE into RotaryEmbedding, "
                                   "attention into MultiHeadAttention.")
    expect: dict[str, int] = Field(default_factory=dict, description="Fused op -> minimum count in the graph "
                                   "(e.g. `{MultiHeadAttention: 1}`); a shortfall fails naming block and pattern.")
    kv_cache: Literal["concat", "in_place"] = Field(
        "concat", description="`concat`: MultiHeadAttention, present = past ++ new (a new cache each call); "
                              "`in_place`: GroupQueryAttention over one preallocated past/present buffer, rotary "
                              "inside it from cos/sin tables given once per generation (pipeline/core/kv_cache.py). "
                              "Every attention of the graph must match.")


class FuseAttention(Pass):
    name = "fuse_attention"
    Params = FuseParams
    scoped = False

    def apply(self, model: onnx.ModelProto, params: FuseParams, ctx: PassContext) -> PassResult:
        unknown = sorted(set(params.expect) - set(FUSED_OPS))
        if unknown:
            raise PipelineError(f"fuse_attention: expect names unknown fused ops {unknown} "
                                f"(known: {', '.join(FUSED_OPS)})")
        in_place = params.kv_cache == kv_cache.IN_PLACE
        if in_place and not params.rotary_attention:
            raise PipelineError("fuse_attention: kv_cache 'in_place' needs the structural matcher "
                                "(rotary_attention: true)")
        out, misses = copy_model(model), []
        if params.rotary_attention:
            misses = apply_rules(GraphView(out, "fuse_attention"), attention_rules(params.num_heads, in_place))
            if any(n.domain == MS for n in out.graph.node) and MS not in {o.domain for o in out.opset_import}:
                out.opset_import.add(domain=MS, version=1)  # the rules' ops, declared before ORT's fusions
            if in_place:
                _require_all_attention(misses, ctx)
        out = ort_fusions(out, params.model_type, params.num_heads, params.hidden_size, ctx.graph_name, FUSED_OPS)
        misses += unfused_norms(out)
        declare_domains(out)
        before = {n.name for n in model.graph.node}
        fused = [n for n in out.graph.node if n.op_type in FUSED_OPS and n.name not in before]
        counts = Counter(n.op_type for n in out.graph.node if n.op_type in FUSED_OPS)
        _check_expect(params.expect, counts, misses, ctx)
        per_block: dict[str, Counter] = defaultdict(Counter)
        patterns = _block_patterns(ctx)
        for n in fused:
            per_block[block_of(n, ctx.blocks.spec, patterns)][n.op_type] += 1
        return PassResult.of(ctx, out, changed=bool(fused), placed={n.name for n in fused}, stats={
            "fused": dict(Counter(n.op_type for n in fused)), "nodes_before": len(model.graph.node),
            "nodes_after": len(out.graph.node), "fused_per_block": {b: dict(c) for b, c in per_block.items()}})


# --- expectations: where a pattern did not match ----------------------------------------------------------

def _check_expect(expect: dict[str, int], counts: Counter, misses: list[NoMatch], ctx: PassContext) -> None:
    problems = [_shortfall(op, n, counts.get(op, 0), misses, ctx) for op, n in expect.items() if counts.get(op, 0) < n]
    if problems:
        raise PipelineError("fuse_attention: " + "; ".join(problems))


def _shortfall(op: str, want: int, got: int, misses: list[NoMatch], ctx: PassContext) -> str:
    pattern = PATTERN.get(op, "ONNX Runtime's " + op)
    mine = [m for m in misses if m.pattern == pattern]
    if not mine:
        return f"{ctx.graph_name}: expected {want} {op}, found {got}: no further {pattern} pattern in the graph"
    first = mine[0]
    more = f" (and {len(mine) - 1} more)" if len(mine) > 1 else ""
    return (f"{ctx.graph_name}: expected {want} {op} in {_block(first, ctx)}, found {got}: {pattern} pattern did "
            f"not match at {first.node.name or first.node.op_type}: {first.reason}{more}")


def _require_all_attention(misses: list[NoMatch], ctx: PassContext) -> None:
    """In-place caching is all or nothing per graph: an unfused attention would still concat its cache."""
    missed = [m for m in misses if m.pattern == "attention"]
    if missed:
        first = missed[0]
        raise PipelineError(f"fuse_attention: kv_cache 'in_place' on {ctx.graph_name!r}: its attention did not "
                            f"match in {_block(first, ctx)} at {first.node.name or 'Softmax'}: {first.reason}")


def _block(miss: NoMatch, ctx: PassContext) -> str:
    return ctx.blocks.node_block.get(miss.node.name) or block_of(miss.node, ctx.blocks.spec, _block_patterns(ctx))


def _block_patterns(ctx: PassContext) -> list[re.Pattern]:
    return [user_pattern(p) for p in ctx.blocks.spec.patterns] if ctx.blocks.spec else []
