"""Passes on tiny models, run through real ONNX Runtime sessions."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import tiny

from passes import PASSES, get_pass
from passes.base import PassContext
from pipeline.core.blocks import BlockPartition
from pipeline.core.errors import PipelineError
from pipeline.core.onnx_io import session
from pipeline.core.recipe import Scope


def ctx_for(model, tmp_path, scope: Scope | None = None, feeds=None) -> PassContext:
    blocks = BlockPartition(model)
    selected = None if scope is None else blocks.select(scope)
    return PassContext("model", blocks, selected, tmp_path, calibration=(lambda: iter(feeds)) if feeds else None)


def run(model, x):
    return session(model).run(None, {"x": x})[0]


def feeds(n=8, seed=3):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 4, 16 + 8 * (i % 3))).astype(np.float32)} for i in range(n)]


def apply(name, model, tmp_path, params=None, **ctx):
    p = get_pass(name)
    return p.apply(model, p.Params.model_validate(params or {}), ctx_for(model, tmp_path, **ctx))


def test_every_pass_has_doc_and_strict_params():
    for name, cls in PASSES.items():
        assert cls.__doc__ or cls.__module__, name
        with pytest.raises(Exception, match="Extra inputs are not permitted"):
            cls.Params.model_validate({"no_such_key": 1})


def test_simplify_folds_constants_and_keeps_output(tmp_path):
    model = tiny.conv_net()
    result = apply("simplify", model, tmp_path)
    ops = [n.op_type for n in result.model.graph.node]
    assert "Add" not in ops  # 0.5 + 0.5 folded
    assert result.stats["nodes_after"] < result.stats["nodes_before"]
    x = feeds(1)[0]["x"]
    np.testing.assert_allclose(run(result.model, x), run(model, x), rtol=1e-5, atol=1e-6)
    names = {n.name for n in result.model.graph.node}
    assert "/enc/layers.1/conv/Conv" in names  # names survive, so scopes still resolve


def test_dynamic_quantize_scoped_to_one_block(tmp_path):
    model = tiny.conv_net()
    result = apply("quantize", model, tmp_path, {"mode": "dynamic", "op_types": ["Conv"]},
                   scope=Scope(include=[r"/enc/layers\.2"]))
    assert result.stats["quantized_per_block"] == {"/enc/layers.2": 1}
    integer = [n.name for n in result.model.graph.node if n.op_type == "ConvInteger"]
    assert len(integer) == 1 and integer[0].startswith("/enc/layers.2/")
    x = feeds(1)[0]["x"]
    ref, out = run(model, x), run(result.model, x)
    assert 20 < 20 * np.log10(np.linalg.norm(ref) / np.linalg.norm(ref - out)) < 80


def test_static_quantize_uses_calibration_and_is_close(tmp_path):
    model = tiny.conv_net()
    result = apply("quantize", model, tmp_path, {"mode": "static", "op_types": ["Conv"]}, feeds=feeds())
    per_block = result.stats["quantized_per_block"]
    assert per_block == {"/enc/layers.0": 1, "/enc/layers.1": 1, "/enc/layers.2": 1, "/dec": 1}
    assert result.stats["quantize_linear"] > 0
    x = feeds(1, seed=9)[0]["x"]
    ref, out = run(model, x), run(result.model, x)
    # 8-bit activations on a 3-layer net: 25.x dB with ORT 1.31, 24.9 dB with 1.32's calibrator.
    assert 20 * np.log10(np.linalg.norm(ref) / np.linalg.norm(ref - out)) > 24


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibration_takes_samples_of_different_lengths(tmp_path, method):
    """ORT stacks every sample's activations for its histogram methods (one shape for all); the pass feeds them
    one sample a call, so sentences of any length calibrate (the feeds here are 16, 24 and 32 frames long)."""
    model = tiny.conv_net()
    samples = feeds()
    assert len({f["x"].shape for f in samples}) == 3
    result = apply("quantize", model, tmp_path, {"mode": "static", "op_types": ["Conv"],
                                                  "calibration_method": method}, feeds=samples)
    assert result.stats["nodes_quantized"] == 4
    x = feeds(1, seed=9)[0]["x"]
    ref, out = run(model, x), run(result.model, x)
    assert 20 * np.log10(np.linalg.norm(ref) / np.linalg.norm(ref - out)) > 20


def test_static_quantize_without_calibration_is_an_error(tmp_path):
    with pytest.raises(PipelineError, match="needs calibration data"):
        apply("quantize", tiny.conv_net(), tmp_path, {"mode": "static"})


def test_get_pass_unknown_lists_known():
    with pytest.raises(PipelineError, match="known passes: .*quantize.*simplify"):
        get_pass("fuse_everything")


def test_simplify_failure_is_clear_or_skipped(tmp_path):
    # onnxsim's output check needs fixed input shapes; the tiny model's time axis is dynamic.
    model = tiny.conv_net()
    with pytest.raises(PipelineError, match="simplify failed.*dynamic size.*on_error: skip"):
        apply("simplify", model, tmp_path, {"check_n": 1})
    skipped = apply("simplify", model, tmp_path, {"check_n": 1, "on_error": "skip"})
    assert skipped.changed is False and "dynamic size" in skipped.stats["skipped"]


def test_fp16_halves_weights_and_keeps_out_of_scope_blocks_fp32(tmp_path):
    model = tiny.conv_net(channels=16)
    result = apply("fp16", model, tmp_path, {"overflow_guard": False}, scope=Scope(exclude=[r"/enc/layers\.0"]))
    m16 = result.model
    dtypes = {t.name: t.data_type for t in m16.graph.initializer}
    assert dtypes["enc.layers.0.conv.weight"] == onnx.TensorProto.FLOAT  # kept block
    assert dtypes["enc.layers.1.conv.weight"] == onnx.TensorProto.FLOAT16
    assert result.stats["nodes_kept_fp32"] == {"out of scope": 2}
    assert [i.type.tensor_type.elem_type for i in m16.graph.input] == [onnx.TensorProto.FLOAT]  # keep_io_types
    x = feeds(1)[0]["x"]
    ref, out = run(model, x), run(m16, x)
    assert out.dtype == np.float32
    assert 20 * np.log10(np.linalg.norm(ref) / np.linalg.norm(ref - out)) > 40


def test_fp16_overflow_guard_keeps_huge_activations_fp32(tmp_path):
    model = tiny.conv_net()
    big = [{"x": f["x"] * 3e4} for f in feeds(3)]  # activations past FP16's range
    result = apply("fp16", model, tmp_path, {}, feeds=big)
    assert "/enc/layers.0/conv/Conv" in result.stats["overflow_nodes"]
    assert result.stats["nodes_kept_fp32"].get("overflow", 0) >= 1
    out = run(result.model, big[0]["x"])
    assert np.isfinite(out).all()


def test_fp16_unknown_node_in_block_list_is_an_error(tmp_path):
    with pytest.raises(PipelineError, match="node_block_list names no node: /enc/nope"):
        apply("fp16", tiny.conv_net(), tmp_path, {"node_block_list": ["/enc/nope"], "overflow_guard": False})


def test_fp16_on_the_piper_voice_loads_and_keeps_lengths(tmp_path, piper_model):
    """The converter alone breaks this voice at /enc_p/Cast_1; the pass must not."""
    from calibration import SourceContext, checked_feeds
    from pipeline.families import make_source
    from pipeline.core.blocks import name_all_nodes

    model = onnx.load(str(piper_model))
    name_all_nodes(model)
    blocks = BlockPartition(model)
    selected = blocks.select(Scope(exclude=[r"/dp/flows\.\d+", "/"]))
    ctx = PassContext("model", blocks, selected, tmp_path)
    p = get_pass("fp16")
    result = p.apply(model, p.Params(overflow_guard=False), ctx)
    assert "/enc_p/Cast_1" in result.stats["cast_targets_fixed"]
    assert result.stats["fp16_round_trips_removed"] > 0
    feed = checked_feeds(make_source("piper", {"count": 2}, SourceContext(piper_model)), model)
    ref_sess, cand_sess = session(model), session(result.model)
    for f in feed:
        ref, cand = ref_sess.run(None, f)[0], cand_sess.run(None, f)[0]
        assert ref.shape == cand.shape
        assert 20 * np.log10(np.linalg.norm(ref) / np.linalg.norm(ref - cand)) > 15


@pytest.mark.parametrize("dtype, ratio, min_sqnr", [("int8", 0.30, 30), ("fp16", 0.55, 60)])
def test_compress_weights_shrinks_and_ort_folds_it(tmp_path, dtype, ratio, min_sqnr):
    model = tiny.conv_net(channels=32)
    result = apply("compress_weights", model, tmp_path, {"dtype": dtype, "min_elements": 64},
                   scope=Scope(include=[r"/enc/layers\.[12]"]))
    assert result.stats["tensors"] == 2  # layer 0 out of scope; biases below min_elements
    assert result.stats["bytes_after"] <= ratio * result.stats["bytes_before"]
    assert set(result.stats["tensors_per_block"]) == {"/enc/layers.1", "/enc/layers.2"}
    names = {t.name for t in result.model.graph.initializer}
    assert "enc.layers.0.conv.weight" in names and "enc.layers.1.conv.weight" not in names
    x = feeds(1)[0]["x"]
    ref, out = run(model, x), run(result.model, x)
    assert 20 * np.log10(np.linalg.norm(ref) / np.linalg.norm(ref - out)) > min_sqnr
    # ORT folds the Cast/Mul into constants: the optimized graph has no decompression nodes left.
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(result.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    assert not [n for n in optimized.graph.node if n.op_type in ("Cast", "Mul", "DequantizeLinear")
                and n.input[0].endswith(("_int8", "_fp16"))]


def test_compress_weights_int8_is_per_channel():
    from passes.compress_weights import _compress

    w = np.stack([np.linspace(-1, 1, 12), np.linspace(-100, 100, 12)]).reshape(2, 3, 4).astype(np.float32)
    nodes, (q, scale), out = _compress("w", w, "int8", "Conv")
    scale = onnx.numpy_helper.to_array(scale)
    assert scale.shape == (2, 1, 1)
    np.testing.assert_allclose(scale.ravel(), [1 / 127, 100 / 127], rtol=1e-6)
    assert onnx.numpy_helper.to_array(q).dtype == np.int8


def test_compress_weights_stores_an_lstms_w_and_r_in_int8_per_gate_row(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    hidden, inputs = 16, 8
    w = numpy_helper.from_array(rng.normal(size=(2, 4 * hidden, inputs)).astype(np.float32), "W")
    r = numpy_helper.from_array(rng.normal(size=(2, 4 * hidden, hidden)).astype(np.float32) * 0.1, "R")
    lstm = helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="/rnn/LSTM", hidden_size=hidden,
                            direction="bidirectional")
    graph = helper.make_graph([lstm], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, inputs])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, r])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = apply("compress_weights", model, tmp_path, {"dtype": "int8", "min_elements": 64})
    assert result.stats["tensors"] == 2
    scales = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name.endswith("_scale")}
    assert {k: v.shape for k, v in scales.items()} == {"W_scale": (2, 4 * hidden, 1), "R_scale": (2, 4 * hidden, 1)}
    x = rng.normal(size=(5, 1, inputs)).astype(np.float32)
    ref, out = (session(m).run(None, {"x": x})[0] for m in (model, result.model))
    assert 20 * np.log10(np.linalg.norm(ref) / np.linalg.norm(ref - out)) > 35


def test_compress_weights_expectation(tmp_path):
    with pytest.raises(PipelineError, match="expected at least 9 weights, found"):
        apply("compress_weights", tiny.conv_net(), tmp_path, {"dtype": "int8", "expect_min_tensors": 9})


def test_scope_nodes_filter_narrows_inside_blocks():
    p = BlockPartition(tiny.conv_net())
    assert p.select(Scope(include=[r"/enc/.*"], nodes=[r"/Relu$"])) == {
        "/enc/layers.0/Relu", "/enc/layers.1/Relu", "/enc/layers.2/Relu"}
    with pytest.raises(PipelineError, match="nodes pattern 'Softmax' matches no node"):
        p.select(Scope(include=[r"/enc/.*"], nodes=["Softmax"]))


@pytest.mark.parametrize("name, params", [
    ("simplify", {}), ("fp16", {"overflow_guard": False}), ("quantize", {"mode": "dynamic"}),
    ("compress_weights", {"dtype": "int8", "min_elements": 8}),
])
def test_passes_leave_their_input_model_unchanged(tmp_path, name, params):
    model = tiny.conv_net()
    before = model.SerializeToString()
    result = apply(name, model, tmp_path, params)
    assert result.changed
    assert model.SerializeToString() == before
