"""Per-block error attribution on real sessions: fault injection, metric cross-checks, reports, bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import tiny
from conftest import cli, one_line
from onnx import numpy_helper
from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio

from pipeline.evaluation.blockwise import compare_models, splice_block
from pipeline.evaluation.metrics import AudioMetric
from pipeline.core.errors import PipelineError
from pipeline.core.onnx_io import session
from pipeline.core.recipe import BlockSpec
from pipeline.report.render import as_float, html_page, markdown, worst_blocks


def feeds(n=6, seed=5):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 4, 12 + 4 * i)).astype(np.float32)} for i in range(n)]


def perturb(model: onnx.ModelProto, weight: str, scale: float, seed: int = 0) -> onnx.ModelProto:
    """A copy of `model` with noise on one weight: the fault the check must find."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, t in enumerate(out.graph.initializer):
        if t.name == weight:
            w = numpy_helper.to_array(t)
            noisy = w + scale * np.abs(w).mean() * np.random.default_rng(seed).standard_normal(w.shape)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(noisy.astype(w.dtype), weight))
            return out
    raise KeyError(weight)


def downstream_blocks(model: onnx.ModelProto, report: dict, block: str) -> set[str]:
    """Blocks with an output that depends on `block`'s nodes (reachability over tensors)."""
    by_id = {b["block"]: b for b in report["blocks"]}
    from pipeline.core.blocks import BlockPartition
    from pipeline.core.blocks import name_all_nodes

    m = onnx.ModelProto()
    m.CopyFrom(model)
    name_all_nodes(m)
    part = BlockPartition(m)
    tainted: set[str] = set()
    for n in m.graph.node:  # graph order is topological
        if part.node_block[n.name] == block or any(t in tainted for t in n.input):
            tainted.update(n.output)
    return {b for b, r in by_id.items() if any(t in tainted for t in r["outputs"])}


def test_fault_injection_tiny_model():
    ref = tiny.conv_net(channels=8, layers=4)
    cand = perturb(ref, "enc.layers.2.conv.weight", 0.05)
    report = compare_models(ref, cand, feeds()).to_json()
    blocks = {b["block"]: b for b in report["blocks"]}
    assert worst_blocks(report, 1) == ["/enc/layers.2"]
    for upstream in ("/enc/layers.0", "/enc/layers.1"):
        assert as_float(blocks[upstream]["isolated"]["sqnr_db"]) > 100
        assert as_float(blocks[upstream]["accumulated"]["sqnr_db"]) > 100
    # Downstream blocks add nothing themselves, but carry the error.
    assert blocks["/enc/layers.3"]["isolated"]["sqnr_db"] == "inf"
    assert as_float(blocks["/enc/layers.3"]["accumulated"]["sqnr_db"]) < 60
    assert 10 < as_float(blocks["/enc/layers.2"]["isolated"]["sqnr_db"]) < 60
    assert report["samples"] == 6


def test_output_sqnr_matches_numpy_and_onnxruntime():
    ref = tiny.conv_net(channels=8)
    cand = perturb(ref, "enc.layers.1.conv.weight", 0.1)
    data = feeds()
    report = compare_models(ref, cand, data).to_json()
    r, c = session(ref), session(cand)
    xs = [r.run(None, f)[0] for f in data]
    ys = [c.run(None, f)[0] for f in data]
    x, y = np.concatenate([a.ravel() for a in xs]), np.concatenate([a.ravel() for a in ys])
    by_hand = 20 * np.log10(np.linalg.norm(x.astype(np.float64)) / np.linalg.norm(x.astype(np.float64) - y))
    ort_value = compute_signal_to_quantization_noice_ratio([a.ravel() for a in xs], [a.ravel() for a in ys])
    ours = report["outputs"][0]["sqnr_db"]
    assert abs(ours - by_hand) < 0.1 and abs(ours - ort_value) < 0.1
    cos = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
    assert abs(report["outputs"][0]["cosine"] - cos) < 1e-6
    assert abs(report["outputs"][0]["max_abs"] - float(np.max(np.abs(x - y)))) < 1e-6


def test_different_interfaces_are_refused():
    ref = tiny.conv_net()
    other = tiny.conv_net()
    other.graph.output[0].name = "/dec/Mul_output_0"
    with pytest.raises(PipelineError, match="do not have the same interface"):
        compare_models(ref, other, feeds(1))


def test_block_spec_matching_nothing_is_refused():
    ref = tiny.conv_net()
    with pytest.raises(PipelineError, match="match no node"):
        compare_models(ref, ref, feeds(1), BlockSpec(patterns=[r"^/nothing/(\w+)"]))


def test_renamed_boundary_tensors_are_reported_not_fatal():
    ref = tiny.conv_net(layers=3)
    cand = perturb(ref, "enc.layers.2.conv.weight", 0.05)
    # Rename layer 1's output tensor everywhere in the candidate.
    old, new = "/enc/layers.1/Relu_output_0", "renamed_tensor"
    for n in cand.graph.node:
        n.output[:] = [new if t == old else t for t in n.output]
        n.input[:] = [new if t == old else t for t in n.input]
    report = compare_models(ref, cand, feeds(2)).to_json()
    blocks = {b["block"]: b for b in report["blocks"]}
    assert blocks["/enc/layers.1"]["matched"] is False
    assert blocks["/enc/layers.1"]["unmatched_tensors"] == [old]
    assert any("/enc/layers.1" in n for n in report["notes"])
    assert worst_blocks(report, 1) == ["/enc/layers.2"]  # the rest is still reported
    assert blocks["/enc/layers.0"]["isolated"]["sqnr_db"] == "inf"


def test_sensitivity_splices_one_block():
    ref = tiny.conv_net(layers=3)
    cand = perturb(perturb(ref, "enc.layers.0.conv.weight", 0.01), "enc.layers.2.conv.weight", 0.2, seed=1)
    report = compare_models(ref, cand, feeds(3), sensitivity=True).to_json()
    sens = {b["block"]: b.get("sensitivity") for b in report["blocks"]}
    assert sens["/enc/layers.1"] is None  # identical blocks are not spliced
    assert sens["/enc/layers.2"]["sqnr_db"] < sens["/enc/layers.0"]["sqnr_db"]


def test_splice_keeps_the_rest_of_the_reference():
    from pipeline.core.blocks import BlockPartition

    ref = tiny.conv_net(layers=3)
    cand = perturb(ref, "enc.layers.1.conv.weight", 0.3)
    spliced = splice_block(ref, cand, BlockPartition(ref), BlockPartition(cand), "/enc/layers.1")
    x = feeds(1)[0]
    np.testing.assert_allclose(session(spliced).run(None, x)[0], session(cand).run(None, x)[0], rtol=1e-6)


def test_an_fp16_candidate_with_fp16_inputs_is_checked_and_spliced():
    """FP16 conversion without keep_io_types changes the inputs' type: the check feeds the candidate the same
    samples cast, and sensitivity splices an FP16 block into the FP32 reference through Casts (both crashed)."""
    from onnxconverter_common import float16

    ref = tiny.conv_net(layers=3)
    cand = float16.convert_float_to_float16(ref, keep_io_types=False)
    assert cand.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    report = compare_models(ref, cand, feeds(3), sensitivity=True).to_json()
    for b in report["blocks"]:
        assert 40 < b["isolated"]["sqnr_db"] < 120, b  # FP16 rounding: finite, and small
        assert 40 < b["sensitivity"]["sqnr_db"] < 120, b
    assert 40 < report["outputs"][0]["sqnr_db"] < 120


def test_calibration_feeds_reach_a_graph_with_fp16_inputs_cast(tmp_path, tiny_model, tiny_feeds):
    """A step after `fp16 keep_io_types: false` is calibrated on the FP32 captures, cast to its inputs' type: its
    own verdict (here fp16's refusal to convert twice) is the one line, not ORT's `expected tensor(float16)`."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: twice\nmodel: {{path: {tiny_model}}}\ncalibration: {{source: npz, params: "
                      f"{{folder: {tiny_feeds}}}}}\nsteps: [{{pass: fp16, params: {{keep_io_types: false}}}}, "
                      f"{{pass: fp16}}]\n")
    res = cli("run", str(recipe), "--out", str(tmp_path / "run"), "-q")
    assert res.exit_code == 2, res.output
    assert "already converted to float16" in one_line(res.stderr)


def test_reports_render(tmp_path):
    ref = tiny.conv_net()
    report = compare_models(ref, perturb(ref, "enc.layers.1.conv.weight", 0.1), feeds(2)).to_json()
    json.dumps(report)  # no inf/nan leaks into JSON
    for key in ("samples", "blocks", "outputs", "peak_rss_mb"):
        assert key in report
    for b in report["blocks"]:
        assert set(b["isolated"]) >= {"sqnr_db", "cosine", "max_abs", "rel_l2"}
        assert set(b["accumulated"]) >= {"sqnr_db", "cosine", "max_abs", "rel_l2"}
    page = html_page(report)
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page
    assert 'class="worst"' in page and "/enc/layers.1" in page
    assert "| `/enc/layers.1` |" in markdown(report)


def test_cli_compare_and_check_thresholds(tmp_path, tiny_feeds):
    ref_path = tiny.save(tiny.conv_net(), tmp_path / "ref.onnx")
    cand_path = tiny.save(perturb(tiny.conv_net(), "enc.layers.1.conv.weight", 0.1), tmp_path / "cand.onnx")
    res = cli("compare", str(ref_path), str(cand_path), "--npz", str(tiny_feeds), "--json",
              str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html"), "--md", str(tmp_path / "r.md"))
    assert res.code == 0, res.stderr
    assert "<< worst" in res.stdout and "/enc/layers.1" in res.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["samples"] == 6 and (tmp_path / "r.png").is_file()
    # A block spec that matches nothing: one line, non-zero.
    bad = cli("compare", str(ref_path), str(cand_path), "--npz", str(tiny_feeds), "--blocks", "^/nope/(x)")
    assert bad.code != 0 and "match no node" in bad.stderr and "Traceback" not in bad.stderr


RECIPE = """name: tiny_check
model: {{path: {model}}}
calibration: {{source: npz, params: {{folder: {feeds}}}}}
steps:
  - pass: quantize
    params: {{mode: static, op_types: [Conv]}}
check:
  samples: 4
  min_sqnr_db: {threshold}
  on_fail: {on_fail}
"""


@pytest.mark.parametrize("threshold, on_fail, code", [(200, "error", 2), (200, "warn", 0), (5, "error", 0)])
def test_recipe_check_thresholds(tmp_path, tiny_model, tiny_feeds, threshold, on_fail, code):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(model=tiny_model, feeds=tiny_feeds, threshold=threshold, on_fail=on_fail))
    res = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert res.code == code, res.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert (tmp_path / "run" / "report.html").is_file()
    if threshold == 200:
        assert report["failures"] and all("isolated SQNR" in f for f in report["failures"])
        where = res.stderr if code else res.stdout
        assert "/enc/layers.0: isolated SQNR" in where
    else:
        assert report["failures"] == []
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["check"]["failures"] == report["failures"]


# The real voice with one layer's weights perturbed, checked block by block: end to end (e2e), as are the tests on it.
@pytest.fixture(scope="module")
def piper_fault(piper_model, tmp_path_factory):
    ref = onnx.load(str(piper_model))
    cand = perturb(ref, "enc_p.encoder.ffn_layers.2.conv_1.weight", 0.02)
    from pipeline.families.piper import PiperFamily

    _, data = PiperFamily().bench_inputs(piper_model, 3, None)
    return ref, compare_models(ref, cand, data, metrics=[AudioMetric(PiperFamily().audio(None))]).to_json()


@pytest.mark.e2e
def test_fault_injection_piper_voice(piper_fault):
    ref, report = piper_fault
    blocks = {b["block"]: b for b in report["blocks"]}
    assert worst_blocks(report, 1) == ["/enc_p/encoder/ffn_layers.2"]
    affected = downstream_blocks(ref, report, "/enc_p/encoder/ffn_layers.2")
    upstream = [b for b in blocks if b not in affected and b != "/enc_p/encoder/ffn_layers.2"]
    assert "/enc_p/encoder/attn_layers.2" in upstream and "/enc_p/encoder/ffn_layers.1" in upstream
    for b in upstream:
        for kind in ("isolated", "accumulated"):
            v = as_float(blocks[b][kind]["sqnr_db"])
            assert math.isnan(v) or v > 100, (b, kind, v)  # nan: a block with only integer outputs
    assert "audio" in report["outputs"][0]


@pytest.mark.e2e
def test_piper_report_lists_every_kind_of_block(piper_fault):
    _, report = piper_fault
    ids = [b["block"] for b in report["blocks"]]
    for expected in ("/enc_p/encoder/attn_layers.0", "/enc_p/encoder/ffn_layers.5", "/dp", "/dp/flows.3",
                     "/flow/flows.0", "/flow/flows.6", "/dec/ups.0", "/dec/resblocks.8"):
        assert expected in ids
    for b in report["blocks"]:
        assert "isolated" in b and "accumulated" in b


@pytest.mark.e2e
def test_piper_output_sqnr_matches_numpy_and_onnxruntime(piper_model, piper_fault):
    """The same cross-check on the real voice: the perturbed candidate's audio output."""
    from pipeline.families.piper import PiperFamily

    ref, report = piper_fault
    cand = perturb(ref, "enc_p.encoder.ffn_layers.2.conv_1.weight", 0.02)
    _, data = PiperFamily().bench_inputs(piper_model, 3, None)
    r, c = session(ref), session(cand)
    xs = [r.run(None, f)[0].ravel() for f in data]
    ys = [c.run(None, f)[0].ravel() for f in data]
    # Noise on an encoder layer can flip a duration: those samples are not compared, and counted.
    same = [(a, b) for a, b in zip(xs, ys) if a.shape == b.shape]
    assert report["outputs"][0]["shape_mismatches"] == len(xs) - len(same) and same
    xs, ys = [a for a, _ in same], [b for _, b in same]
    x, y = np.concatenate(xs).astype(np.float64), np.concatenate(ys).astype(np.float64)
    by_hand = 20 * np.log10(np.linalg.norm(x) / np.linalg.norm(x - y))
    ours = report["outputs"][0]["sqnr_db"]
    assert abs(ours - by_hand) < 0.1
    assert abs(ours - compute_signal_to_quantization_noice_ratio(xs, ys)) < 0.1
