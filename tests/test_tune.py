"""`pipeline tune` on a tiny conv net: the search meets its target, its resolved recipe rebuilds the model byte for
byte, a re-run reads every trial back, Ray gives the same answer as local processes, and bad input is one line."""
from __future__ import annotations

import importlib.util
import json

import pytest
import yaml
from conftest import cli, sha256

TUNE = """name: tiny_tune
model: {{path: tiny.onnx}}
calibration: {{source: npz, params: {{folder: feeds}}}}
tune:
  menu:
    - {{name: int8-static, pass: quantize, params: {{mode: static, op_types: [Conv]}}}}
    - {{name: int8-weights, pass: compress_weights, params: {{dtype: int8, min_elements: 64}}}}
    - {{name: fp16-weights, pass: compress_weights, params: {{dtype: fp16, min_elements: 64}}}}
  target: {{min_output_sqnr_db: {target}}}
  objective: size
  samples: 4
  seed: 3
{extra}
check: {{samples: 6, on_fail: warn}}
"""


@pytest.fixture
def workdir(tmp_path, tiny_feeds):
    import tiny

    tiny.save(tiny.conv_net(channels=16, layers=4), tmp_path / "tiny.onnx")
    return tmp_path


def write(workdir, target=40, extra="", name="r.yaml"):
    (workdir / name).write_text(TUNE.format(target=target, extra=extra))
    return workdir / name


def trials(run):
    return [json.loads(line) for line in (run / "tune" / "trials.jsonl").read_text().splitlines()]


def test_tiny_tune_meets_target_rebuilds_and_resumes(workdir):
    recipe = write(workdir)
    res = cli("tune", str(recipe), "--out", str(workdir / "run"))
    assert res.code == 0, res.stderr
    run = workdir / "run"
    report = json.loads((run / "report.json").read_text())
    tune = report["tune"]
    chosen = [c for c in tune["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["met"]
    assert float(chosen[0]["sqnr_db"]) >= 40 and chosen[0]["size_ratio"] < 0.6  # most weights in 8 bits
    # Screening measured every (block, item) pair the item changes: static INT8 all 5 convs, the
    # weight formats the 4 whose weights reach min_elements.
    log = trials(run)
    screening = [t for t in log if t["kind"] == "screening"]
    assert len(screening) == tune["screening_trials"] == 13
    assert all(not t["cached"] for t in log)
    # The resolved recipe names exact blocks, has no tune section, and rebuilds the same file from scratch.
    resolved = run / "resolved_recipe.yaml"
    data = yaml.safe_load(resolved.read_text())
    assert "tune" not in data and data["steps"]
    assert all(s["name"] in {"int8-static", "int8-weights", "fp16-weights"} for s in data["steps"])
    assert all(p.startswith(("/enc/layers", "/dec")) for s in data["steps"] for p in s["scope"]["include"])
    again = cli("run", str(resolved), "--out", str(workdir / "again"))
    assert again.code == 0, again.stderr
    assert sha256(workdir / "again" / "final" / "tiny.onnx") == sha256(run / "final" / "tiny.onnx")
    assert "Precision search" in (run / "report.md").read_text()
    assert "Precision search" in (run / "report.html").read_text()
    # A re-run reads every trial back and resolves the same recipe.
    first = resolved.read_text()
    rerun = cli("run", str(recipe), "--out", str(run))
    assert rerun.code == 0, rerun.stderr
    assert all(t["cached"] for t in trials(run))
    assert resolved.read_text() == first


def test_ray_executor_resolves_the_same_recipe_as_local(workdir):
    local = cli("tune", str(write(workdir, name="local.yaml")), "--out", str(workdir / "local"))
    assert local.code == 0, local.stderr
    ray = cli("tune", str(write(workdir, extra="  executor: ray\n  workers: 2", name="ray.yaml")),
              "--out", str(workdir / "ray"))
    assert ray.code == 0, ray.stderr
    assert "Ray local instance" in ray.stdout + ray.stderr
    strip = lambda p: "\n".join(line for line in p.read_text().splitlines()[2:])  # noqa: E731 (header names the file)
    assert strip(workdir / "ray" / "resolved_recipe.yaml") == strip(workdir / "local" / "resolved_recipe.yaml")
    assert [t["kind"] for t in trials(workdir / "ray")].count("screening") == 13
    assert all(not t["cached"] for t in trials(workdir / "ray"))  # measured on Ray, not read from local's folder
    ray_results = {(t["block"], t["item"]): t["noise_ratio"] for t in trials(workdir / "ray")
                   if t["kind"] == "screening"}
    local_results = {(t["block"], t["item"]): t["noise_ratio"] for t in trials(workdir / "local")
                     if t["kind"] == "screening"}
    assert ray_results == local_results


@pytest.mark.parametrize("menu, extra, message", [
    ("[]", "", "tune.menu: List should have at least 1 item"),
    ("[{name: a, pass: sharpen}]", "", "unknown pass 'sharpen'"),
    ("[{name: a, pass: compress_weights, params: {dtype: int3}}]", "", "tune.menu.0 (a).params: dtype"),
    ("[{name: a, pass: compress_weights, params: {bits: 8}}]", "", "unknown key 'bits'"),
    ("[{name: a, pass: simplify}]", "", "does not change precision"),
    ("[{name: a, pass: compress_weights, params: {dtype: int8, min_elements: 64}}]", "  budget: {trials: 3}",
     "measuring every block once under each menu item takes 4 trials"),
    ("[{name: a, pass: compress_weights, params: {dtype: int8}}]", "  executor: ray\n  address: 'ray://127.0.0.1:9'", "does not answer"),
])
def test_bad_tune_sections_are_one_line_errors(workdir, menu, extra, message):
    text = TUNE.format(target=40, extra=extra)
    start = text.index("  menu:")
    end = text.index("  target:")
    (workdir / "r.yaml").write_text(text[:start] + f"  menu: {menu}\n" + text[end:])
    res = cli("tune", str(workdir / "r.yaml"), "--out", str(workdir / "run"))
    assert res.code == 2, res.stderr
    assert message in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in res.stderr and len(errors) == 1 and message in errors[0]


def test_target_the_family_cannot_measure_is_an_error(workdir):
    (workdir / "r.yaml").write_text(TUNE.format(target=40, extra="").replace("min_output_sqnr_db: 40",
                                                                             "max_log_mel: 0.1"))
    res = cli("validate", str(workdir / "r.yaml"))
    assert res.code == 2
    assert "tune.target.max_log_mel: nothing to measure: it needs an audio output" in res.stderr


def test_ray_executor_without_ray_names_the_extra(workdir, monkeypatch):
    from pipeline.search import trials as tune_trials
    from pipeline.core.errors import PipelineError
    from pipeline.core.recipe import load_recipe
    from pipeline.search.run import check_recipe

    real = importlib.util.find_spec
    monkeypatch.setattr(tune_trials.importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    recipe = load_recipe(write(workdir, extra="  executor: ray"))
    with pytest.raises(PipelineError, match=r"needs Ray, which is not installed: pip install -e '\.\[ray\]'"):
        check_recipe(recipe)


def test_tune_recipe_with_precision_steps_or_without_tune_is_refused(workdir):
    text = TUNE.format(target=40, extra="") + "steps:\n  - {pass: compress_weights, params: {dtype: fp16}}\n"
    (workdir / "steps.yaml").write_text(text)
    res = cli("validate", str(workdir / "steps.yaml"))
    assert res.code == 2 and "steps: compress_weights change precision: with 'tune', the search decides" in res.stderr
    (workdir / "plain.yaml").write_text("name: plain\nmodel: {path: tiny.onnx}\nsteps: []\n")
    res = cli("tune", str(workdir / "plain.yaml"))
    assert res.code == 2 and "no 'tune' section" in res.stderr


def test_the_recipes_own_steps_run_before_the_search_and_lead_the_resolved_recipe(workdir):
    # (A quantized export's `dequantize` goes here; on this float model, simplify stands in for it.)
    text = TUNE.format(target=40, extra="") + "steps:\n  - {pass: simplify}\n"
    (workdir / "prefix.yaml").write_text(text)
    res = cli("tune", str(workdir / "prefix.yaml"), "--out", str(workdir / "run"))
    assert res.code == 0, res.stderr
    steps = yaml.safe_load((workdir / "run" / "resolved_recipe.yaml").read_text())["steps"]
    assert steps[0]["pass"] == "simplify" and len(steps) > 1
    assert (workdir / "run" / "tune" / "base" / "steps" / "01-simplify").is_dir()
    again = cli("run", str(workdir / "run" / "resolved_recipe.yaml"), "--out", str(workdir / "again"))
    assert again.code == 0, again.stderr
    assert sha256(workdir / "again" / "final" / "tiny.onnx") == sha256(workdir / "run" / "final" / "tiny.onnx")


def test_solver_prefers_cheap_quality_and_respects_bans():
    from pipeline.search.tune import Option, solve

    options = {
        "a": [Option("int8", bytes=-80, quality={"noise": 0.5})],  # big saving, costly in quality
        "b": [Option("int8", bytes=-60, quality={"noise": 0.05})],
        "c": [Option("int8", bytes=-60, quality={"noise": 0.05}, banned="length changed alone"),
              Option("fp16", bytes=-40, quality={"noise": 0.0})],
    }
    assignment, predicted = solve(options, {"noise": 0.2}, {"noise": 1.0}, (1.0, 0.0), 300, 1.0)
    assert assignment == {"b": "int8", "c": "fp16"}
    assert predicted["noise"] == pytest.approx(0.05)
    loose, _ = solve(options, {"noise": 1.0}, {"noise": 1.0}, (1.0, 0.0), 300, 1.0)
    assert loose == {"a": "int8", "b": "int8", "c": "fp16"}
    # A measured model that errors add up to twice the sum makes the choice stricter.
    strict, _ = solve(options, {"noise": 0.2}, {"noise": 5.0}, (1.0, 0.0), 300, 1.0)
    assert strict == {"c": "fp16"}
