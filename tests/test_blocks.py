from __future__ import annotations

import onnx
import pytest
import tiny

from pipeline.core.blocks import BlockPartition, adopt_new_nodes, default_block_id
from pipeline.core.errors import PipelineError
from pipeline.core.recipe import BlockSpec, Scope


@pytest.mark.parametrize("name, block", [
    ("/enc_p/encoder/attn_layers.3/conv_q/Conv", "/enc_p/encoder/attn_layers.3"),
    ("/dec/ups.0/ConvTranspose", "/dec/ups.0"),
    ("/dec/resblocks.4/convs1.2/Conv", "/dec/resblocks.4"),
    ("/enc_p/emb/Gather", "/enc_p"),
    ("/Gather_1", "/"),
    ("Tanh_6089", "/"),
    ("", "/"),
])
def test_default_block_id(name, block):
    assert default_block_id(name) == block


def test_partition_counts_nodes_and_params():
    p = BlockPartition(tiny.conv_net(channels=8, layers=3))
    assert p.ids() == ["/enc/layers.0", "/enc/layers.1", "/enc/layers.2", "/dec"]
    b0 = p.blocks["/enc/layers.0"]
    assert len(b0.nodes) == 2 and b0.op_types["Conv"] == 1
    assert b0.params == 8 * 4 * 3 + 8
    assert p.blocks["/dec"].params == 1 * 8 * 1 + 1  # proj weight + the 'half' scalar


def test_regex_blocks_capture_groups_form_the_id():
    spec = BlockSpec(patterns=[r"^/(enc)/layers\.(\d+)/", r"^/(dec)/"])
    p = BlockPartition(tiny.conv_net(), spec)
    assert p.ids() == ["enc/0", "enc/1", "enc/2", "dec"]


def test_unmatched_nodes_go_to_rest():
    p = BlockPartition(tiny.conv_net(), BlockSpec(patterns=[r"^/enc/layers\.(\d+)/"], rest="other"))
    assert p.ids() == ["0", "1", "2", "other"]


def test_scope_include_exclude_and_errors():
    p = BlockPartition(tiny.conv_net())
    nodes = p.select(Scope(include=[r"/enc/.*"], exclude=[r"/enc/layers\.1"]))
    assert nodes == {"/enc/layers.0/conv/Conv", "/enc/layers.0/Relu", "/enc/layers.2/conv/Conv", "/enc/layers.2/Relu"}
    with pytest.raises(PipelineError, match="include pattern '/enc/layer' matches no block"):
        p.select(Scope(include=["/enc/layer"]))  # full match, not search
    with pytest.raises(PipelineError, match="exclude pattern 'nothing' matches no block"):
        p.select(Scope(exclude=["nothing"]))


def test_adopt_new_nodes_moves_them_into_the_served_block():
    model = tiny.conv_net()
    old = {n.name for n in model.graph.node}
    conv = next(n for n in model.graph.node if n.name == "/enc/layers.1/conv/Conv")
    # What a quantizer adds: a weight DequantizeLinear named after the weight.
    dq = onnx.helper.make_node("DequantizeLinear", ["w_q", "s"], ["w_dq"], name="enc.layers.1.conv.weight_DequantizeLinear")
    conv.input[1] = "w_dq"
    model.graph.node.insert(0, dq)
    unnamed = onnx.helper.make_node("Identity", ["/enc/layers.0/Relu_output_0"], ["ident"])
    model.graph.node.append(unnamed)
    assert adopt_new_nodes(model, old, None) == 2
    # Protobuf copies on insert: look the nodes up again.
    dq, unnamed = (next(n for n in model.graph.node if n.output[0] == out) for out in ("w_dq", "ident"))
    assert dq.name == "/enc/layers.1/conv/enc.layers.1.conv.weight_DequantizeLinear"
    # Unnamed: first named after its op and index, then moved to its producer's scope.
    assert unnamed.name == "/enc/layers.0/Identity_10"
    assert default_block_id(dq.name) == "/enc/layers.1"



def _weighted_nodes(names: list[str], sizes: list[int], namespaces: list[str] | None = None) -> onnx.ModelProto:
    """A graph of MatMuls (never run: only its blocks are read), node `i` named `names[i]` with a weight of
    `sizes[i]` elements, and `namespaces[i]` as its `namespace` metadata where given."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    for i, (name, size) in enumerate(zip(names, sizes)):
        inits.append(numpy_helper.from_array(np.zeros((1, size), np.float32), f"w{i}"))
        node = helper.make_node("MatMul", ["x", f"w{i}"], [f"t{i}"], name=name)
        if namespaces:
            node.metadata_props.add(key="namespace", value=namespaces[i])
        nodes.append(node)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                              [helper.make_tensor_value_info(f"t{i}", TensorProto.FLOAT, None)
                               for i in range(len(nodes))], inits)
    return helper.make_model(graph)


def test_default_blocks_from_the_dynamo_exporters_namespace_equal_the_named_scopes():
    # The dynamo exporter names nodes `node_<fx name>` and writes the module path as `namespace` metadata
    # (torch/onnx/_internal/exporter/_core.py, `_get_node_namespace`): `: <root class>/<qualified name>: <class>/...`.
    scoped = ["/enc_p/encoder/attn_layers.3/conv_q/MatMul", "/enc_p/emb/MatMul", "/dec/ups.0/MatMul", "/Gather"]
    namespaces = [": Voice/enc_p: Enc/enc_p.encoder: Encoder/enc_p.encoder.attn_layers.3: Attn/"
                  "enc_p.encoder.attn_layers.3.conv_q: Conv1d/conv1d: aten.conv1d.default",
                  ": Voice/enc_p: Enc/enc_p.emb: Embedding/embedding: aten.embedding.default",
                  ": Voice/dec: Generator/dec.ups.0: ConvTranspose1d/conv_transpose1d: aten.conv_transpose1d.input",
                  "gather: aten.gather.default"]
    by_name = BlockPartition(_weighted_nodes(scoped, [1, 1, 1, 1]))
    by_namespace = BlockPartition(_weighted_nodes([f"node_{i}" for i in range(4)], [1, 1, 1, 1], namespaces))
    assert by_namespace.ids() == by_name.ids() == ["/enc_p/encoder/attn_layers.3", "/enc_p", "/dec/ups.0", "/"]


def test_a_block_holding_most_of_the_weights_is_split_down_to_modules_that_mean_something():
    # No indexed module anywhere: the default would be one block, `/model`, holding everything.
    names = ["/model/encoder/conv/MatMul", "/model/decoder/pre/MatMul", "/model/decoder/post/MatMul", "/model/Mul"]
    p = BlockPartition(_weighted_nodes(names, [10, 45, 45, 0]))
    # `/model` splits; `/model/decoder` (90%) would split only into single modules (pre, post): it is the unit.
    assert p.ids() == ["/model/encoder", "/model/decoder", "/model"]
    assert p.blocks["/model/decoder"].params == 90


def test_an_indexed_module_or_a_small_block_is_never_split():
    layer = BlockPartition(_weighted_nodes(["/h.0/attn/c_attn/MatMul", "/h.0/mlp/c_fc/MatMul", "/ln_f/MatMul"],
                                           [40, 50, 10]))
    assert layer.ids() == ["/h.0", "/ln_f"]  # a one-layer graph's layer holds 90%: it stays the layer
    spread = BlockPartition(_weighted_nodes(["/enc/a/x/MatMul", "/enc/b/y/MatMul", "/dec/c/z/MatMul"], [25, 25, 50]))
    assert spread.ids() == ["/enc", "/dec"]  # 50% is not most
