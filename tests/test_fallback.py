"""Automatic precision fallback: converges, writes the resolved recipe, which rebuilds the same model."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import REPO, cli, sha256

FALLBACK = """name: tiny_fallback
model: {{path: tiny.onnx}}
calibration: {{source: npz, params: {{folder: feeds}}}}
steps:
  - name: int8
    pass: quantize
    params: {{mode: static, op_types: [Conv]}}
check:
  samples: 6
  fallback: {{step: int8, min_output_sqnr_db: {target}, per_round: 1, max_rounds: 6, move_to: {move_to}}}
"""


@pytest.fixture
def workdir(tmp_path, tiny_feeds):
    import tiny

    tiny.save(tiny.conv_net(channels=8, layers=4), tmp_path / "tiny.onnx")
    return tmp_path


@pytest.mark.parametrize("move_to", ["fp32", "fp16"])
def test_tiny_fallback_converges_and_resolved_recipe_reproduces(workdir, move_to):
    (workdir / "r.yaml").write_text(FALLBACK.format(target=33, move_to=move_to))
    res = cli("run", str(workdir / "r.yaml"), "--out", str(workdir / "run"))
    assert res.code == 0, res.stderr
    report = json.loads((workdir / "run" / "report.json").read_text())
    rounds = report["rounds"]
    assert rounds[0]["target_met"] is False and rounds[-1]["target_met"] is True
    assert len(rounds) >= 2 and all(r["moved_next"] for r in rounds[:-1])
    resolved = workdir / "run" / "resolved_recipe.yaml"
    data = yaml.safe_load(resolved.read_text())
    kept = rounds[-1]["kept"]
    quantize = next(s for s in data["steps"] if s["pass"] == "quantize")
    assert len(quantize["scope"]["exclude"]) == len(kept)
    if move_to == "fp16":
        assert any(s["pass"] == "fp16" for s in data["steps"])
    assert "fallback" not in data["check"]
    assert "Automatic fallback" in (workdir / "run" / "report.md").read_text()
    assert "round 0:" in (workdir / "run" / "report.html").read_text()
    # The resolved recipe, run elsewhere from scratch, builds the very same file.
    again = cli("run", str(resolved), "--out", str(workdir / "again"))
    assert again.code == 0, again.stderr
    assert sha256(workdir / "again" / "final" / "tiny.onnx") == sha256(workdir / "run" / "final" / "tiny.onnx")


def test_tiny_fallback_that_cannot_converge_fails_clearly(workdir):
    (workdir / "r.yaml").write_text(FALLBACK.format(target=200, move_to="fp32"))
    res = cli("run", str(workdir / "r.yaml"), "--out", str(workdir / "run"))
    assert res.code == 2
    assert "fallback did not reach its target" in res.stderr and "Traceback" not in res.stderr
    assert (workdir / "run" / "resolved_recipe.yaml").is_file()


def test_fallback_step_must_be_a_quantize_step(workdir):
    (workdir / "r.yaml").write_text(FALLBACK.format(target=30, move_to="fp32").replace("step: int8", "step: nope"))
    res = cli("validate", str(workdir / "r.yaml"))
    assert res.code == 2 and "no quantize step named 'nope' (quantize steps: int8)" in res.stderr


def test_fallback_needs_a_target(workdir):
    text = FALLBACK.format(target=30, move_to="fp32").replace("min_output_sqnr_db: 30, ", "")
    (workdir / "r.yaml").write_text(text)
    res = cli("validate", str(workdir / "r.yaml"))
    assert res.code == 2 and "give a target" in res.stderr


@pytest.mark.e2e
def test_piper_all_block_int8_fallback_converges_and_reproduces(tmp_path):
    """Acceptance: all-block INT8 start on the real voice, a target it misses at first."""
    recipe = REPO / "recipes" / "piper_int8_auto.yaml"
    res = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert res.code == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    rounds = report["rounds"]
    assert rounds[0]["target_met"] is False and rounds[0]["output"]["audio"]["log_mel_max"] > 1.0
    assert rounds[-1]["target_met"] is True and rounds[-1]["output"]["audio"]["log_mel_max"] <= 0.25
    assert rounds[-1]["size_ratio"] < 0.95  # something stayed INT8
    resolved = tmp_path / "run" / "resolved_recipe.yaml"
    shutil.copy(resolved, tmp_path / "resolved.yaml")
    again = cli("run", str(tmp_path / "resolved.yaml"), "--out", str(tmp_path / "again"))
    assert again.code == 0, again.stderr[-2000:]
    name = "en_US-joe-medium.onnx"
    assert sha256(tmp_path / "again" / "final" / name) == sha256(tmp_path / "run" / "final" / name)
