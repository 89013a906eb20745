"""Rewrite rules, in the shape of onnxscript's rewriter: a pattern matched at an anchor node, a check, a rewrite.

A `Rule` says where its pattern may start (`anchors`), matches it there (`match`: a match, or a `NoMatch`
naming the node and what differed), checks what the pattern alone does not say (`check`: a reason not to
rewrite, or None) and rewrites the match (`rewrite`). `apply_rules` runs rules in order on one `GraphView`
and returns every `NoMatch`, so a pass can say where and why its pattern did not match instead of leaving a
graph silently unrewritten.

Matchers walk the graph through the view's steps (`parent`, `child`) and helpers of their own; a step that
finds something else raises `Mismatch`, which the driver turns into a `NoMatch` at the anchor. Rewrites edit
the protobuf graph through the view, node by node, so what they do not touch keeps its bytes; the maps the
view holds are those of the graph before the rule ran, and `settle` (after each rule) sorts, drops dead
nodes and rebuilds them.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

import numpy as np
import onnx
from onnx import helper

from pipeline.core.graph import (
    cleanup,
    constant_value,
    consumers,
    producers,
    toposort,
    unused_name,
)

M = TypeVar("M")


class Mismatch(Exception):
    """Raised inside a matcher or check: the message says what differed from the pattern."""


@dataclass
class NoMatch:
    """A pattern that did not match: where (`node`, the rule's anchor unless the rule names another), why, and
    which rule's pattern (`pattern`, filled in by `apply_rules`)."""

    reason: str
    node: onnx.NodeProto
    pattern: str = ""

    def __str__(self) -> str:
        return f"node {self.node.name or self.node.op_type!r}: {self.reason}"


class GraphView:
    """One model's graph with its producer, consumer and initializer maps, and the edits a rewrite makes."""

    def __init__(self, model: onnx.ModelProto, what: str = "rewrite"):
        self.model, self.graph, self.what = model, model.graph, what
        self.refresh()

    def refresh(self) -> None:
        self.producer = producers(self.graph.node)
        self.consumers = consumers(self.graph.node)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.inputs = {i.name for i in self.graph.input}
        self.names = {n.name for n in self.graph.node}  # node names taken, new nodes' included
        self.reserved: set[str] = set()  # tensor names handed out by `fresh` since the last refresh

    # --- reading ----------------------------------------------------------------------------------------

    def const(self, tensor: str) -> np.ndarray | None:
        return constant_value(tensor, self.initializers, self.producer)

    def ints(self, tensor: str) -> list[int] | None:
        value = self.const(tensor)
        return None if value is None else [int(v) for v in np.ravel(value)]

    def source(self, tensor: str) -> onnx.NodeProto | None:
        """The producer of `tensor` past any Casts (None for a graph input or initializer)."""
        node = self.producer.get(tensor)
        while node is not None and node.op_type == "Cast":
            node = self.producer.get(node.input[0])
        return node

    def parent(self, tensor: str, ops: Iterable[str], what: str) -> onnx.NodeProto:
        """The producer of `tensor` past any Casts, which must be one of `ops` (else Mismatch, saying `what`)."""
        node = self.source(tensor)
        if node is None or node.op_type not in ops:
            found = node.op_type if node is not None else "a graph input or initializer"
            raise Mismatch(f"{what} is {found}, not {'/'.join(ops)}")
        return node

    def child(self, tensor: str, op: str, what: str) -> onnx.NodeProto:
        """The one consumer of `tensor` past any Casts, which must be `op` (else Mismatch, saying `what`)."""
        users = self.consumers.get(tensor, [])
        while len(users) == 1 and users[0].op_type == "Cast":
            users = self.consumers.get(users[0].output[0], [])
        if len(users) != 1 or users[0].op_type != op:
            raise Mismatch(f"{what} feeds {', '.join(u.op_type for u in users) or 'nothing'}, not one {op}")
        return users[0]

    # --- editing ----------------------------------------------------------------------------------------

    def add_node(self, op: str, inputs: list[str], outputs: list[str], anchor: onnx.NodeProto, domain: str = "",
                 **attrs) -> onnx.NodeProto:
        """Append a node, named into the scope of `anchor` (the node it replaces); `settle` puts it in order."""
        node = helper.make_node(op, inputs, outputs, domain=domain or None, **attrs)
        name_into_scope(node, anchor, self.names)
        self.graph.node.append(node)
        return node

    def add_initializer(self, tensor: onnx.TensorProto) -> None:
        self.graph.initializer.append(tensor)
        self.initializers[tensor.name] = tensor

    def fresh(self, base: str) -> str:
        """A tensor name no node, initializer or graph input uses yet, nor an earlier `fresh` handed out."""
        used = set(self.producer) | set(self.initializers) | self.inputs | self.reserved
        name = unused_name(base, used)
        self.reserved.add(name)
        return name

    def remove(self, nodes: Iterable[onnx.NodeProto]) -> None:
        # Node protos are copied in and out of the graph, so they are told apart by their first output.
        gone = {n.output[0] for n in nodes}
        keep = [n for n in self.graph.node if not n.output or n.output[0] not in gone]
        del self.graph.node[:]
        self.graph.node.extend(keep)

    def settle(self) -> None:
        """Restore topological order (new nodes were appended), drop the nodes nothing reads any more, and
        rebuild the maps.

        The toolkit's own sort keeps nodes in their order wherever the edges allow, so what a rewrite did not
        touch keeps its bytes; onnx-graphsurgeon decides what is dead (`pipeline.core.graph.cleanup`)."""
        ordered = toposort(self.graph.node, what=f"{self.what} (a bug in a rewrite rule)")
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        cleanup(self.model)
        self.refresh()


def name_into_scope(node: onnx.NodeProto, anchor: onnx.NodeProto, taken: set[str]) -> None:
    """Name `node` into the scope (and `namespace` metadata) of `anchor`, the node it replaced, so it stays in
    that node's block: `/self_attn/Softmax` -> `/self_attn/MultiHeadAttention`. `taken`: node names in use,
    updated."""
    scope = anchor.name.rsplit("/", 1)[0] + "/" if "/" in anchor.name else ""
    name = unused_name(scope + node.op_type, taken)
    taken.discard(node.name)
    taken.add(name)
    node.name = name
    for prop in anchor.metadata_props:
        if prop.key == "namespace":
            node.metadata_props.add(key="namespace", value=prop.value)


class Rule(Generic[M]):
    """A rewrite: subclasses set `pattern` and implement `anchors`, `match` and `rewrite` (and `check`, `setup`
    where they need them). One instance may serve many graphs: what its rewrites share lives from `setup` on."""

    pattern: str = ""  # what a NoMatch calls the pattern ("attention")

    def setup(self, view: GraphView) -> None:
        """Called before the rule runs on a graph: reset what its rewrites of one graph share."""

    def anchors(self, view: GraphView) -> list[onnx.NodeProto]:
        """The nodes the pattern may start at, in graph order; taken before any rewrite."""
        raise NotImplementedError

    def match(self, view: GraphView, anchor: onnx.NodeProto) -> M | NoMatch:
        """The pattern at `anchor`, or a NoMatch (a Mismatch raised in here is one at `anchor`)."""
        raise NotImplementedError

    def check(self, view: GraphView, match: M) -> str | None:
        """Why a match must not be rewritten (what the pattern's shape alone does not say), or None."""
        return None

    def rewrite(self, view: GraphView, match: M) -> None:
        raise NotImplementedError


def try_rule(rule: Rule[M], view: GraphView, anchor: onnx.NodeProto) -> M | NoMatch:
    """The rule's match at `anchor` if it matches and passes its check, else the NoMatch saying why."""
    try:
        found = rule.match(view, anchor)
        reason = None if isinstance(found, NoMatch) else rule.check(view, found)
    except Mismatch as e:
        return NoMatch(str(e), anchor, rule.pattern)
    if isinstance(found, NoMatch):
        return replace(found, pattern=rule.pattern)
    return found if reason is None else NoMatch(reason, anchor, rule.pattern)


def apply_rules(view: GraphView, rules: Sequence[Rule]) -> list[NoMatch]:
    """Run each rule in turn on the graph: every anchor matched, checked and rewritten at once (later matches
    see the maps from before the rule ran), then `settle`. Returns the NoMatches, in rule and anchor order."""
    misses: list[NoMatch] = []
    for rule in rules:
        rule.setup(view)
        for anchor in rule.anchors(view):
            outcome = try_rule(rule, view, anchor)
            if isinstance(outcome, NoMatch):
                misses.append(outcome)
            else:
                rule.rewrite(view, outcome)
        view.settle()
    return misses
