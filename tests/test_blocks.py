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
