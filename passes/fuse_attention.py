"""fuse_attention: rotary attention and RMSNorm into ONNX Runtime's contrib ops, with declared expectations.

Fused graphs run fewer, bigger kernels: a ChatTTS layer goes from 176 nodes to
34 with the same inputs, outputs and results (SQNR > 140 dB against the
unfused layer, prefill and decode). Two fusers run in turn:

1. A structural matcher written here. It matches op structure, never node
   names: ONNX Runtime's transformer fusions (every model_type) and
   onnxscript's ort_fusions (0.7, written for dynamo exports with static
   shapes) both match neither the attention nor the rotary of a layer written
   out with explicit past/present KV tensors (measured with onnxruntime 1.31).
   - Rotary embedding: `x * cos + rotate_half(x) * sin`, the tables being
     `cos/sin(cat(freqs, freqs))` and rotate_half slicing at a constant
     head_size / 2 (the chattts_gpt exporter slices at a Python int for this),
     becomes com.microsoft.RotaryEmbedding. Its cos/sin caches are
     `cos/sin(freqs)` of the current positions only, with position_ids [0]:
     the same arithmetic as the unfused graph, and no maximum sequence length
     baked into the file.
   - Attention: the Q/K/V head splits (Reshape + Transpose, RotaryEmbedding on
     Q and K), the past concat along the sequence, the scaled `Q K^T`, an
     optional causal mask (`Where(key_pos > query_pos, fill, scores)`, the
     positions from Range), Softmax over the last axis and the product with V
     merged back to [B, S, hidden] becomes one com.microsoft.MultiHeadAttention:
     `unidirectional` for the causal mask (ORT 1.31's CPU kernel offsets it by
     the past length: checked for prefill, decode and multi-token steps on a
     cache). MHA takes past_key/past_value and returns present_key/
     present_value in [B, H, S, D], so the graph keeps its inputs and outputs;
     RotaryEmbedding moves in front of the head split (it takes [B, S, hidden]
     too). A mask of another shape (additive, sliding window, not causal) is
     left unfused, and said so, rather than guessed.
2. ONNX Runtime's transformer fusions (`optimize_model` for `model_type`,
   opt_level 0: fusions only, no generic ORT rewrites baked into the file):
   RMSNorm into SimplifiedLayerNormalization, the residual Add + RMSNorm into
   SkipSimplifiedLayerNormalization, and whatever else of theirs matches. Run
   it before onnxsim, whose rewrite of the RMSNorm arithmetic ORT's pattern no
   longer matches (the structural matcher does not mind).

`kv_cache: in_place` makes the attention com.microsoft.GroupQueryAttention
instead, over one preallocated buffer that is both past and present (the
convention is pipeline/core/kv_cache.py's): a decode step writes its new positions
into the cache instead of copying all of it into a new present (at full
ChatTTS size, 128 cached tokens, about 34 MB of traffic a step). The rotary
moves inside the op (do_rotary), from cos/sin tables that become graph inputs:
the inverse frequencies are read off the graph (angles = (past length +
0..S-1) x constants, checked) and stored in its metadata, so a runtime builds
the tables once per generation and every layer's position and angle
arithmetic goes away (176 -> 14 nodes a ChatTTS layer). Every attention of the
graph must match, or the step fails naming the layer and why: a half-converted
graph would mix conventions. ONNX Runtime's kernel takes a multi-token step on
a cache at batch 1 only (prefill and one-token decode at any batch).

Every fused node is named into the scope of the nodes it replaced
(`/self_attn/MultiHeadAttention`, `/post_attention_layernorm/Skip...`), so it
stays in their block; stats count each fused op per block.

`expect` declares how many of each fused op the graph must end up with, e.g.
`{MultiHeadAttention: 1, RotaryEmbedding: 2}` per layer graph: a shortfall
fails the step naming the graph, the block and the node where the pattern did
not match and why, instead of shipping a model that silently stayed unfused.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper
from pydantic import Field

from pipeline.core import kv_cache
from pipeline.core.blocks import block_of
from pipeline.core.errors import PipelineError, one_line
from pipeline.core.graph import cleanup, consumers, producers, toposort
from pipeline.core.recipe import user_pattern

from .base import Params, Pass, PassContext, PassResult, copy_model

IN_PLACE = kv_cache.IN_PLACE

MS = "com.microsoft"
ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention")
FUSED_OPS = (*ATTENTION_OPS, "RotaryEmbedding",
             "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
             "SkipLayerNormalization", "Gelu", "FastGelu", "BiasGelu")
# What a shortfall of each op names as the pattern that did not match.
PATTERN = {**{op: "attention" for op in ATTENTION_OPS}, "RotaryEmbedding": "rotary embedding",
           "SimplifiedLayerNormalization": "RMSNorm", "SkipSimplifiedLayerNormalization": "residual Add + RMSNorm",
           "LayerNormalization": "LayerNorm", "SkipLayerNormalization": "residual Add + LayerNorm"}
BNSH_TO_BSNH = [0, 2, 1, 3]  # the head split's (and merge's) Transpose
START_POSITION = "fuse_attention_position_zero"


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


@dataclass
class Miss:
    """A candidate where a pattern was looked for and did not match."""

    pattern: str  # one of PATTERN's values: "attention", "rotary embedding", ...
    node: onnx.NodeProto
    reason: str


class NoMatch(Exception):
    """Raised by a matcher: the message says what differed from the pattern."""


class FuseAttention(Pass):
    name = "fuse_attention"
    Params = FuseParams
    scoped = False

    def apply(self, model: onnx.ModelProto, params: FuseParams, ctx: PassContext) -> PassResult:
        unknown = sorted(set(params.expect) - set(FUSED_OPS))
        if unknown:
            raise PipelineError(f"fuse_attention: expect names unknown fused ops {unknown} "
                                f"(known: {', '.join(FUSED_OPS)})")
        out, misses = copy_model(model), []
        if params.kv_cache == IN_PLACE and not params.rotary_attention:
            raise PipelineError("fuse_attention: kv_cache 'in_place' needs the structural matcher "
                                "(rotary_attention: true)")
        if params.rotary_attention:
            misses = fuse_rotary_attention(out, params.num_heads, in_place=params.kv_cache == IN_PLACE)
            if params.kv_cache == IN_PLACE:
                _require_all_attention(misses, ctx)
        out = _ort_fusions(out, params, ctx)
        misses += _unfused_norms(out)
        _declare_domains(out)
        before = {n.name for n in model.graph.node}
        fused = [n for n in out.graph.node if n.op_type in FUSED_OPS and n.name not in before]
        counts = Counter(n.op_type for n in out.graph.node if n.op_type in FUSED_OPS)
        _check_expect(params.expect, counts, misses, ctx)
        per_block: dict[str, Counter] = defaultdict(Counter)
        patterns = _block_patterns(ctx)
        for n in fused:
            per_block[block_of(n, ctx.blocks.spec, patterns)][n.op_type] += 1
        return PassResult(out, changed=bool(fused), placed={n.name for n in fused}, stats={
            "fused": dict(Counter(n.op_type for n in fused)), "nodes_before": len(model.graph.node),
            "nodes_after": len(out.graph.node), "fused_per_block": {b: dict(c) for b, c in per_block.items()}})


# --- expectations -----------------------------------------------------------------------------------------

def _check_expect(expect: dict[str, int], counts: Counter, misses: list[Miss], ctx: PassContext) -> None:
    problems = [_shortfall(op, n, counts.get(op, 0), misses, ctx) for op, n in expect.items() if counts.get(op, 0) < n]
    if problems:
        raise PipelineError("fuse_attention: " + "; ".join(problems))


def _shortfall(op: str, want: int, got: int, misses: list[Miss], ctx: PassContext) -> str:
    pattern = PATTERN.get(op, "ONNX Runtime's " + op)
    mine = [m for m in misses if m.pattern == pattern]
    if not mine:
        return f"{ctx.graph_name}: expected {want} {op}, found {got}: no further {pattern} pattern in the graph"
    first = mine[0]
    block = ctx.blocks.node_block.get(first.node.name) or block_of(first.node, ctx.blocks.spec, _block_patterns(ctx))
    more = f" (and {len(mine) - 1} more)" if len(mine) > 1 else ""
    return (f"{ctx.graph_name}: expected {want} {op} in {block}, found {got}: {pattern} pattern did not match "
            f"at {first.node.name or first.node.op_type}: {first.reason}{more}")


def _block_patterns(ctx: PassContext) -> list[re.Pattern]:
    return [user_pattern(p) for p in ctx.blocks.spec.patterns] if ctx.blocks.spec else []


def _unfused_norms(model: onnx.ModelProto) -> list[Miss]:
    """ReduceMean(Pow(x, 2)) left after ORT's fusions is an RMSNorm its patterns did not take;
    one whose x is a residual Add is what SkipSimplifiedLayerNormalization would have taken."""
    producer = producers(model.graph.node)

    def source(tensor: str) -> onnx.NodeProto | None:
        node = producer.get(tensor)
        while node is not None and node.op_type == "Cast":
            node = producer.get(node.input[0])
        return node

    misses = []
    for n in model.graph.node:
        square = source(n.input[0]) if n.op_type == "ReduceMean" else None
        if square is not None and square.op_type == "Pow":
            residual = getattr(source(square.input[0]), "op_type", None) == "Add"
            pattern = "residual Add + RMSNorm" if residual else "RMSNorm"
            misses.append(Miss(pattern, n, "ONNX Runtime's fusion did not take this RMSNorm "
                                           "(onnxsim before fusion rewrites it past ORT's pattern)"))
    return misses


# --- ONNX Runtime's fusions -------------------------------------------------------------------------------

def _ort_fusions(model: onnx.ModelProto, params: FuseParams, ctx: PassContext) -> onnx.ModelProto:
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    producer = producers(model.graph.node)
    names = {n.name for n in model.graph.node}
    try:
        fused = optimizer.optimize_model(model, model_type=params.model_type, num_heads=params.num_heads,
                                         hidden_size=params.hidden_size,
                                         optimization_options=FusionOptions(params.model_type), opt_level=0)
    except Exception as e:  # ORT's fusion code raises assorted errors on graphs it does not know
        raise PipelineError(f"fuse_attention on {ctx.graph_name!r} failed: {one_line(e)}") from None
    out = fused.model
    taken = {n.name for n in out.graph.node}
    for n in out.graph.node:
        if n.op_type in FUSED_OPS and n.name not in names:
            # ORT names them `SimplifiedLayerNormalization_0`: the node that made its output before says whose it is.
            anchor = producer.get(n.output[0])
            if anchor is not None:
                _adopt(n, anchor, taken)
    return out


def _declare_domains(model: onnx.ModelProto) -> None:
    # Fusions write com.microsoft nodes without always declaring the domain.
    declared = {o.domain for o in model.opset_import}
    for domain in sorted({n.domain for n in model.graph.node if n.domain} - declared):
        model.opset_import.add(domain=domain, version=1)


def _adopt(node: onnx.NodeProto, anchor: onnx.NodeProto, taken: set[str]) -> None:
    """Name `node` into the scope (and `namespace` metadata) of the node it replaced."""
    scope = anchor.name.rsplit("/", 1)[0] + "/" if "/" in anchor.name else ""
    name, i = scope + node.op_type, 1
    while name in taken:
        name, i = f"{scope}{node.op_type}_{i}", i + 1
    taken.discard(node.name)
    taken.add(name)
    node.name = name
    for prop in anchor.metadata_props:
        if prop.key == "namespace":
            node.metadata_props.add(key="namespace", value=prop.value)


# --- our structural matcher -------------------------------------------------------------------------------

class Graph:
    """Producer, consumer and constant lookups over one graph, and the edits a fusion makes."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.inputs = {i.name for i in self.graph.input}
        self.refresh()

    def refresh(self) -> None:
        self.producer = producers(self.graph.node)
        self.consumers = consumers(self.graph.node)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.names = {n.name for n in self.graph.node}
        self.reserved: set[str] = set()

    def const(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            attr = node.attribute[0]
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
            return np.array(helper.get_attribute_value(attr)) if attr.name.startswith("value_") else None
        if node is not None and node.op_type == "Identity":
            return self.const(node.input[0])
        return None

    def ints(self, name: str) -> list[int] | None:
        value = self.const(name)
        return None if value is None else [int(v) for v in np.ravel(value)]

    def parent(self, tensor: str, ops: Iterable[str], what: str) -> onnx.NodeProto:
        """The producer of `tensor` past any Casts, which must be one of `ops`."""
        node = self.producer.get(tensor)
        while node is not None and node.op_type == "Cast":
            node = self.producer.get(node.input[0])
        if node is None or node.op_type not in ops:
            found = node.op_type if node is not None else "a graph input or initializer"
            raise NoMatch(f"{what} is {found}, not {'/'.join(ops)}")
        return node

    def child(self, tensor: str, op: str, what: str) -> onnx.NodeProto:
        """The one consumer of `tensor` past any Casts, which must be `op`."""
        users = self.consumers.get(tensor, [])
        while len(users) == 1 and users[0].op_type == "Cast":
            users = self.consumers.get(users[0].output[0], [])
        if len(users) != 1 or users[0].op_type != op:
            raise NoMatch(f"{what} feeds {', '.join(u.op_type for u in users) or 'nothing'}, not one {op}")
        return users[0]

    def node(self, op: str, inputs: list[str], outputs: list[str], anchor: onnx.NodeProto, domain: str = "",
             **attrs) -> onnx.NodeProto:
        node = helper.make_node(op, inputs, outputs, domain=domain or None, **attrs)
        _adopt(node, anchor, self.names)
        self.graph.node.append(node)
        return node

    def fresh(self, base: str) -> str:
        """A tensor name no node or initializer uses yet."""
        used = set(self.producer) | set(self.initializers) | self.inputs | self.reserved
        name, i = base, 1
        while name in used:
            name, i = f"{base}_{i}", i + 1
        self.reserved.add(name)
        return name

    def remove(self, nodes: Iterable[onnx.NodeProto]) -> None:
        # Node protos are copied in and out of the graph, so they are told apart by their first output.
        gone = {n.output[0] for n in nodes}
        keep = [n for n in self.graph.node if not n.output or n.output[0] not in gone]
        del self.graph.node[:]
        self.graph.node.extend(keep)

    def finish(self) -> None:
        """Restore topological order (new nodes were appended), then drop nodes nothing reads any more.

        The toolkit's own sort, not onnx-graphsurgeon's: nodes keep their order wherever the edges allow,
        so the fused graph's bytes stay what they were; onnx-graphsurgeon decides what is dead."""
        ordered = toposort(self.graph.node, what="fuse_attention (a bug in the matcher)")
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        cleanup(self.model)
        self.refresh()


def fuse_rotary_attention(model: onnx.ModelProto, num_heads: int = 0, in_place: bool = False) -> list[Miss]:
    """Fuse in place: RoPE first (attention then finds RotaryEmbedding on Q and K), then attention
    (GroupQueryAttention over a shared KV buffer when `in_place`). Returns the candidates that did not match."""
    g = Graph(model)
    misses = _fuse_rotary(g)
    g.finish()
    misses += _fuse_attention(g, num_heads, in_place)
    g.finish()
    if any(n.domain == MS for n in g.graph.node) and MS not in {o.domain for o in model.opset_import}:
        model.opset_import.add(domain=MS, version=1)
    return misses


# Rotary embedding ---------------------------------------------------------------------------------------

@dataclass
class Rope:
    x: str  # the tensor rotated, heads split: [B, H, S, D]
    freqs: str  # positions x inverse frequencies, [S, D/2]; the tables are cos/sin(cat(freqs, freqs))
    table_type: int | None  # the dtype the tables are cast to, if they are
    out: str
    anchor: onnx.NodeProto  # the final Add


def _fuse_rotary(g: Graph) -> list[Miss]:
    misses, tables = [], {}
    for concat in [n for n in g.graph.node if n.op_type == "Concat" and _is_rotate_half_candidate(g, n)]:
        users = g.consumers.get(concat.output[0], [])
        add = next((a for m in users if m.op_type == "Mul" for a in g.consumers.get(m.output[0], [])
                    if a.op_type == "Add"), None)
        try:
            if add is None:
                raise NoMatch("rotate_half(x) * sin is not added to x * cos")
            rope = _match_rope(g, add)
        except NoMatch as e:
            misses.append(Miss("rotary embedding", concat, str(e)))
            continue
        if rope.freqs not in tables:
            tables[rope.freqs] = _rope_tables(g, rope)
        cos, sin = tables[rope.freqs]
        g.remove([add])
        g.node("RotaryEmbedding", [rope.x, _start_position(g), cos, sin], [rope.out], rope.anchor, domain=MS)
    return misses


def _is_rotate_half_candidate(g: Graph, concat: onnx.NodeProto) -> bool:
    kinds = [getattr(g.producer.get(i), "op_type", None) for i in concat.input]
    return kinds == ["Neg", "Slice"]


def _match_rope(g: Graph, add: onnx.NodeProto) -> Rope:
    a, b = (g.producer.get(i) for i in add.input)
    if a is None or b is None or a.op_type != "Mul" or b.op_type != "Mul":
        raise NoMatch("the RoPE sum is not Add(Mul, Mul)")
    error = None
    for cos_term, sin_term in ((a, b), (b, a)):
        try:
            return _rope_from(g, add, cos_term, sin_term)
        except NoMatch as e:
            error = error or e
    raise error


def _rope_from(g: Graph, add: onnx.NodeProto, cos_term: onnx.NodeProto, sin_term: onnx.NodeProto) -> Rope:
    rotated = next((i for i in sin_term.input if getattr(g.producer.get(i), "op_type", None) == "Concat"), None)
    if rotated is None:
        raise NoMatch("no rotate_half Concat in the RoPE sum")
    x, half = _rotate_half(g, g.producer[rotated])
    if x not in cos_term.input:
        raise NoMatch("x * cos and rotate_half(x) * sin rotate different tensors")
    cos_freqs, table_type = _table(g, _other(cos_term.input, x), "Cos")
    sin_freqs, _ = _table(g, _other(sin_term.input, rotated), "Sin")
    if cos_freqs != sin_freqs:
        raise NoMatch("cos and sin come from different angles")
    _, head_dim = _head_split(g, x, "the rotated tensor")
    if 2 * half != head_dim:
        raise NoMatch(f"rotate_half splits at {half}, not at head_size / 2 = {head_dim // 2} (partial rotary)")
    return Rope(x, cos_freqs, table_type, add.output[0], add)


def _other(pair, one: str) -> str:
    return pair[1] if pair[0] == one else pair[0]


def _rotate_half(g: Graph, concat: onnx.NodeProto) -> tuple[str, int]:
    """Concat(Neg(x[..., half:]), x[..., :half], axis=-1) -> (x, half)."""
    if _attr(concat, "axis") not in (-1, 3):
        raise NoMatch("rotate_half's Concat is not on the last axis")
    neg, low = (g.producer[i] for i in concat.input)
    high = g.parent(neg.input[0], ["Slice"], "rotate_half's negated half")
    if high.input[0] != low.input[0]:
        raise NoMatch("rotate_half's halves come from different tensors")
    hs, he = _slice(g, high)
    ls, le = _slice(g, low)
    if ls != 0 or hs != le or he < 2 * hs:
        raise NoMatch(f"rotate_half does not split at one constant point (slices {ls}:{le} and {hs}:{he})")
    return low.input[0], hs


def _slice(g: Graph, node: onnx.NodeProto) -> tuple[int, int]:
    """(start, end) of a Slice on the last axis with step 1 and constant bounds."""
    args = [g.ints(i) if i else None for i in list(node.input[1:]) + [""] * (5 - len(node.input))]
    starts, ends, axes, steps = args[:4]
    if starts is None or ends is None or len(starts) != 1:
        raise NoMatch("rotate_half's slice bounds are not constants")
    if axes not in ([-1], [3]) or steps not in (None, [1]):
        raise NoMatch("rotate_half does not slice the last axis with step 1")
    return starts[0], ends[0]


def _table(g: Graph, tensor: str, op: str) -> tuple[str, int | None]:
    """cos/sin(cat(freqs, freqs)), maybe cast -> (freqs, the dtype cast to)."""
    node, cast_to = g.producer.get(tensor), None
    while node is not None and node.op_type == "Cast":
        cast_to = cast_to if cast_to is not None else _attr(node, "to")
        node = g.producer.get(node.input[0])
    if node is None or node.op_type != op:
        raise NoMatch(f"the {op.lower()} table is {getattr(node, 'op_type', 'an input')}, not {op}(angles)")
    cat = g.producer.get(node.input[0])
    if cat is None or cat.op_type != "Concat" or len(cat.input) != 2 or cat.input[0] != cat.input[1] \
            or _attr(cat, "axis") not in (-1, 1):
        raise NoMatch(f"the {op.lower()} angles are not cat(freqs, freqs) on the last axis")
    return cat.input[0], cast_to


def _rope_tables(g: Graph, rope: Rope) -> tuple[str, str]:
    """cos/sin caches of the current positions only, [S, D/2]: with position_ids [0] they line up with x."""
    tables = []
    for op in ("Cos", "Sin"):
        out = g.fresh(f"{rope.freqs}_{op.lower()}_cache")
        g.node(op, [rope.freqs], [out], rope.anchor)
        if rope.table_type is not None:
            cast = g.fresh(out + "_cast")
            g.node("Cast", [out], [cast], rope.anchor, to=rope.table_type)
            out = cast
        tables.append(out)
    return tables[0], tables[1]


def _start_position(g: Graph) -> str:
    if START_POSITION not in g.initializers:
        t = numpy_helper.from_array(np.zeros(1, np.int64), START_POSITION)
        g.graph.initializer.append(t)
        g.initializers[START_POSITION] = t
    return START_POSITION


# Attention ----------------------------------------------------------------------------------------------

@dataclass
class Heads:
    flat: str  # [B, S, H * D], before the head split
    heads: int
    head_dim: int
    rotary: onnx.NodeProto | None = None  # a RotaryEmbedding on the split heads, to re-apply on `flat`


@dataclass
class AttentionMatch:
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


def _fuse_attention(g: Graph, num_heads: int, in_place: bool = False) -> list[Miss]:
    misses = []
    for softmax in [n for n in g.graph.node if n.op_type == "Softmax"]:
        try:
            m = _match_attention(g, softmax, num_heads)
            if in_place:
                _group_query_attention(g, m, softmax)
                continue
        except NoMatch as e:
            misses.append(Miss("attention", softmax, str(e)))
            continue
        g.remove([m.merge, *m.present_nodes])
        query, key = _with_rotary(g, m.q), _with_rotary(g, m.k)
        inputs = [query, key, m.v.flat, "", "", "", *(m.past or ())]
        attrs = {"num_heads": m.q.heads, "unidirectional": int(m.causal), "scale": m.scale}
        if m.causal and m.fill is not None and np.isfinite(m.fill):
            attrs["mask_filter_value"] = m.fill
        outputs = [m.out, *(m.present or ())]
        g.node("MultiHeadAttention", inputs[:len(inputs) if m.past else 3], outputs, softmax, domain=MS, **attrs)
    return misses


def _group_query_attention(g: Graph, m: AttentionMatch, softmax: onnx.NodeProto) -> None:
    """The matched attention as GroupQueryAttention over a shared past/present buffer (pipeline/core/kv_cache.py).

    Its rotary moves inside the op (do_rotary, from cos/sin tables that are graph inputs), so the per-layer
    position and angle arithmetic goes dead; the graph's inputs change to the in-place convention."""
    if m.past is None:
        raise NoMatch("the attention has no past key/value graph inputs: no cache to keep in place")
    if not m.causal:
        raise NoMatch("the attention is not causally masked; GroupQueryAttention's cache attention is causal")
    if (m.q.rotary is None) != (m.k.rotary is None):
        raise NoMatch("only one of query and key is rotated")
    inv_freq = _rotary_inv_freq(g, m) if m.q.rotary is not None else None
    attrs = {"num_heads": m.q.heads, "kv_num_heads": m.k.heads, "scale": m.scale,
             "do_rotary": int(inv_freq is not None)}
    inputs = [m.q.flat, m.k.flat, m.v.flat, *m.past, kv_cache.SEQLENS, kv_cache.TOTAL]
    if inv_freq is not None:
        inputs += [kv_cache.COS, kv_cache.SIN]
    g.remove([m.merge, *m.present_nodes])
    g.node("GroupQueryAttention", inputs, [m.out, *m.present], softmax, domain=MS, **attrs)
    _in_place_interface(g, m, inv_freq)


def _rotary_inv_freq(g: Graph, m: AttentionMatch) -> np.ndarray:
    """The inverse frequencies of a RoPE whose angles are absolute positions x constants, checked to be
    what GroupQueryAttention computes: non-interleaved, full head size, positions past length + 0..S-1."""
    for rotary in (m.q.rotary, m.k.rotary):
        if _attr(rotary, "interleaved", 0) or _attr(rotary, "rotary_embedding_dim", 0):
            raise NoMatch("the rotary embedding is interleaved or partial")
    if m.q.rotary.input[2:4] != m.k.rotary.input[2:4]:
        raise NoMatch("query and key are rotated with different tables")
    cos = g.parent(m.q.rotary.input[2], ["Cos"], "the rotary cos table")
    freqs = g.parent(cos.input[0], ["Mul", "MatMul"], "the rotary angles")
    constants = [g.const(i) for i in freqs.input]
    if sum(c is not None for c in constants) != 1:
        raise NoMatch("the rotary angles are not positions times constant inverse frequencies")
    k = 0 if constants[0] is not None else 1
    inv_freq = np.ravel(constants[k]).astype(np.float32)
    if inv_freq.size * 2 != m.q.head_dim:
        raise NoMatch(f"{inv_freq.size} rotary frequencies for head size {m.q.head_dim}")
    if not _absolute_positions(g, freqs.input[1 - k], m.past[0]):
        raise NoMatch("the rotary positions are not past length + 0..S-1")
    return inv_freq


def _absolute_positions(g: Graph, tensor: str, past_key: str) -> bool:
    """Unsqueeze(Range(0, S, 1) + past length, 1), the past length read off past_key's axis 2."""
    node = g.producer.get(tensor)
    if node is None or node.op_type != "Unsqueeze" or \
            (g.ints(node.input[1]) if len(node.input) > 1 else _attr(node, "axes")) != [1]:
        return False
    add = g.parent(node.input[0], ["Add"], "the rotary positions")
    kinds = {}
    for i in add.input:
        p = g.producer.get(i)
        while p is not None and p.op_type == "Cast":
            p = g.producer.get(p.input[0])
        kinds[getattr(p, "op_type", None)] = p
    rng, gather = kinds.get("Range"), kinds.get("Gather")
    if rng is None or gather is None or g.ints(rng.input[0]) != [0] or g.ints(rng.input[2]) != [1]:
        return False
    shape = g.producer.get(gather.input[0])
    return shape is not None and shape.op_type == "Shape" and shape.input[0] == past_key \
        and g.ints(gather.input[1]) == [2]


def _in_place_interface(g: Graph, m: AttentionMatch, inv_freq: np.ndarray | None) -> None:
    """Graph inputs and outputs of the in-place convention, and the metadata a runtime builds tables from."""
    graph = g.graph
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
    props = {p.key: p for p in g.model.metadata_props}
    meta = {kv_cache.LAYOUT_KEY: kv_cache.IN_PLACE}
    if inv_freq is not None:
        meta[kv_cache.INV_FREQ_KEY] = json.dumps([float(f) for f in inv_freq])
    for key, value in meta.items():
        (props[key] if key in props else g.model.metadata_props.add(key=key)).value = value


def _require_all_attention(misses: list[Miss], ctx: PassContext) -> None:
    """In-place caching is all or nothing per graph: an unfused attention would still concat its cache."""
    missed = [m for m in misses if m.pattern == "attention"]
    if missed:
        first = missed[0]
        block = ctx.blocks.node_block.get(first.node.name) or block_of(first.node, ctx.blocks.spec,
                                                                       _block_patterns(ctx))
        raise PipelineError(f"fuse_attention: kv_cache 'in_place' on {ctx.graph_name!r}: its attention did not "
                            f"match in {block} at {first.node.name or 'Softmax'}: {first.reason}")


def _with_rotary(g: Graph, heads: Heads) -> str:
    """RoPE on [B, S, hidden] instead of [B, H, S, D]: same rotation, and MHA takes Q and K unsplit."""
    if heads.rotary is None:
        return heads.flat
    attrs = {a.name: helper.get_attribute_value(a) for a in heads.rotary.attribute}
    if attrs.get("rotary_embedding_dim"):
        attrs["num_heads"] = heads.heads  # 3D input with a partial rotary needs the head count
    out = g.fresh(heads.flat + "_rotary")
    g.node("RotaryEmbedding", [heads.flat, *heads.rotary.input[1:]], [out], heads.rotary, domain=MS, **attrs)
    return out


def _match_attention(g: Graph, softmax: onnx.NodeProto, num_heads: int) -> AttentionMatch:
    if _attr(softmax, "axis", -1) not in (-1, 3):
        raise NoMatch("Softmax is not over the last axis")
    scores = g.parent(softmax.input[0], ["Where", "Div", "Mul", "MatMul", "Add"], "the Softmax input")
    causal, fill, scaled = False, None, softmax.input[0]
    if scores.op_type == "Add":
        raise NoMatch("the scores get an additive mask, which this fusion does not take")
    if scores.op_type == "Where":
        _check_causal(g, scores.input[0])
        fill_value = g.const(scores.input[1])
        if fill_value is None or fill_value.size != 1 or float(fill_value.ravel()[0]) > -1e4:
            raise NoMatch("the masked scores are not filled with a large negative constant")
        causal, fill, scaled = True, float(fill_value.ravel()[0]), scores.input[2]
    qk, scale = _scaled_qk(g, scaled)
    kt = g.parent(qk.input[1], ["Transpose"], "the key side of Q K^T")
    if _attr(kt, "perm") != [0, 1, 3, 2]:
        raise NoMatch("the keys are not transposed to [B, H, D, S]")
    k4, past_key, present_key = _past_concat(g, kt.input[0], "key")
    pv = g.child(softmax.output[0], "MatMul", "the attention probabilities")
    if pv.input[0] != softmax.output[0] and pv.input[0] not in _cast_outputs(g, softmax):
        raise NoMatch("the probabilities are the right operand of the MatMul with V")
    v4, past_value, present_value = _past_concat(g, pv.input[1], "value")
    if (past_key is None) != (past_value is None):
        raise NoMatch("only one of key and value has a past")
    q, k, v = (_head_split_of(g, t, what) for t, what in ((qk.input[0], "query"), (k4, "key"), (v4, "value")))
    if v.rotary is not None:
        raise NoMatch("the values are rotated")
    if {(h.heads, h.head_dim) for h in (q, k, v)} != {(q.heads, q.head_dim)}:
        raise NoMatch("query, key and value split into different head counts or sizes")
    if num_heads and q.heads != num_heads:
        raise NoMatch(f"the heads split into {q.heads}, not num_heads {num_heads}")
    merge_t = g.child(pv.output[0], "Transpose", "the attention output")
    merge = g.child(merge_t.output[0], "Reshape", "the transposed attention output")
    if _attr(merge_t, "perm") != BNSH_TO_BSNH or _shape_rank(g, merge.input[1]) != 3:
        raise NoMatch("the attention output is not merged back to [B, S, hidden]")
    past = (past_key, past_value) if past_key else None
    present = (present_key.output[0], present_value.output[0]) if past_key else None
    return AttentionMatch(q, k, v, past, present, [present_key, present_value] if past else [], scale, causal, fill,
                          merge.output[0], merge)


def _cast_outputs(g: Graph, node: onnx.NodeProto) -> set[str]:
    outs, frontier = set(), [node.output[0]]
    while frontier:
        t = frontier.pop()
        for c in g.consumers.get(t, []):
            if c.op_type == "Cast":
                outs.add(c.output[0])
                frontier.append(c.output[0])
    return outs


def _scaled_qk(g: Graph, scaled: str) -> tuple[onnx.NodeProto, float]:
    node = g.parent(scaled, ["Div", "Mul", "MatMul"], "the attention scores")
    if node.op_type == "MatMul":
        return node, 1.0
    factor = g.const(node.input[1])
    if factor is None or factor.size != 1:
        raise NoMatch(f"the scores are scaled ({node.op_type}) by something other than a constant")
    qk = g.parent(node.input[0], ["MatMul"], "the scaled scores")
    value = float(factor.ravel()[0])
    return qk, 1.0 / value if node.op_type == "Div" else value


def _past_concat(g: Graph, tensor: str, what: str) -> tuple[str, str | None, onnx.NodeProto | None]:
    """Concat(past, new, axis=2) with `past` a graph input -> (new, past, the Concat); else (tensor, None, None)."""
    node = g.producer.get(tensor)
    if node is None or node.op_type != "Concat":
        return tensor, None, None
    if len(node.input) != 2 or _attr(node, "axis") not in (2, -2) or node.input[0] not in g.inputs:
        raise NoMatch(f"the {what}s are a Concat, but not of a past {what} graph input along the sequence axis")
    return node.input[1], node.input[0], node


def _head_split_of(g: Graph, tensor: str, what: str) -> Heads:
    node = g.producer.get(tensor)
    rotary = node if node is not None and node.op_type == "RotaryEmbedding" and node.domain == MS else None
    flat_4d = rotary.input[0] if rotary else tensor
    heads, head_dim = _head_split(g, flat_4d, f"the {what}")
    reshape = g.producer[g.producer[flat_4d].input[0]]
    return Heads(reshape.input[0], heads, head_dim, rotary)


def _head_split(g: Graph, tensor: str, what: str) -> tuple[int, int]:
    """Transpose(Reshape(x, [B, S, H, D]), perm [0, 2, 1, 3]) -> (H, D)."""
    transpose = g.producer.get(tensor)
    if transpose is None or transpose.op_type != "Transpose" or _attr(transpose, "perm") != BNSH_TO_BSNH:
        raise NoMatch(f"{what} is not split into heads by Reshape + Transpose [0, 2, 1, 3]")
    reshape = g.parent(transpose.input[0], ["Reshape"], f"{what}'s head split")
    dims = _shape_tail(g, reshape.input[1])
    if dims is None:
        raise NoMatch(f"{what}'s head split has no constant head count and size")
    return dims


def _shape_tail(g: Graph, shape: str) -> tuple[int, int] | None:
    """The last two entries of a 4-D Reshape target, when constant: a constant, or a Concat of pieces."""
    value = g.ints(shape)
    if value is not None:
        return (value[2], value[3]) if len(value) == 4 and min(value[2:]) > 0 else None
    concat = g.producer.get(shape)
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
        return None
    tail = [g.ints(i) for i in concat.input[2:]]
    if any(t is None or len(t) != 1 or t[0] <= 0 for t in tail):
        return None
    return tail[0][0], tail[1][0]


def _shape_rank(g: Graph, shape: str) -> int | None:
    value = g.ints(shape)
    if value is not None:
        return len(value)
    node = g.producer.get(shape)
    return len(node.input) if node is not None and node.op_type == "Concat" else None


def _check_causal(g: Graph, condition: str) -> None:
    """Where's condition must be key_pos > query_pos (or query_pos < key_pos), positions from Range."""
    cmp = g.parent(condition, ["Greater", "Less"], "the mask condition")
    key, query = cmp.input if cmp.op_type == "Greater" else reversed(cmp.input)
    if not (_positions(g, key, axis=0) and _positions(g, query, axis=1)):
        raise NoMatch(f"the mask is not causal ({cmp.op_type} of key positions [1, T] and query positions [S, 1])")


def _positions(g: Graph, tensor: str, axis: int) -> bool:
    """Unsqueeze(Range(0, n, 1) [+ offset], axis): a row or column of positions."""
    node = g.producer.get(tensor)
    if node is None or node.op_type != "Unsqueeze":
        return False
    axes = g.ints(node.input[1]) if len(node.input) > 1 else _attr(node, "axes")
    if axes != [axis]:
        return False
    src = g.producer.get(node.input[0])
    while src is not None and src.op_type in ("Add", "Cast"):
        src = next((p for p in (g.producer.get(i) for i in src.input) if p is not None and p.op_type in
                    ("Range", "Add", "Cast")), None)
    return src is not None and src.op_type == "Range" and g.ints(src.input[0]) == [0] and g.ints(src.input[2]) == [1]


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return list(value) if isinstance(value, (list, tuple)) else value
    return default
