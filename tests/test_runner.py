"""The runner on a tiny model: run-folder layout, caching, resume, provenance, input untouched."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from conftest import cli, sha256

from pipeline.core.errors import PipelineError
from pipeline.core.recipe import load_recipe
from pipeline.engine.plan import plan_recipe
from pipeline.search.run import run_recipe

RECIPE = """
name: tiny_int8
model: {{path: {model}}}
calibration: {{source: npz, params: {{folder: {feeds}}}}}
steps:
  - pass: simplify
  - pass: quantize
    params: {{mode: static, op_types: [Conv], expect_min_nodes: 2}}
    scope: {{include: ['/enc/layers\\.[01]']}}
"""


def write_recipe(tmp_path: Path, model: Path, feeds: Path, text: str = RECIPE) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text.format(model=model, feeds=feeds))
    return path


def run(recipe: Path, out: Path):
    return run_recipe(plan_recipe(load_recipe(recipe)), out, log=lambda m: None)


def test_layout_manifest_and_provenance(tmp_path, tiny_model, tiny_feeds):
    before = sha256(tiny_model)
    result = run(write_recipe(tmp_path, tiny_model, tiny_feeds), tmp_path / "run")
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["00-base", "01-simplify", "02-quantize"]
    assert (out / "final" / "tiny.onnx").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["pass"] for s in manifest["steps"]] == ["base", "simplify", "quantize"]
    q = manifest["steps"][2]
    # Only the two scoped layers are quantized; layer 2 and the decoder stay float.
    assert q["stats"]["model"]["quantized_per_block"] == {"/enc/layers.0": 1, "/enc/layers.1": 1}
    assert q["input_hash"] == manifest["steps"][1]["output_hash"]
    final = onnx.load(str(out / "final" / "tiny.onnx"))
    props = {p.key: p.value for p in final.metadata_props}
    assert props["pipeline.recipe"] == "tiny_int8"
    assert props["pipeline.passes"] == "simplify,quantize"
    assert props["pipeline.recipe_sha256"] == load_recipe(tmp_path / "recipe.yaml").spec_hash()
    # Quantizer-made nodes were renamed into the block of the node they serve.
    dq = [n.name for n in final.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(n.startswith("/enc/layers.") for n in dq), dq
    assert sha256(tiny_model) == before
    assert result.steps[-1].cached is False
    assert not (out / "tmp").exists()


def test_rerun_is_cached_and_identical(tmp_path, tiny_model, tiny_feeds):
    recipe = write_recipe(tmp_path, tiny_model, tiny_feeds)
    first = run(recipe, tmp_path / "run")
    final_hash = sha256(tmp_path / "run" / "final" / "tiny.onnx")
    second = run(recipe, tmp_path / "run")
    assert [s.cached for s in second.steps] == [True, True, True]
    assert not any(s.cached for s in first.steps)
    assert sha256(tmp_path / "run" / "final" / "tiny.onnx") == final_hash


def test_interrupted_run_resumes_at_the_missing_step(tmp_path, tiny_model, tiny_feeds):
    recipe = write_recipe(tmp_path, tiny_model, tiny_feeds)
    run(recipe, tmp_path / "run")
    # What an interruption during step 02 leaves: no 02 folder, a partial one beside it.
    shutil.rmtree(tmp_path / "run" / "steps" / "02-quantize")
    (tmp_path / "run" / "steps" / ".02-quantize.partial").mkdir()
    again = run(recipe, tmp_path / "run")
    assert [s.cached for s in again.steps] == [True, True, False]
    assert not (tmp_path / "run" / "steps" / ".02-quantize.partial").exists()


def test_changed_step_reruns_only_from_there(tmp_path, tiny_model, tiny_feeds):
    run(write_recipe(tmp_path, tiny_model, tiny_feeds), tmp_path / "run")
    changed = RECIPE.replace("op_types: [Conv], ", "op_types: [Conv], per_channel: false, ")
    again = run(write_recipe(tmp_path, tiny_model, tiny_feeds, changed), tmp_path / "run")
    assert [s.cached for s in again.steps] == [True, True, False]


def test_tampered_step_output_is_rebuilt(tmp_path, tiny_model, tiny_feeds):
    recipe = write_recipe(tmp_path, tiny_model, tiny_feeds)
    run(recipe, tmp_path / "run")
    target = tmp_path / "run" / "steps" / "01-simplify" / "tiny.onnx"
    target.write_bytes(target.read_bytes()[:100])
    again = run(recipe, tmp_path / "run")
    assert [s.cached for s in again.steps] == [True, False, True]


def test_scope_matching_no_block_fails_before_work(tmp_path, tiny_model, tiny_feeds):
    text = RECIPE.replace("'/enc/layers\\.[01]'", "'/enc/layer_typo'")
    with pytest.raises(PipelineError, match="matches no block"):
        plan_recipe(load_recipe(write_recipe(tmp_path, tiny_model, tiny_feeds, text)))


def test_expectation_not_met_fails_loudly(tmp_path, tiny_model, tiny_feeds):
    text = RECIPE.replace("expect_min_nodes: 2", "expect_min_nodes: 5")
    with pytest.raises(PipelineError, match="expected at least 5 quantized nodes, got 2"):
        run(write_recipe(tmp_path, tiny_model, tiny_feeds, text), tmp_path / "run")
    assert not (tmp_path / "run" / "steps" / "02-quantize").exists()


def test_cli_run_prints_summary(tmp_path, tiny_model, tiny_feeds):
    recipe = write_recipe(tmp_path, tiny_model, tiny_feeds)
    res = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert res.code == 0, res.stderr
    assert "02-quantize" in res.stdout and "final model" in res.stdout
    res2 = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert res2.code == 0 and res2.stderr.count("cached") == 3


def test_a_result_that_cannot_load_fails_naming_the_node(piper_model):
    """onnxconverter-common alone breaks the Piper voice: the load check must say where."""
    import warnings

    from onnxconverter_common import float16

    from pipeline.core.onnx_io import check_loads

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        naive = float16.convert_float_to_float16(onnx.load(str(piper_model)), keep_io_types=True)
    with pytest.raises(PipelineError, match=r"step 01 fp16 \(model\): ONNX Runtime cannot load the result: .*/enc_p/Cast_1"):
        check_loads(naive, "step 01 fp16 (model)")
