"""`pipeline tune` on Kokoro-82M from its PyPI wheels (recipes/kokoro_tune.yaml, the kokoro family): the recipe's own
dequantize step runs first, the search chooses every block's weight precision to a log-mel target on calibration
sentences, and the check on the 8 held-out sentences holds what the recipe asks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_the_search_finds_a_recipe_that_holds_on_unseen_sentences(tmp_path):
    recipe = REPO / "recipes" / "kokoro_tune.yaml"
    res = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert res.exit_code == 0, res.output[-3000:]
    assert "internal error" not in res.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    chosen = [c for c in report["tune"]["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["met"], report["tune"]["candidates"]
    assert chosen[0]["size_ratio"] < 0.6  # most weights in 8 or 16 bits
    # On the evaluation sentences, against the float model: the recipe's own bound, every length kept.
    audio = report["outputs"][0]["audio"]
    assert report["reference"] == "01-dequantize/kokoro-v1.0.int8.onnx"
    assert not report.get("failures") and audio["samples_with_length_change"] == 0, audio
    resolved = yaml.safe_load((tmp_path / "run" / "resolved_recipe.yaml").read_text())
    assert resolved["steps"][0]["pass"] == "dequantize" and len(resolved["steps"]) > 1
    assert {s["name"] for s in resolved["steps"][1:]} <= {"int8-weights", "fp16-weights"}
