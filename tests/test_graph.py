"""The graph toolkit (pipeline.core.graph) on tiny models built here: maps, order, cleanup, cut, pin, outputs, placement."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import tiny
from onnx import TensorProto, helper

from pipeline.core.blocks import BlockPartition, adopt_new_nodes
from pipeline.core.errors import PipelineError
from pipeline.core.graph import (
    cleanup,
    consumer_indices,
    consumers,
    cut,
    needed_nodes,
    node_inputs,
    pin,
    producer_indices,
    producers,
    toposort,
    with_outputs,
)
from pipeline.core.onnx_io import session

RELU0 = "/enc/layers.0/Relu_output_0"
RELU1 = "/enc/layers.1/Relu_output_0"


def x_feed(t: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((1, 4, t)).astype(np.float32)}


def names(nodes) -> list[str]:
    return [n.name for n in nodes]


def if_reading(outer: str, out: str, name: str) -> onnx.NodeProto:
    """An If whose two branches read `outer` from the enclosing graph (and nothing from its inputs)."""
    def branch(op: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(op, [outer], [f"{name}_{op}"])], f"{name}_{op}", [],
                                 [helper.make_tensor_value_info(f"{name}_{op}", TensorProto.FLOAT, None)])
    return helper.make_node("If", ["cond"], [out], name=name, then_branch=branch("Identity"),
                            else_branch=branch("Neg"))


def test_producer_and_consumer_maps():
    model = tiny.conv_net()
    nodes = list(model.graph.node)
    made_by = producers(nodes)
    assert made_by[RELU0].name == "/enc/layers.0/Relu"
    assert made_by["y"].name == "/dec/proj/Conv"
    assert "x" not in made_by and "half" not in made_by  # graph inputs and initializers have no writer
    assert nodes[producer_indices(nodes)["/dec/one"]].name == "/dec/Add"
    readers = consumers(nodes)
    assert names(readers[RELU0]) == ["/enc/layers.1/conv/Conv"]
    assert names(readers["half"]) == ["/dec/Add", "/dec/Add"]  # once per read: Add(half, half)
    assert "y" not in readers
    assert consumer_indices(nodes)["/dec/one"] == [producer_indices(nodes)["/dec/Mul_output_0"]]
    # The empty name is an omitted optional input, not a tensor; a subgraph's outer read is a read.
    clip = helper.make_node("Clip", [RELU1, "", "half"], ["clipped"], name="/enc/Clip")
    branchy = if_reading(RELU1, "chosen", "/enc/If")
    readers = consumers(nodes + [clip, branchy])
    assert "" not in readers and "" not in producers(nodes + [clip, branchy])
    assert names(readers[RELU1]) == ["/enc/layers.2/conv/Conv", "/enc/Clip", "/enc/If", "/enc/If"]  # both branches
    assert node_inputs(branchy) == ["cond", RELU1, RELU1]


def test_toposort_restores_a_shuffled_graph():
    model = tiny.conv_net(layers=4)
    original = names(model.graph.node)
    known = {v.name for v in model.graph.input} | {t.name for t in model.graph.initializer}
    assert names(toposort(model.graph.node, known)) == original  # a sorted graph keeps its order
    shuffled = list(model.graph.node)
    np.random.default_rng(3).shuffle(shuffled)
    assert names(shuffled) != original
    ordered = toposort(shuffled, known)
    assert sorted(names(ordered)) == sorted(original)
    written = set(known)
    for node in ordered:
        assert set(node.input) <= written, f"{node.name} comes before what it reads"
        written.update(node.output)
    # Of the nodes ready, the one given first goes first: the constant Add moved to the front stays there.
    add = next(n for n in shuffled if n.name == "/dec/Add")
    assert names(toposort([add] + [n for n in shuffled if n is not add], known))[0] == "/dec/Add"
    rebuilt = onnx.ModelProto()
    rebuilt.CopyFrom(model)
    del rebuilt.graph.node[:]
    rebuilt.graph.node.extend(ordered)
    onnx.checker.check_model(rebuilt)
    np.testing.assert_array_equal(session(rebuilt).run(None, x_feed())[0], session(model).run(None, x_feed())[0])


def test_toposort_errors_name_the_nodes():
    model = tiny.conv_net()
    known = {v.name for v in model.graph.input} | {t.name for t in model.graph.initializer}
    lost = list(model.graph.node)[1:]  # the first Conv is gone: layer 0's Relu reads what nobody writes
    with pytest.raises(PipelineError, match=r"splice: nodes \['/enc/layers.0/Relu'\] have inputs no node produces"):
        toposort(lost, known, what="splice")
    toposort(lost)  # without `known`, an unwritten name counts as given
    loop = [helper.make_node("Relu", ["b"], ["a"], name="first"), helper.make_node("Relu", ["a"], ["b"], name="second")]
    with pytest.raises(PipelineError, match=r"fuse: the graph has a cycle through nodes \['first', 'second'\]"):
        toposort(loop, what="fuse")


def test_cleanup_drops_what_no_output_needs():
    model = tiny.conv_net()
    original = names(model.graph.node)
    graph = model.graph
    graph.node.insert(2, helper.make_node("Sigmoid", [RELU0], ["dead"], name="/enc/dead/Sigmoid"))
    graph.node.append(helper.make_node("Neg", ["dead"], ["dead_too"], name="/enc/dead/Neg"))
    graph.value_info.append(helper.make_tensor_value_info("dead", TensorProto.FLOAT, None))
    graph.value_info.append(helper.make_tensor_value_info(RELU0, TensorProto.FLOAT, None))
    assert cleanup(model) == 2
    assert names(graph.node) == original  # the rest in its order
    assert [v.name for v in graph.value_info] == [RELU0]
    assert cleanup(model) == 0


def test_cleanup_keeps_what_a_staying_node_or_a_subgraph_needs():
    model = tiny.conv_net()
    graph = model.graph
    graph.node.append(helper.make_node("Sigmoid", [RELU0], ["s"], name="/enc/Sigmoid"))  # dead, removable
    graph.node.append(helper.make_node("Relu", ["s"], ["r"], name="/enc/Relu"))  # dead, not removable
    graph.node.append(helper.make_node("Sigmoid", [RELU1], ["lone"], name="/enc/lone/Sigmoid"))  # dead, removable
    assert cleanup(model, removable=lambda n: n.op_type == "Sigmoid") == 1
    assert "/enc/Sigmoid" in names(graph.node)  # the staying Relu reads it
    assert "/enc/lone/Sigmoid" not in names(graph.node)
    # A tensor only an If body reads is needed when the If is.
    branchy = tiny.conv_net()
    branchy.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    branchy.graph.node.append(helper.make_node("Sigmoid", [RELU1], ["gate"], name="/enc/gate/Sigmoid"))
    branchy.graph.node.append(if_reading("gate", "chosen", "/enc/If"))
    branchy.graph.output.append(helper.make_tensor_value_info("chosen", TensorProto.FLOAT, None))
    assert cleanup(branchy) == 0
    del branchy.graph.output[1]
    assert cleanup(branchy) == 2


def test_cut_and_pin():
    model = tiny.conv_net()
    values = session(with_outputs(model, [RELU1])).run(None, x_feed())
    tail = cut(model, [RELU1], ["y"])
    assert names(tail.graph.node) == ["/enc/layers.2/conv/Conv", "/enc/layers.2/Relu", "/dec/Add", "/dec/Mul",
                                      "/dec/proj/Conv"]
    assert [v.name for v in tail.graph.input] == [RELU1]
    assert {t.name for t in tail.graph.initializer} == {"enc.layers.2.conv.weight", "enc.layers.2.conv.bias",
                                                        "half", "dec.proj.weight"}
    onnx.checker.check_model(tail)
    np.testing.assert_array_equal(session(tail).run(None, {RELU1: values[1]})[0], values[0])
    head = cut(model, ["x"], [RELU0])
    assert names(head.graph.node) == ["/enc/layers.0/conv/Conv", "/enc/layers.0/Relu"]
    pinned = pin(model, [RELU1])
    assert [v.name for v in pinned.graph.input] == ["x", RELU1]  # the original input stays, even unused
    assert len(pinned.graph.node) == len(tail.graph.node)
    np.testing.assert_array_equal(session(pinned).run(None, {**x_feed(), RELU1: values[1]})[0], values[0])
    assert needed_nodes(model.graph, {RELU1}, ["/dec/Mul_output_0"], "cut") == [4, 5, 6, 7]
    with pytest.raises(PipelineError, match=r"cut: tensor 'x' is needed but not given \(an original input left out\)"):
        cut(model, [RELU0], ["y", "/enc/layers.0/conv/Conv_output_0"])
    with pytest.raises(PipelineError, match=r"pin: no intermediate tensor named '/enc/layers.1/Relu_out'"):
        pin(model, ["/enc/layers.1/Relu_out"])


def test_with_outputs():
    model = tiny.conv_net()
    probe = with_outputs(model, [RELU0, "y", RELU0, RELU1])
    assert [o.name for o in probe.graph.output] == ["y", RELU0, RELU1]  # after its own, each once
    assert [o.name for o in model.graph.output] == ["y"]  # a copy: the model is as it was
    assert not probe.graph.output[1].type.HasField("tensor_type")  # untyped: ONNX Runtime infers it
    y, relu0, relu1 = session(probe).run(None, x_feed())
    assert relu0.shape == (1, 8, 12) and (relu0 >= 0).all()
    typed = with_outputs(model, [RELU0], typed=True, what="capture")
    info = typed.graph.output[1]
    assert info.type.tensor_type.elem_type == TensorProto.FLOAT
    assert len(info.type.tensor_type.shape.dim) == 3
    onnx.checker.check_model(typed)
    np.testing.assert_array_equal(session(typed).run([RELU0], x_feed())[0], relu0)
    with pytest.raises(PipelineError, match="capture: no intermediate tensor named 'nothing'"):
        with_outputs(model, ["nothing"], typed=True, what="capture")


def test_a_new_node_goes_into_its_neighbours_block():
    model = tiny.conv_net()
    old = {n.name for n in model.graph.node}
    conv = next(n for n in model.graph.node if n.name == "/enc/layers.2/conv/Conv")
    # What a quantizer adds, named after the weight: it serves layer 2's Conv.
    conv.input[1] = "w_dq"
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["w_q", "s"], ["w_dq"],
                                                name="enc.layers.2.conv.weight_DequantizeLinear"))
    # A node nothing reads takes the block of the node it reads from.
    model.graph.node.append(helper.make_node("Sigmoid", [RELU0], ["probe"], name="probe_Sigmoid"))
    assert adopt_new_nodes(model, old, None) == 2
    new = [n.name for n in model.graph.node if n.name not in old]
    assert new == ["/enc/layers.2/conv/enc.layers.2.conv.weight_DequantizeLinear", "/enc/layers.0/probe_Sigmoid"]
    blocks = BlockPartition(model).node_block
    assert blocks[new[0]] == "/enc/layers.2" and blocks[new[1]] == "/enc/layers.0"


def test_join_runs_a_chain_of_graphs_as_one_with_shared_inputs(tmp_path):
    """a: y = x + s; b: y = x * s, joined as b(a(x)): one input x, one shared s, prefixed outputs."""
    from pipeline.core.graph import join
    from pipeline.core.onnx_io import session

    def part(op: str) -> onnx.ModelProto:
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("x", "s", "y")]
        graph = helper.make_graph([helper.make_node(op, ["x", "s"], ["y"], name=f"/{op}")], op, io[:2], io[2:])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    join([("a", part("Add")), ("b", part("Mul"))], {"b/x": "a/y"}, ["s"], ["b/y", "a/y"], tmp_path / "j.onnx")
    joined = onnx.load(str(tmp_path / "j.onnx"))
    onnx.checker.check_model(joined)
    assert [i.name for i in joined.graph.input] == ["a/x", "s"]
    assert [n.name for n in joined.graph.node] == ["a//Add", "b//Mul"]
    x, s = np.array([1.0, 2.0], np.float32), np.array([3.0, 4.0], np.float32)
    b_y, a_y = session(joined).run(None, {"a/x": x, "s": s})
    np.testing.assert_array_equal(a_y, x + s)
    np.testing.assert_array_equal(b_y, (x + s) * s)
    with pytest.raises(PipelineError, match="join: no part has the outputs c/y"):
        join([("a", part("Add"))], {}, [], ["c/y"], tmp_path / "k.onnx")
