"""What every shipped tune recipe must do when run as shipped (tests/test_tune_*.py)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from conftest import cli


def assert_tuned_recipe_runs(recipe: Path, out: Path, max_size: float, max_log_mel: float) -> None:
    shipped = yaml.safe_load(recipe.read_text())
    # Generic: a menu, a target and a budget; no scopes, node patterns or block names from earlier sweeps.
    assert not shipped.get("steps") and "blocks" not in shipped and "include" not in shipped["tune"].get("blocks", {})
    assert not re.search(r"(^|\s)/[a-z_]+", yaml.safe_dump(shipped["tune"])), "a block name in the tune section"
    res = cli("run", str(recipe), "--out", str(out))
    assert res.code == 0, res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    chosen = [c for c in report["tune"]["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["met"], report["tune"]["candidates"]
    # On the evaluation inputs (the check), which the search never ran on.
    audio = report["outputs"][0]["audio"]
    assert audio["samples_with_length_change"] == 0
    assert audio["log_mel_max"] <= max_log_mel, audio
    assert report["asr"]["wer_increase"] <= 5, report["asr"]  # the words survive (tests/test_asr.py: 2 on all)
    final = sum(p.stat().st_size for p in (out / "final").glob("*.onnx"))
    base = sum(p.stat().st_size for p in (out / "steps" / "00-base").glob("*.onnx"))
    assert final / base <= max_size
    resolved = yaml.safe_load((out / "resolved_recipe.yaml").read_text())
    menu = {m["name"] for m in shipped["tune"]["menu"]}
    assert resolved["steps"] and {s["name"] for s in resolved["steps"]} <= menu
    assert len(list((out / "tune" / "trials").glob("*.json"))) == report["tune"]["trials"]
