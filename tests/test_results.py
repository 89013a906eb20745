"""Typed check results: what the engine returns reads like Python, and report.json keeps its schema."""
from __future__ import annotations

import copy
import json
import math

import pytest
import tiny
from conftest import cli
from sample_reports import BEFORE_FAMILIES

from pipeline.core.errors import PipelineError
from pipeline.evaluation.results import CheckReport


def test_a_report_from_before_families_loads_typed_and_writes_back_unchanged():
    report = CheckReport.from_json(copy.deepcopy(BEFORE_FAMILIES))
    block = report.block("/flow/flows.0")
    assert block.isolated.sqnr_db == pytest.approx(33.4) and block.accumulated.sqnr_db == math.inf
    assert block.amplification is None
    assert math.isnan(report.outputs[0].sqnr_db)  # null: nothing compared
    assert report.outputs[0].audio.log_mel_max == 0.095 and report.outputs[0].audio.sample_rate is None
    assert report.family is None and report.rounds is None
    written = report.to_json()
    assert written == BEFORE_FAMILIES and list(written) == list(BEFORE_FAMILIES)  # same keys, same order


def test_a_malformed_report_is_one_clear_error():
    bad = copy.deepcopy(BEFORE_FAMILIES)
    bad["blocks"][0]["isolated"]["sqnr_db"] = "loud"
    with pytest.raises(PipelineError, match=r"report: not a check report: blocks\.0\.isolated\.sqnr_db"):
        CheckReport.from_json(bad)
    bad = copy.deepcopy(BEFORE_FAMILIES)
    bad["blcoks"] = bad.pop("blocks")
    with pytest.raises(PipelineError, match="not a check report: blocks: Field required"):
        CheckReport.from_json(bad)


def test_a_run_writes_the_typed_report_as_json_and_reads_it_back(tmp_path):
    tiny.save(tiny.conv_net(), tmp_path / "tiny.onnx")
    tiny.write_npz_feeds(tmp_path / "feeds")
    (tmp_path / "r.yaml").write_text(
        "name: t\nmodel: {path: tiny.onnx}\ncalibration: {source: npz, params: {folder: feeds}}\n"
        "steps: [{pass: quantize, params: {mode: static, op_types: [Conv]}}]\n"
        "check: {samples: 3, min_output_sqnr_db: 90, on_fail: warn}\n")
    res = cli("run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"))
    assert res.code == 0, res.stderr[-2000:]
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    report = CheckReport.read(tmp_path / "run" / "report.json")
    assert report.to_json() == on_disk
    assert report.family == "generic" and report.failures and "< 90.0 dB" in report.failures[0]
    assert all(isinstance(b.isolated.sqnr_db, float) for b in report.blocks)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["check"]["outputs"] == on_disk["outputs"] and manifest["check"]["failures"] == report.failures
