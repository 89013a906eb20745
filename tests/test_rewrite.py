"""The rewrite-rule contract (pipeline.core.rewrite) on a tiny graph built here: the driver matches, checks and
rewrites each anchor, says where and why a pattern did not match, and leaves a graph that computes the same."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.core.graph import (
    attribute,
    constant_value,
    declare_domains,
    producers,
    unused_name,
)
from pipeline.core.onnx_io import session
from pipeline.core.rewrite import (
    GraphView,
    Mismatch,
    NoMatch,
    Rule,
    apply_rules,
    name_into_scope,
)


def negations() -> onnx.ModelProto:
    """Three scopes of Neg: `/a` a double negation, `/b` Neg(Relu(x)), `/c` a double negation whose inner
    Neg is also read by an Add."""
    nodes = [
        helper.make_node("Neg", ["x"], ["a1"], name="/a/Neg"),
        helper.make_node("Neg", ["a1"], ["ya"], name="/a/Neg_1"),
        helper.make_node("Relu", ["x"], ["b1"], name="/b/Relu"),
        helper.make_node("Neg", ["b1"], ["yb"], name="/b/Neg"),
        helper.make_node("Neg", ["x"], ["c1"], name="/c/Neg"),
        helper.make_node("Neg", ["c1"], ["c2"], name="/c/Neg_1"),
        helper.make_node("Add", ["c1", "c2"], ["yc"], name="/c/Add"),
    ]
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("x", "ya", "yb", "yc")]
    graph = helper.make_graph(nodes, "negations", info[:1], info[1:])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class DoubleNegation(Rule[tuple[onnx.NodeProto, onnx.NodeProto]]):
    """Neg(Neg(x)) -> Identity(x), anchored at the outer Neg."""

    pattern = "double negation"

    def setup(self, view: GraphView) -> None:
        self.rewritten: list[str] = []  # per graph

    def anchors(self, view: GraphView) -> list[onnx.NodeProto]:
        return [n for n in view.graph.node if n.op_type == "Neg"]

    def match(self, view: GraphView, anchor: onnx.NodeProto) -> tuple[onnx.NodeProto, onnx.NodeProto] | NoMatch:
        inner = view.parent(anchor.input[0], ["Neg"], "the negated input")  # raises Mismatch
        return inner, anchor

    def check(self, view: GraphView, match: tuple[onnx.NodeProto, onnx.NodeProto]) -> str | None:
        inner, _ = match
        readers = view.consumers[inner.output[0]]
        return None if len(readers) == 1 else f"the inner Neg is read by {len(readers)} nodes"

    def rewrite(self, view: GraphView, match: tuple[onnx.NodeProto, onnx.NodeProto]) -> None:
        inner, outer = match
        view.remove([outer])
        view.add_node("Identity", [inner.input[0]], [outer.output[0]], outer)
        self.rewritten.append(outer.name)


def test_the_driver_rewrites_matches_and_the_graph_computes_the_same():
    model = negations()
    rewritten = negations()
    misses = apply_rules(GraphView(rewritten), [DoubleNegation()])
    assert [n.op_type for n in rewritten.graph.node] == ["Relu", "Neg", "Neg", "Neg", "Add", "Identity"]
    identity = rewritten.graph.node[-1]
    assert identity.name == "/a/Identity"  # into the scope of the node it replaced: its block
    assert "a1" not in {t for n in rewritten.graph.node for t in n.input}  # the inner Neg went dead, and went
    onnx.checker.check_model(rewritten, full_check=True)
    x = {"x": np.arange(6, dtype=np.float32).reshape(2, 3) - 2}
    for want, got in zip(session(model).run(None, x), session(rewritten).run(None, x)):
        np.testing.assert_array_equal(want, got)
    assert len(misses) == 4


def test_every_no_match_names_its_node_pattern_and_reason():
    misses = apply_rules(GraphView(negations()), [DoubleNegation()])
    assert [(m.pattern, m.node.name, m.reason) for m in misses] == [
        ("double negation", "/a/Neg", "the negated input is a graph input or initializer, not Neg"),
        ("double negation", "/b/Neg", "the negated input is Relu, not Neg"),
        ("double negation", "/c/Neg", "the negated input is a graph input or initializer, not Neg"),
        ("double negation", "/c/Neg_1", "the inner Neg is read by 2 nodes"),  # the check's reason
    ]
    assert str(misses[1]) == "node '/b/Neg': the negated input is Relu, not Neg"


def test_a_no_match_may_name_another_node_than_the_anchor():
    class NamesTheInput(DoubleNegation):
        def match(self, view, anchor):
            inner = view.producer.get(anchor.input[0])
            if inner is not None and inner.op_type != "Neg":
                return NoMatch(f"{inner.op_type} where a Neg was expected", inner)
            return super().match(view, anchor)

    misses = apply_rules(GraphView(negations()), [NamesTheInput()])
    assert str(misses[1]) == "node '/b/Relu': Relu where a Neg was expected"
    assert misses[1].pattern == "double negation"


def test_rules_run_in_order_each_setup_per_graph_and_anchors_taken_before_rewrites():
    rule = DoubleNegation()
    seen = []

    class Recorder(Rule[onnx.NodeProto]):
        pattern = "identity"

        def anchors(self, view):
            return [n for n in view.graph.node if n.op_type == "Identity"]

        def match(self, view, anchor):
            seen.append(anchor.name)  # the earlier rule's rewrite, settled into the graph
            raise Mismatch("only recorded")

    for _ in range(2):  # one rule object, two graphs: its per-graph state starts afresh
        misses = apply_rules(GraphView(negations()), [rule, Recorder()])
        assert rule.rewritten == ["/a/Neg_1"]
        assert [m.pattern for m in misses] == ["double negation"] * 4 + ["identity"]
    assert seen == ["/a/Identity", "/a/Identity"]


def test_view_edits_name_new_nodes_and_tensors_apart():
    model = negations()
    node = model.graph.node[1]
    node.metadata_props.add(key="namespace", value="a")
    view = GraphView(model)
    first = view.add_node("Neg", ["x"], [view.fresh("ya")], node)
    second = view.add_node("Neg", ["x"], [view.fresh("ya")], node)
    assert (first.name, second.name) == ("/a/Neg_2", "/a/Neg_3")  # /a/Neg and /a/Neg_1 are taken
    assert (first.output[0], second.output[0]) == ("ya_1", "ya_2")  # ya is a node's output already
    assert [(p.key, p.value) for p in first.metadata_props] == [("namespace", "a")]
    root = helper.make_node("Relu", ["x"], ["r"], name="r0")
    name_into_scope(root, helper.make_node("Neg", ["x"], ["n"], name="Neg_7"), set())
    assert root.name == "Relu"  # an anchor at no scope: no scope


def test_graph_helpers_a_rewrite_reads_with():
    weights = numpy_helper.from_array(np.array([2, 3], np.int64), "w")
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(1.5, np.float32))),
             helper.make_node("Constant", [], ["ints"], value_ints=[4, 5]),
             helper.make_node("Identity", ["c"], ["c_id"]),
             helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0])]
    producer = producers(nodes)
    inits = {"w": weights}
    assert constant_value("w", inits, producer).tolist() == [2, 3]
    assert constant_value("c_id", inits, producer) == np.float32(1.5)  # through the Identity
    assert constant_value("ints", inits, producer).tolist() == [4, 5]
    assert constant_value("t", inits, producer) is None and constant_value("x", inits, producer) is None
    assert attribute(nodes[3], "perm") == [1, 0] and attribute(nodes[3], "axis", -1) == -1
    assert unused_name("t", {"t", "t_1"}) == "t_2" and unused_name("u", {"t"}) == "u"
    model = negations()
    model.graph.node.append(helper.make_node("Gelu", ["x"], ["g"], domain="com.microsoft"))
    declare_domains(model)
    declare_domains(model)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17), ("com.microsoft", 1)]
