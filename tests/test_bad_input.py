"""Every user error: one clear line, non-zero exit, no traceback, nothing written
outside the run folder, the input model unchanged."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import cli, sha256, tree

GOOD = """name: bad_input
model: {{path: {model}}}
calibration: {{source: npz, params: {{folder: {feeds}}}}}
steps:
  - pass: simplify
  - pass: quantize
    params: {{mode: static, op_types: [Conv]}}
    scope: {{include: ['/enc/layers\\.0']}}
"""


def check_user_error(tmp_path: Path, model: Path, args: list[str], expect: str) -> str:
    before_model = sha256(model) if model.is_file() else None
    before = tree(tmp_path)
    res = cli(*args)
    assert res.code != 0
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert expect in lines[0], lines[0]
    created = {p for p in tree(tmp_path) - before if not p.startswith("run")}
    assert created == set(), created
    if before_model is not None:
        assert sha256(model) == before_model
    return lines[0]


def recipe(tmp_path: Path, model: Path, feeds: Path, text: str = GOOD, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.format(model=model, feeds=feeds))
    return path


def run_args(path: Path, tmp_path: Path) -> list[str]:
    return ["run", str(path), "--out", str(tmp_path / "run")]


def test_good_recipe_passes_validate(tmp_path, tiny_model, tiny_feeds):
    res = cli("validate", str(recipe(tmp_path, tiny_model, tiny_feeds)))
    assert res.code == 0, res.stderr
    assert "ok (2 steps, 6 calibration samples)" in res.stdout


def test_missing_recipe(tmp_path, tiny_model):
    check_user_error(tmp_path, tiny_model, run_args(tmp_path / "nope.yaml", tmp_path), "recipe not found")


def test_invalid_yaml(tmp_path, tiny_model, tiny_feeds):
    path = recipe(tmp_path, tiny_model, tiny_feeds, "name: x\nsteps: [\n  - pass: simplify\n")
    check_user_error(tmp_path, tiny_model, run_args(path, tmp_path), "invalid YAML at line")


def test_unknown_pass_lists_known(tmp_path, tiny_model, tiny_feeds):
    path = recipe(tmp_path, tiny_model, tiny_feeds, GOOD.replace("pass: simplify", "pass: simplfy"))
    line = check_user_error(tmp_path, tiny_model, run_args(path, tmp_path), "unknown pass 'simplfy'")
    assert "known passes:" in line and "quantize" in line and "simplify" in line


def test_unknown_parameter_names_valid_keys(tmp_path, tiny_model, tiny_feeds):
    path = recipe(tmp_path, tiny_model, tiny_feeds, GOOD.replace("mode: static", "mode: static, per_chanel: true"))
    line = check_user_error(tmp_path, tiny_model, run_args(path, tmp_path), "steps.1.params: per_chanel")
    assert "valid keys:" in line and "per_channel" in line and str(path) in line


def test_mistyped_parameter_value(tmp_path, tiny_model, tiny_feeds):
    path = recipe(tmp_path, tiny_model, tiny_feeds, GOOD.replace("mode: static", "mode: statik"))
    line = check_user_error(tmp_path, tiny_model, run_args(path, tmp_path), "steps.1.params: mode")
    assert "'dynamic', 'static' or 'weight_only'" in line


def test_unknown_top_level_key(tmp_path, tiny_model, tiny_feeds):
    path = recipe(tmp_path, tiny_model, tiny_feeds, GOOD + "stesp: []\n")
    line = check_user_error(tmp_path, tiny_model, run_args(path, tmp_path), "unknown key 'stesp'")
    assert "steps" in line


def test_scope_that_matches_no_node(tmp_path, tiny_model, tiny_feeds):
    path = recipe(tmp_path, tiny_model, tiny_feeds, GOOD.replace("layers\\.0", "layers\\.9"))
    line = check_user_error(tmp_path, tiny_model, run_args(path, tmp_path), "matches no block")
    assert "/enc/layers.0" in line  # the error shows which blocks exist


def test_model_missing(tmp_path, tiny_feeds):
    missing = tmp_path / "models" / "absent.onnx"
    path = recipe(tmp_path, missing, tiny_feeds)
    check_user_error(tmp_path, missing, run_args(path, tmp_path), "model file not found")


def test_model_truncated(tmp_path, tiny_model, tiny_feeds):
    truncated = tmp_path / "models" / "truncated.onnx"
    truncated.write_bytes(tiny_model.read_bytes()[:200])
    path = recipe(tmp_path, truncated, tiny_feeds)
    check_user_error(tmp_path, truncated, run_args(path, tmp_path), "not a valid ONNX model")


def test_model_not_onnx(tmp_path, tiny_feeds):
    text_file = tmp_path / "models" / "notes.onnx"
    text_file.parent.mkdir(parents=True, exist_ok=True)
    text_file.write_text("this is not a model\n" * 20)
    path = recipe(tmp_path, text_file, tiny_feeds)
    check_user_error(tmp_path, text_file, run_args(path, tmp_path), "not a valid ONNX model")


def test_empty_calibration_folder(tmp_path, tiny_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    path = recipe(tmp_path, tiny_model, empty)
    check_user_error(tmp_path, tiny_model, run_args(path, tmp_path), "yields no samples")


def test_calibration_feed_names_mismatch(tmp_path, tiny_model):
    feeds = tmp_path / "wrong"
    feeds.mkdir()
    np.savez(feeds / "a.npz", input=np.zeros((1, 4, 8), np.float32))
    path = recipe(tmp_path, tiny_model, feeds)
    line = check_user_error(tmp_path, tiny_model, run_args(path, tmp_path), "feed names do not match")
    assert "missing ['x']" in line and "unexpected ['input']" in line


@pytest.mark.parametrize("array, expect", [
    (np.zeros((1, 4, 8), np.float64), "dtype float64"),
    (np.zeros((4, 8), np.float32), "rank 2"),
])
def test_calibration_feed_dtype_or_rank_mismatch(tmp_path, tiny_model, array, expect):
    feeds = tmp_path / "wrong"
    feeds.mkdir()
    np.savez(feeds / "a.npz", x=array)
    path = recipe(tmp_path, tiny_model, feeds)
    check_user_error(tmp_path, tiny_model, run_args(path, tmp_path), expect)


def test_unknown_calibration_source(tmp_path, tiny_model, tiny_feeds):
    path = recipe(tmp_path, tiny_model, tiny_feeds, GOOD.replace("source: npz", "source: wavs"))
    line = check_user_error(tmp_path, tiny_model, run_args(path, tmp_path), "unknown calibration source 'wavs'")
    assert "npz" in line and "piper" in line


def test_unwritable_output_folder(tmp_path, tiny_model, tiny_feeds):
    # A path under a regular file cannot be created, even by root.
    blocker = tmp_path / "run_blocker"
    blocker.write_text("a file, not a folder")
    path = recipe(tmp_path, tiny_model, tiny_feeds)
    check_user_error(tmp_path, tiny_model, ["run", str(path), "--out", str(blocker / "out")],
                     "cannot write to output folder")
    assert blocker.read_text() == "a file, not a folder"


def test_inspect_bad_model_and_regex(tmp_path, tiny_model):
    check_user_error(tmp_path, tiny_model, ["inspect", str(tmp_path / "absent.onnx")], "model file not found")
    check_user_error(tmp_path, tiny_model, ["inspect", str(tiny_model), "--blocks", "(unclosed"], "not a valid regex")


def test_mels_with_the_wrong_band_count_are_refused_before_calibration(tmp_path):
    """An exported vocoder wants 80-band mels: a 64-band calibration folder fails in one line, naming both."""
    feeds = tmp_path / "mels64"
    feeds.mkdir()
    np.savez(feeds / "a.npz", mel=np.zeros((1, 64, 32), np.float32))
    path = tmp_path / "r.yaml"
    path.write_text(f"""name: bands
model: {{exporter: hifigan}}
calibration: {{source: npz, params: {{folder: {feeds}}}}}
steps:
  - {{pass: quantize, params: {{mode: static, op_types: [Conv]}}, scope: {{include: ['/resblocks\\\\.0']}}}}
""")
    res = cli("run", str(path), "--out", str(tmp_path / "run"))
    assert res.code == 2 and "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert "'mel' has size 64 on axis 1" in line and "wants 80" in line
