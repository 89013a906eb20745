"""Blocks: named groups of nodes that passes and the error check share.

A block is either what a recipe's `blocks` patterns say (capture groups form
the id) or, by default, the module scope up to the first indexed module
(`/enc_p/encoder/attn_layers.3`, `/dec/ups.0`), else the first scope
(`/enc_p`). The scope is the node name's (`/enc_p/encoder/attn_layers.3/conv_q/Conv`,
how the TorchScript exporter names the nodes of submodules), or, for a node
whose name has none, its `namespace` metadata (the dynamo exporter's). Where a
default block still holds most of the model's weights, it is split one scope
deeper until none does (`SPLIT_SHARE`), so no block stands for the model.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from pipeline.core.errors import PipelineError, few
from pipeline.core.graph import consumers, producers
from pipeline.core.recipe import BlockSpec, Scope, user_pattern

GRAPH_LEVEL = "/"  # nodes at the root scope (`/Exp`) or with no scope at all
SPLIT_SHARE = 0.5  # a default block holding more of the weights than this is split one scope deeper
_INDEXED = re.compile(r"^[^/]*\.\d+$")


def default_block_id(node_name: str) -> str:
    """`/enc_p/encoder/attn_layers.3/conv_q/Conv` -> `/enc_p/encoder/attn_layers.3`."""
    return _scope_id(_name_scopes(node_name), _default_depth(_name_scopes(node_name)))


def module_scopes(node: onnx.NodeProto) -> list[str]:
    """The modules a node was exported from, outermost first: its name's scopes (`/enc_p/encoder/attn_layers.3/
    conv_q/Conv` -> enc_p, encoder, attn_layers.3, conv_q), else, for a name without any, its `namespace`
    metadata's innermost module (`enc_p.encoder.attn_layers.3.conv_q`, split the same way)."""
    scopes = _name_scopes(node.name)
    return scopes if scopes or node.name.startswith("/") else _namespace_scopes(_namespace(node))


def _name_scopes(node_name: str) -> list[str]:
    parts = node_name.split("/")
    return parts[1:-1] if len(parts) >= 3 and parts[0] == "" else []


def _namespace_scopes(namespace: str) -> list[str]:
    """The dynamo exporter writes `: <root class>/<module>: <class>/.../<fx node>: <target>`, each module by its
    qualified name (`enc_p.encoder.attn_layers.3`). An index joins the name before it (`attn_layers.3`), as the
    TorchScript exporter's scopes have it, so both exports of one model get the same blocks."""
    parts = namespace.split("/")
    if len(parts) < 3:
        return []
    qualified = parts[-2].split(":", 1)[0].strip()
    scopes: list[str] = []
    for part in qualified.split(".") if qualified else []:
        if part.isdigit() and scopes:
            scopes[-1] += f".{part}"
        else:
            scopes.append(part)
    return scopes


def _default_depth(scopes: list[str]) -> int:
    """How many scopes the default block keeps: up to the first indexed module, else the first."""
    return next((i + 1 for i, part in enumerate(scopes) if _INDEXED.match(part)), min(1, len(scopes)))


def _scope_id(scopes: list[str], depth: int) -> str:
    return "/" + "/".join(scopes[:depth]) if depth else GRAPH_LEVEL


def _namespace(node: onnx.NodeProto) -> str:
    for prop in node.metadata_props:
        if prop.key == "namespace":
            return prop.value
    return ""


def block_of(node: onnx.NodeProto, spec: BlockSpec | None, patterns: list[re.Pattern]) -> str:
    """The block id of one node under `spec` (compiled as `patterns`), or the default (before any split of a
    block that holds most of the model: `BlockPartition` makes those)."""
    if spec is None:
        scopes = module_scopes(node)
        return _scope_id(scopes, _default_depth(scopes))
    text = node.name if spec.on == "name" else _namespace(node)
    for pattern in patterns:
        m = pattern.search(text)
        if m:
            groups = [g for g in m.groups() if g is not None]
            return "/".join(groups) if groups else m.group(0)
    return spec.rest


@dataclass
class Block:
    id: str
    nodes: list[str] = field(default_factory=list)
    op_types: Counter = field(default_factory=Counter)
    params: int = 0


class BlockPartition:
    """The blocks of one graph, in graph order (order of first node)."""

    def __init__(self, model: onnx.ModelProto, spec: BlockSpec | None = None):
        self.spec = spec
        self.node_block: dict[str, str] = {}
        self.blocks: dict[str, Block] = {}
        patterns = [user_pattern(p) for p in spec.patterns] if spec else []
        initializers = {t.name: t for t in model.graph.initializer}
        ids = [block_of(n, spec, patterns) for n in model.graph.node] if spec else _split_defaults(model)
        counted: set[str] = set()
        for node, block_id in zip(model.graph.node, ids):
            block = self.blocks.setdefault(block_id, Block(block_id))
            block.nodes.append(node.name)
            block.op_types[node.op_type] += 1
            self.node_block[node.name] = block_id
            for name in node.input:
                # A weight shared by two blocks counts once, for the first.
                if name in initializers and name not in counted:
                    counted.add(name)
                    block.params += int(np.prod(initializers[name].dims, dtype=np.int64))
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value" and attr.t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                        block.params += int(np.prod(attr.t.dims, dtype=np.int64)) if attr.t.dims else 0

    def ids(self) -> list[str]:
        return list(self.blocks)

    def select_lenient(self, scope: Scope) -> tuple[set[str], set[str]]:
        """Like `select`, for one graph of several: patterns may match nothing here.
        Returns the selected nodes and the patterns that matched something."""
        ids = self.ids()
        hits: set[str] = set()
        chosen = set(ids) if scope.include is None else set()
        for pattern in scope.include or []:
            found = _full_matches(pattern, ids)
            hits |= {pattern} if found else set()
            chosen.update(found)
        for pattern in scope.exclude:
            found = _full_matches(pattern, ids)
            hits |= {pattern} if found else set()
            chosen.difference_update(found)
        nodes = {n for b in chosen for n in self.blocks[b].nodes}
        if scope.nodes:
            rxs = {p: _compile(p) for p in scope.nodes}
            hits |= {p for p, rx in rxs.items() if any(rx.search(n) for n in nodes)}
            nodes = {n for n in nodes if any(rx.search(n) for rx in rxs.values())}
        return nodes, hits

    def select(self, scope: Scope, where: str = "scope") -> set[str]:
        """Node names inside `scope`. A pattern that matches no block is an error."""
        nodes, hits = self.select_lenient(scope)
        for kind, patterns in (("include", scope.include or []), ("exclude", scope.exclude)):
            for pattern in patterns:
                if pattern not in hits:
                    raise PipelineError(f"{where}: {kind} pattern {pattern!r} matches no block "
                                        f"(blocks: {few(self.ids(), 12)})")
        for pattern in scope.nodes or []:
            if pattern not in hits:
                raise PipelineError(f"{where}: nodes pattern {pattern!r} matches no node in the chosen blocks")
        return nodes


def _split_defaults(model: onnx.ModelProto) -> list[str]:
    """Every node's default block id, after splitting any block that holds more than SPLIT_SHARE of the model's
    weights and is no indexed module one scope deeper, again while one does and holds modules that hold modules.
    A model exported with
    few indexed modules (a `/model/decoder/...` tree) would otherwise be checked as one block that says
    nothing."""
    scopes = [module_scopes(n) for n in model.graph.node]
    depth = [_default_depth(s) for s in scopes]
    weights = _node_weights(model)
    total = sum(weights) or 1
    while True:
        ids = [_scope_id(s, d) for s, d in zip(scopes, depth)]
        share: Counter = Counter()
        for block_id, w in zip(ids, weights):
            share[block_id] += w
        # An indexed module (`layers.3`) is a unit however much it holds (a one-layer graph's layer).
        big = next((b for b, w in share.items()
                    if w > SPLIT_SHARE * total and b != GRAPH_LEVEL and not _INDEXED.match(b.rsplit("/", 1)[-1])), None)
        deeper = [i for i, b in enumerate(ids) if b == big and len(scopes[i]) > depth[i]]
        if not any(len(scopes[i]) > depth[i] + 1 for i in deeper):
            # Nothing too big, or its parts are single modules (a decoder layer's own `/mlp`, cut into
            # `down_proj` and `up_proj`): the block is already the unit that means something.
            return ids
        for i in deeper:
            depth[i] += 1


def _node_weights(model: onnx.ModelProto) -> list[int]:
    """Each node's weight elements, a weight shared by several counted for the first (as `Block.params`)."""
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer}
    counted: set[str] = set()
    out = []
    for node in model.graph.node:
        mine = [t for t in node.input if t in sizes and t not in counted]
        counted.update(mine)
        out.append(sum(sizes[t] for t in mine))
    return out


def _compile(pattern: str) -> re.Pattern:
    try:
        return user_pattern(pattern)
    except re.error as e:
        raise PipelineError(f"scope pattern {pattern!r} is not a valid regex: {e}") from None


def _full_matches(pattern: str, ids: list[str]) -> list[str]:
    rx = _compile(pattern)
    return [i for i in ids if rx.fullmatch(i)]



QUANTIZER_SUFFIX = re.compile(r"_(quant|QuantizeLinear|Q\d)$")


def replaced_name(name: str) -> str:
    """The name of the node a quantizer's node replaced (`X_Q8`, `X_quant` -> `X`); else the name itself."""
    return QUANTIZER_SUFFIX.sub("", name)


def name_all_nodes(model: onnx.ModelProto) -> int:
    """Give unnamed nodes a name and scope-less nodes the scope of their neighbours.

    TorchScript loses the names of ops inlined from scripted functions (the
    tanh/sigmoid gates of VITS's WaveNet layers come out as `Tanh_6089` or
    nameless); without a scope they would fall outside their flow's block.
    """
    scoped = {n.name for n in model.graph.node if n.name.startswith("/")}
    if len(scoped) == len(model.graph.node):
        return 0
    return adopt_new_nodes(model, scoped, None) or 1


def adopt_new_nodes(model: onnx.ModelProto, old_names: set[str], spec: BlockSpec | None) -> int:
    """Rename nodes a pass added so they fall in the block of the node they serve.

    Quantizers and converters name new nodes after tensors or weights
    (`dec.ups.0.weight_DequantizeLinear`), which would land them outside every
    block and break later scopes. A new node takes the name scope (and
    `namespace` metadata) of its first consumer, else its producer, where that
    neighbour's block differs from the one its own name gives. Returns how many
    nodes were renamed.
    """
    patterns = [user_pattern(p) for p in spec.patterns] if spec else []
    nodes = list(model.graph.node)
    producer, readers = producers(nodes), consumers(nodes)
    taken = {n.name for n in nodes}
    for i, n in enumerate(nodes):
        if not n.name:  # quantizers address nodes by name: every node needs one
            n.name = f"{n.op_type}_{i}"
            while n.name in taken:
                n.name += "_"
            taken.add(n.name)
    # A node named after an old one plus a quantizer's suffix (`/mlp/down_proj/MatMul_Q8`) replaces it: it is
    # that node's block's, even where its consumer lies in another block.
    settled = {n.name for n in nodes if n.name in old_names or replaced_name(n.name) in old_names}
    renamed = 0
    pending = [n for n in nodes if n.name not in settled]
    while pending:
        progress = False
        for node in list(pending):
            neighbours = [c for o in node.output for c in readers.get(o, [])]
            neighbours += [producer[i] for i in node.input if i in producer]
            anchor = next((m for m in neighbours if m.name in settled), None)
            if anchor is None:
                continue
            pending.remove(node)
            progress = True
            want = block_of(anchor, spec, patterns)
            if block_of(node, spec, patterns) != want:
                scope = anchor.name.rsplit("/", 1)[0] + "/" if "/" in anchor.name else ""
                name = scope + node.name.replace("/", "_")
                while name in taken:
                    name += "_"
                taken.add(name)
                node.name = name
                ns = _namespace(anchor)
                if ns:
                    for p in [p for p in node.metadata_props if p.key == "namespace"]:
                        node.metadata_props.remove(p)
                    node.metadata_props.add(key="namespace", value=ns)
                renamed += 1
            settled.add(node.name)
        if not progress:
            break  # isolated new nodes: nothing to anchor them to
    return renamed
