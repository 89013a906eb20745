"""Blocks: named groups of nodes that passes and the error check share.

A block is either what a recipe's `blocks` patterns say (capture groups form
the id) or, by default, the node-name scope up to the first indexed module
(`/enc_p/encoder/attn_layers.3`, `/dec/ups.0`), else the first scope
(`/enc_p`), which is how PyTorch's exporter names the nodes of submodules.
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
_INDEXED = re.compile(r"^[^/]*\.\d+$")


def default_block_id(node_name: str) -> str:
    """`/enc_p/encoder/attn_layers.3/conv_q/Conv` -> `/enc_p/encoder/attn_layers.3`."""
    parts = node_name.split("/")
    if len(parts) < 3 or parts[0] != "":
        return GRAPH_LEVEL
    scopes = parts[1:-1]
    for i, part in enumerate(scopes):
        if _INDEXED.match(part):
            return "/" + "/".join(scopes[: i + 1])
    return "/" + scopes[0]


def _namespace(node: onnx.NodeProto) -> str:
    for prop in node.metadata_props:
        if prop.key == "namespace":
            return prop.value
    return ""


def block_of(node: onnx.NodeProto, spec: BlockSpec | None, patterns: list[re.Pattern]) -> str:
    """The block id of one node under `spec` (compiled as `patterns`), or the default."""
    if spec is None:
        return default_block_id(node.name)
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
        counted: set[str] = set()
        for node in model.graph.node:
            block_id = block_of(node, spec, patterns)
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
