"""quantize weight_only in 4 bits: the `rtn`, `hqq` and `gptq` methods, on tiny MatMul nets run by ONNX Runtime.

The nets are built here: x [1, T, 128] -> /enc/layers.0 MatMul (128 -> 64) + Relu -> /enc/layers.1 MatMul
(64 -> 64) + Relu -> /enc/layers.2 MatMul (64 -> 32) -> y, seeded Gaussian weights. "Correlated" inputs are
rank-16 mixtures plus a little noise, the way transformer hidden states crowd into few directions: the case
GPTQ is for.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from pass_checks import Applied, check_input_unchanged, check_scope, check_stats

from passes import get_pass
from passes.base import PassContext
from pipeline.core.feeds import Feeds
from passes.quantize import _gptq, _ListReader
from pipeline.core.blocks import BlockPartition
from pipeline.core.errors import PipelineError
from pipeline.core.onnx_io import session
from pipeline.core.recipe import Scope

METHODS = ["rtn", "hqq", "gptq"]


def matmul_net(dims=(128, 64, 64, 32), seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for i, (k, n) in enumerate(zip(dims[:-1], dims[1:])):
        scope, w = f"/enc/layers.{i}", f"enc.layers.{i}.weight"
        inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), w))
        nodes.append(helper.make_node("MatMul", [current, w], [f"{scope}/MatMul_output_0"], name=f"{scope}/MatMul"))
        current = f"{scope}/MatMul_output_0"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"{scope}/Relu_output_0"], name=f"{scope}/Relu"))
            current = f"{scope}/Relu_output_0"
    nodes.append(helper.make_node("Identity", [current], ["y"], name="/out/Identity"))
    graph = helper.make_graph(nodes, "tiny_nbits",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", dims[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", dims[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def gaussian(n: int, seed: int, k: int = 128, t: int = 32) -> list[Feeds]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, t, k)).astype(np.float32)} for _ in range(n)]


def correlated(n: int, seed: int, k: int = 128, t: int = 32, rank: int = 16) -> list[Feeds]:
    mix = np.random.default_rng(7).standard_normal((rank, k))  # the same directions for every seed
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((1, t, rank)) @ mix + 0.05 * rng.standard_normal((1, t, k)))
             .astype(np.float32)} for _ in range(n)]


def quantize(model, tmp_path, feeds=None, scope: str | None = None, **params):
    p = get_pass("quantize")
    blocks = BlockPartition(model)
    selected = None if scope is None else blocks.select(Scope(include=[scope.replace(".", r"\.")]))
    ctx = PassContext("model", blocks, selected, tmp_path,
                      calibration=(lambda: iter(feeds)) if feeds is not None else None)
    return p.apply(model, p.Params.model_validate({"mode": "weight_only", **params}), ctx), selected


def sqnr(model, quantized, feeds: list[Feeds]) -> float:
    x = np.concatenate([f["x"] for f in feeds], axis=1)
    ref = session(model).run(None, {"x": x})[0]
    out = session(quantized).run(None, {"x": x})[0]
    return float(20 * np.log10(np.linalg.norm(ref) / np.linalg.norm(ref - out)))


def nbits_nodes(model):
    return {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute}
            for n in model.graph.node if n.op_type == "MatMulNBits"}


# Measured on this net and these seeds (ORT 1.32, CPU), output SQNR on white Gaussian inputs: block 32: rtn 16.8 dB,
# hqq 19.2, gptq 17.8 (on white inputs GPTQ has no correlation to use); block 16: rtn 17.9, hqq 20.4, gptq 19.5.
# Other weight seeds move them by about 1 dB. (8 bits: about 40 dB; each bit less costs about 6 dB.)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("block", [16, 32])
def test_each_method_writes_4_bit_nodes_close_to_fp32(tmp_path, method, block):
    model = matmul_net()
    before = model.SerializeToString()
    result, _ = quantize(model, tmp_path, gaussian(8, 1), bits=4, block_size=block, method=method)
    nodes = nbits_nodes(result.model)
    assert sorted(nodes) == [f"/enc/layers.{i}/MatMul_Q4" for i in range(3)]
    assert {(a["bits"], a["block_size"]) for a in nodes.values()} == {(4, block)}
    assert [(a["K"], a["N"]) for a in nodes.values()] == [(128, 64), (64, 64), (64, 32)]
    assert {k: result.stats[k] for k in ("method", "bits", "block_size", "accuracy_level")} == {
        "method": method, "bits": 4, "block_size": block, "accuracy_level": 4}
    assert result.stats["nodes_quantized"] == 3
    onnx.checker.check_model(result.model)
    assert 15 < sqnr(model, result.model, gaussian(4, 2)) < 30
    assert model.SerializeToString() == before


def test_rtn_is_ort_default_quantizer_unchanged(tmp_path):
    """`method: rtn` (the default) is today's path: the bytes ORT's DefaultWeightOnlyQuantConfig writes."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    for bits in (8, 4):
        model = matmul_net()
        result, _ = quantize(model, tmp_path, bits=bits, block_size=32)
        config = nbits.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4, bits=bits,
                                                    op_types_to_quantize=("MatMul",))
        direct = nbits.MatMulNBitsQuantizer(copy.deepcopy(model), algo_config=config)
        direct.process()
        onnx.save(direct.model.model, str(tmp_path / "direct.onnx"))
        assert result.model.SerializeToString() == onnx.load(str(tmp_path / "direct.onnx")).SerializeToString()
        explicit, _ = quantize(model, tmp_path, bits=bits, block_size=32, method="rtn")
        assert explicit.model.SerializeToString() == result.model.SerializeToString()


# Layer 0 alone (its input is the net's, rank 16), block 32, on held-out correlated inputs, measured: rtn 21.2 dB,
# hqq 22.9, gptq 31.0; gptq calibrated on white inputs 21.0; ORT's own GPTQ (no error feedback) 22.0. Seeds 1 and 2
# of the weights: gptq 30.6-31.1 against at most 23.2 for the others. (All three layers quantized, the ReLU
# outputs feeding layers 1 and 2 are far less correlated: rtn 16.9, hqq 19.1, gptq 22.2.)
def test_gptq_uses_the_calibration_data(tmp_path):
    from onnxruntime.quantization.neural_compressor import weight_only

    import passes.quantize

    model = matmul_net()
    held_out = correlated(4, 2)

    def measure(method, feeds):
        result, _ = quantize(model, tmp_path, feeds, scope="/enc/layers.0", bits=4, block_size=32, method=method)
        return sqnr(model, result.model, held_out)

    got = {m: measure(m, correlated(8, 1)) for m in METHODS}
    got["gptq_on_white"] = measure("gptq", gaussian(8, 1))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(passes.quantize, "_gptq", weight_only.gptq)
        got["ort_gptq"] = measure("gptq", correlated(8, 1))
    others = {k: v for k, v in got.items() if k != "gptq"}
    # The feeds, not the method alone, make the difference; and ORT's GPTQ as shipped would not.
    assert got["gptq"] > max(others.values()) + 6, got


def test_ort_gptq_still_ignores_the_hessian():
    """ORT 1.32's `weight_only.gptq` reads the zero triangle of its Cholesky factor, so the Hessian changes
    nothing: `passes.quantize._gptq` replaces it. When this fails, ORT has changed it: check whether its
    version now matches `_gptq` (then drop the replacement) and re-measure the tests above."""
    from onnxruntime.quantization.neural_compressor import weight_only

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 32)) / 8).astype(np.float32)
    x = correlated(1, 1, k=64, t=256)[0]["x"][0].astype(np.float64)
    h = 2 * x.T @ x / len(x)
    ort_q = weight_only.gptq(w.copy(), h.copy(), num_bits=4, group_size=32, scheme="asym")
    assert np.array_equal(ort_q, weight_only.gptq(w.copy(), np.eye(64), num_bits=4, group_size=32, scheme="asym"))
    ours = _gptq(w.copy(), h.copy(), num_bits=4, group_size=32, scheme="asym")
    assert ours.dtype == w.dtype and ours.shape == w.shape

    def loss(q):  # the layer's output error on the calibration inputs, which GPTQ minimises
        d = (w - q).astype(np.float64)
        return float(np.trace(d.T @ h @ d))

    assert loss(ours) < 0.2 * loss(ort_q)
    # On a Hessian with no correlations there is nothing to push the error onto: ours is round to nearest too.
    np.testing.assert_allclose(_gptq(w.copy(), np.eye(64), group_size=32, percdamp=0), ort_q, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_scope_is_respected(tmp_path, method):
    """Only the scoped block's MatMul is quantized, for every method (ORT's GPTQ ignores nodes_to_include and
    nodes_to_exclude; its Relu is in scope too, which HQQ would fail on)."""
    model = matmul_net()
    before = model.SerializeToString()
    result, selected = quantize(model, tmp_path, correlated(4, 1), scope="/enc/layers.1", bits=4, block_size=16,
                                method=method)
    assert set(nbits_nodes(result.model)) == {"/enc/layers.1/MatMul_Q4"}
    ops = {n.name: n.op_type for n in result.model.graph.node}
    assert ops["/enc/layers.0/MatMul"] == ops["/enc/layers.2/MatMul"] == "MatMul"
    applied = Applied(type(get_pass("quantize")), model, before, result, selected)
    check_input_unchanged(applied)
    check_scope(applied)  # outside nodes keep op type, attributes and initializer values
    check_stats(applied, "/enc/layers.1")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("level", [0, 1, 4])
def test_accuracy_level_is_written_to_the_nodes(tmp_path, method, level):
    result, _ = quantize(matmul_net(), tmp_path, gaussian(2, 1), bits=4, block_size=32, method=method,
                         accuracy_level=level)
    levels = [a.get("accuracy_level") for a in nbits_nodes(result.model).values()]
    assert levels == [level or None] * 3  # 0: the attribute is absent
    session(result.model)  # and ORT runs it


@pytest.mark.parametrize("params, feeds, expect", [
    ({"method": "gptq", "bits": 4}, None,
     "quantize method 'gptq' needs calibration data (recipe 'calibration'): GPTQ fits each weight to the "
     "layer's captured inputs"),
    ({"method": "rtn", "bits": 4, "block_size": 128}, None,
     "quantize (rtn) on 'model': MatMul '/enc/layers.1/MatMul' has input dimension K=64; block_size 128 does not "
     "divide it (MatMulNBits would pad it silently); block sizes that fit: 16, 32, 64"),
    ({"method": "hqq", "bits": 4, "block_size": 48}, None,
     "quantize: block_size 48 is not a power of two >= 16 (MatMulNBits' rule)"),
    ({"method": "rtn", "block_size": 512}, None,
     "quantize: block_size 512 is over 256, the largest ORT's round-to-nearest quantizer takes"),
    ({"method": "hqq"}, None,  # bits default to 8
     "quantize method 'hqq' stores 4-bit weights only (its float zero points have no CPU kernel at 8 bits): "
     "set bits: 4, or use method 'rtn' for 8 bits"),
    ({"method": "gptq", "bits": 8}, "feeds",
     "quantize method 'gptq' stores 4-bit weights only (ORT's GPTQ writes MatMulNBits only at 4 bits)"),
    ({"method": "hqq", "bits": 4, "op_types": ["MatMul", "Gather"]}, None,
     "quantize method 'hqq' quantizes MatMul weights only, not op_types ['MatMul', 'Gather']"),
    ({"mode": "dynamic", "method": "hqq"}, None,
     "quantize method 'hqq' is for mode 'weight_only' (MatMulNBits), not 'dynamic'"),
])
def test_bad_input_is_one_clear_line(tmp_path, params, feeds, expect):
    model = matmul_net()
    before = model.SerializeToString()
    with pytest.raises(PipelineError) as err:
        quantize(model, tmp_path, gaussian(2, 1) if feeds else None, **params)
    assert expect in str(err.value) and "\n" not in str(err.value)
    assert model.SerializeToString() == before


def test_gptq_without_feeds_is_an_error(tmp_path):
    model = matmul_net()
    with pytest.raises(PipelineError, match="^quantize method 'gptq' on 'model': the calibration data gave no feeds$"):
        quantize(model, tmp_path, [], bits=4, block_size=32, method="gptq")


def test_gptq_block_count_must_be_even(tmp_path):
    """ORT's GPTQ packs two 4-bit zero points a byte across rows, which breaks on an odd block count along K."""
    model = matmul_net((96, 32))
    with pytest.raises(PipelineError, match=r"MatMul '/enc/layers.0/MatMul' has input dimension K=96; block_size 32 "
                                            r"gives 3 blocks, .* needs an even count; block sizes that fit: 16$"):
        quantize(model, tmp_path, gaussian(2, 1, k=96), bits=4, block_size=32, method="gptq")
    result, _ = quantize(model, tmp_path, gaussian(2, 1, k=96), bits=4, block_size=16, method="gptq")
    assert nbits_nodes(result.model)["/enc/layers.0/MatMul_Q4"]["block_size"] == 16
    # RTN takes 32 on K=96 (3 blocks); K=40 has no block size at all.
    quantize(model, tmp_path, bits=4, block_size=32)
    with pytest.raises(PipelineError, match="K=40; block_size 16 does not divide it .*no block size fits: keep "
                                            "this node out of the scope"):
        quantize(matmul_net((40, 32)), tmp_path, bits=4, block_size=16)


def test_block_check_looks_only_inside_the_scope(tmp_path):
    """K=64 of layers 1 and 2 does not take block 128; layer 0 (K=128) alone, scoped, does."""
    result, _ = quantize(matmul_net(), tmp_path, scope="/enc/layers.0", bits=4, block_size=128)
    assert set(nbits_nodes(result.model)) == {"/enc/layers.0/MatMul_Q4"}


def test_gptq_needs_calibration_and_the_runner_says_so(tmp_path):
    import tiny

    from pipeline.core.recipe import load_recipe
    from pipeline.engine.plan import plan_recipe

    p = get_pass("quantize")
    assert p.needs_calibration_for(p.Params(mode="weight_only", method="gptq", bits=4))
    assert not p.needs_calibration_for(p.Params(mode="weight_only", method="hqq", bits=4))
    assert not p.needs_calibration_for(p.Params(mode="weight_only"))
    tiny.save(matmul_net(), tmp_path / "m.onnx")
    (tmp_path / "r.yaml").write_text(
        "name: g\nmodel: {path: m.onnx}\n"
        "steps:\n  - {pass: quantize, params: {mode: weight_only, method: gptq, bits: 4, block_size: 32}}\n")
    with pytest.raises(PipelineError, match=r"steps.0 \(quantize\) needs calibration data, but the recipe has no "
                                            r"'calibration' section"):
        plan_recipe(load_recipe(tmp_path / "r.yaml"))


def test_gptq_reader_copies_restart_over_the_same_feeds():
    feeds = gaussian(3, 1)
    reader = _ListReader(feeds)
    assert len(list(reader)) == 3 and list(reader) == []
    again = copy.deepcopy(reader)
    got = list(again)
    assert len(got) == 3 and all(a["x"] is b["x"] for a, b in zip(got, feeds))  # not a copy of every array


def test_a_second_step_counts_only_what_it_quantized(tmp_path):
    """blocks_changed (which the fallback shrinks) names the blocks this step changed, not an earlier step's."""
    first, _ = quantize(matmul_net(), tmp_path, scope="/enc/layers.0", bits=8, block_size=16)
    second, _ = quantize(first.model, tmp_path, scope="/enc/layers.1", bits=4, block_size=16)
    assert first.stats["blocks_changed"] == {"/enc/layers.0": 1}
    assert second.stats["blocks_changed"] == {"/enc/layers.1": 1}
