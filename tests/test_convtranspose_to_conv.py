"""convtranspose_to_conv: a 1-D ConvTranspose becomes a polyphase Conv with the same numbers, in its block, and the
`quantize` pass then quantizes that Conv (it cannot quantize a ConvTranspose)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from pass_checks import Applied, check_input_unchanged, check_scope, check_stats

from tiny import two_upsamplers

from passes import get_pass
from passes.base import PassContext
from pipeline.core.blocks import BlockPartition
from pipeline.core.errors import PipelineError
from pipeline.core.onnx_io import session

UPS = "/dec/ups.0/ConvTranspose"


def upsampler(c_in: int, c_out: int, k: int, s: int, pads=(0, 0), output_padding: int = 0, group: int = 1,
              bias: bool = True, dilation: int = 1, seed: int = 0, opset: int = 17, **attrs) -> onnx.ModelProto:
    """x [N, C_in, T] -> /dec/ups.0/ConvTranspose (seeded weights) -> y: the graph output is the node's output."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((c_in, c_out // group, k)).astype(np.float32), "ups.weight")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "ups.bias"))
    node = helper.make_node("ConvTranspose", ["x", *[t.name for t in inits]], ["y"], name=UPS, strides=[s],
                            kernel_shape=[k], pads=list(pads), output_padding=[output_padding], group=group,
                            dilations=[dilation], **attrs)
    graph = helper.make_graph([node], "ups", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, "T"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c_out, "T_out"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def rewrite(model: onnx.ModelProto, selected: set[str] | None = None, **params):
    p = get_pass("convtranspose_to_conv")
    return p.apply(model, p.Params(**params), PassContext("model", BlockPartition(model), selected, Path(".")))


def assert_same_output(model: onnx.ModelProto, out: onnx.ModelProto, c_in: int, lengths=(7, 12), batch: int = 1):
    """Both graphs on inputs of each length, the rewritten one through ONE session (its time axis is symbolic)."""
    ref, got = session(model), session(out)
    rng = np.random.default_rng(11)
    for t in lengths:
        x = rng.standard_normal((batch, c_in, t)).astype(np.float32)
        want = ref.run(None, {"x": x})[0]
        have = got.run(None, {"x": x})[0]
        assert have.shape == want.shape, f"T={t}: {have.shape} != {want.shape}"
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


# (C_in, C_out, K, stride, pads, output_padding, group, bias, dilation)
GRID = [
    pytest.param(8, 4, 20, 10, (5, 5), 0, 1, True, 1, id="hifigan-ups0-s10-k20"),
    pytest.param(4, 2, 12, 6, (3, 3), 0, 1, True, 1, id="hifigan-ups1-s6-k12"),
    pytest.param(6, 1, 20, 5, (0, 0), 0, 1, False, 1, id="istft-s5-k20-nobias"),
    pytest.param(8, 8, 3, 2, (1, 1), 1, 8, True, 1, id="depthwise-s2-k3-op1"),
    pytest.param(4, 8, 3, 2, (1, 1), 1, 4, False, 1, id="depthwise-multiplier2"),
    pytest.param(6, 4, 11, 5, (7, 2), 1, 2, True, 1, id="grouped-s5-k11-asym"),
    pytest.param(3, 5, 4, 2, (0, 0), 0, 1, True, 1, id="s2-k4-nopad"),
    pytest.param(3, 5, 3, 2, (0, 2), 1, 1, False, 1, id="s2-k3-asym-op1"),
    pytest.param(3, 2, 3, 5, (0, 0), 0, 1, True, 1, id="k-under-s5"),
    pytest.param(3, 2, 3, 6, (1, 2), 1, 1, True, 1, id="k-under-s6-asym-op1"),
    pytest.param(4, 3, 7, 10, (4, 0), 9, 1, True, 1, id="k-under-s10-op9"),
    pytest.param(4, 3, 13, 6, (0, 5), 5, 1, False, 1, id="s6-k13-endpad-op5"),
    pytest.param(4, 3, 9, 5, (9, 9), 0, 1, True, 1, id="pads-over-stride"),
    pytest.param(3, 4, 4, 3, (1, 1), 1, 1, True, 2, id="dilation2"),
]


@pytest.mark.parametrize("c_in, c_out, k, s, pads, op, group, bias, dilation", GRID)
def test_rewrite_is_exact_for_any_length(c_in, c_out, k, s, pads, op, group, bias, dilation):
    model = upsampler(c_in, c_out, k, s, pads, op, group, bias, dilation)
    result = rewrite(model, expect_min_nodes=1)
    ops = Counter(n.op_type for n in result.model.graph.node)
    assert ops["ConvTranspose"] == 0 and ops["Conv"] == 1
    conv = next(n for n in result.model.graph.node if n.op_type == "Conv")
    weight = next(t for t in result.model.graph.initializer if t.name == conv.input[1])
    assert list(weight.dims) == [c_out * s, c_in // group, -(-((k - 1) * dilation + 1) // s)]  # polyphase, not zeros
    assert_same_output(model, result.model, c_in, batch=2 if group > 1 else 1)


@pytest.mark.parametrize("opset", [7, 9, 10])
def test_old_opsets_get_the_slice_they_define(opset):
    """Slice takes its bounds as attributes below opset 10, as inputs from 10 on: either way a valid, exact graph."""
    model = upsampler(4, 3, 8, 4, (2, 3), 1, opset=opset)
    out = rewrite(model, expect_min_nodes=1).model
    onnx.checker.check_model(out, full_check=True)
    slice_ = next(n for n in out.graph.node if n.op_type == "Slice")
    assert (len(slice_.input), len(slice_.attribute)) == ((1, 3) if opset < 10 else (4, 0))
    assert_same_output(model, out, 4)


def test_new_nodes_are_named_under_the_replaced_node_and_stay_in_its_block():
    model = upsampler(4, 2, 12, 6, (3, 3))
    result = rewrite(model)
    out = result.model
    new = {n.name for n in out.graph.node}
    assert new == result.placed == {f"{UPS}/polyphase/{op}" for op in ("Conv", "Reshape", "Transpose", "Slice")} | \
        {f"{UPS}/polyphase/Reshape_1"}
    blocks = BlockPartition(out).node_block
    assert {blocks[name] for name in new} == {BlockPartition(model).node_block[UPS]}
    assert [o.name for o in out.graph.output] == ["y"]
    assert {t.name for t in out.graph.initializer}.isdisjoint({"ups.weight", "ups.bias"})  # the old ones dropped
    assert result.stats["rewritten"] == [{"node": UPS, "into": f"{UPS}/polyphase/Conv", "stride": 6, "kernel": 12,
                                          "group": 1, "phase_kernel": 2}]


def test_only_the_scoped_block_is_rewritten(tmp_path):
    model = two_upsamplers()
    blocks = BlockPartition(model)
    selected = {n for n, b in blocks.node_block.items() if b == blocks.node_block["/dec/ups.1/ConvTranspose"]}
    before = model.SerializeToString()
    result = rewrite(model, selected)
    applied = Applied(type(get_pass("convtranspose_to_conv")), model, before, result, selected)
    check_input_unchanged(applied)
    check_scope(applied)
    check_stats(applied, None)
    assert [r["node"] for r in result.stats["rewritten"]] == ["/dec/ups.1/ConvTranspose"]
    assert result.stats["skipped"] == []  # out of scope is not "skipped": it was never asked for
    assert result.stats["convtranspose_before"] == 2 and result.stats["convtranspose_after"] == 1
    assert_same_output(model, result.model, 6)


def test_stride_one_is_left_alone_unless_min_stride_allows_it():
    model = two_upsamplers(stride_1=1)
    result = rewrite(model)
    assert result.stats["skipped"] == [{"node": "/dec/ups.1/ConvTranspose",
                                        "reason": "stride 1 is under min_stride 2"}]
    assert [n.name for n in result.model.graph.node if n.op_type == "ConvTranspose"] == ["/dec/ups.1/ConvTranspose"]
    every = rewrite(model, min_stride=1)
    assert not any(n.op_type == "ConvTranspose" for n in every.model.graph.node)
    assert_same_output(model, every.model, 6)


@pytest.mark.parametrize("change, reason", [
    ("weight_input", "its weight is computed in the graph, not a constant"),
    ("two_d", "it is 2-D, not 1-D"),
    ("same_upper", "auto_pad SAME_UPPER (only explicit pads and VALID are rewritten)"),
    ("output_shape", "it sets output_shape (only explicit pads are rewritten)"),
])
def test_what_it_cannot_rewrite_is_left_alone_with_the_reason(change, reason):
    if change == "two_d":
        w = numpy_helper.from_array(np.ones((2, 2, 3, 3), np.float32), "w")
        node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name=UPS, strides=[2, 2])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    elif change == "weight_input":
        model = upsampler(3, 2, 4, 2, bias=False)
        model.graph.input.append(helper.make_tensor_value_info("ups.weight", TensorProto.FLOAT, [3, 2, 4]))
        del model.graph.initializer[:]
    else:
        attrs = {"same_upper": {"auto_pad": "SAME_UPPER"}, "output_shape": {"output_shape": [20]}}[change]
        model = upsampler(3, 2, 4, 2, **attrs)
        for a in [a for a in model.graph.node[0].attribute if a.name == "pads" or
                  (change == "same_upper" and a.name == "output_padding")]:
            model.graph.node[0].attribute.remove(a)
    result = rewrite(model)
    assert not result.changed and result.stats["skipped"] == [{"node": UPS, "reason": reason}]
    assert result.model.graph.node[0].op_type == "ConvTranspose"


def test_expect_min_nodes_fails_in_one_line_with_the_reason():
    with pytest.raises(PipelineError) as err:
        rewrite(two_upsamplers(stride_1=1), expect_min_nodes=2)
    text = str(err.value)
    assert "\n" not in text
    assert text == ("convtranspose_to_conv on 'model': expected at least 2 rewritten ConvTransposes, got 1 (node "
                    "'/dec/ups.1/ConvTranspose': stride 1 is under min_stride 2)")
    with pytest.raises(PipelineError, match=r"got 0 \(no ConvTranspose in the step's scope\)"):
        rewrite(two_upsamplers(), selected={"/dec/LeakyRelu"}, expect_min_nodes=1)


def test_quantize_quantizes_the_rewritten_conv_and_not_the_convtranspose(tmp_path):
    """The reason for the pass: ORT's quantizers give a ConvTranspose no integer form; the polyphase Conv gets one."""
    model = upsampler(4, 3, 8, 4, (2, 2), bias=True)
    rewritten = rewrite(model).model
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 4, t)).astype(np.float32)} for t in (9, 14)]
    quantize = get_pass("quantize")

    def quantized(m, **params):
        ctx = PassContext("g", BlockPartition(m), None, tmp_path, calibration=lambda: iter(feeds))
        return Counter(n.op_type for n in quantize.apply(m, quantize.Params(**params), ctx).model.graph.node)

    assert quantized(model, mode="static", format="qoperator")["ConvTranspose"] == 1
    assert quantized(model, mode="dynamic")["ConvTranspose"] == 1
    assert quantized(rewritten, mode="static", format="qoperator", op_types=["Conv"], expect_min_nodes=1)[
        "QLinearConv"] == 1
    assert quantized(rewritten, mode="dynamic", op_types=["Conv"], expect_min_nodes=1)["ConvInteger"] == 1
    ctx = PassContext("g", BlockPartition(rewritten), None, tmp_path, calibration=lambda: iter(feeds))
    qdq = quantize.apply(rewritten, quantize.Params(mode="static", op_types=["Conv"], expect_min_nodes=1), ctx).model
    conv = next(n for n in qdq.graph.node if n.op_type == "Conv")
    made = {o: n.op_type for n in qdq.graph.node for o in n.output}
    assert [made.get(i) for i in conv.input[:2]] == ["DequantizeLinear", "DequantizeLinear"]
    x = feeds[0]["x"]
    want = session(model).run(None, {"x": x})[0]
    err = session(qdq).run(None, {"x": x})[0] - want
    assert 10 * np.log10(np.sum(want ** 2) / np.sum(err ** 2)) > 25  # INT8, and still the same upsampler
