"""What a user sees while a run works, and one run per folder: the progress display (plain lines in a log,
nothing with --quiet), the run-folder lock (a live holder refuses a second run, a killed one is taken over),
and Ctrl-C, which leaves the folder resumable and says how to resume."""
from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny
from conftest import REPO, cli
from rich.console import Console

from pipeline.core import progress
from pipeline.core.progress import Display, activity, track

RECIPE = """name: tiny_progress
model: {{path: {model}}}
calibration: {{source: npz, params: {{folder: {feeds}}}}}
steps:
  - pass: quantize
    params: {{mode: static, op_types: [Conv]}}
check: {{samples: 4}}
"""


def _recipe(tmp_path: Path, model: Path, feeds: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(model=model, feeds=feeds))
    return path


def _plain() -> tuple[Display, io.StringIO]:
    buf = io.StringIO()
    return Display(Console(file=buf, width=200, force_terminal=False), "plain"), buf


def test_plain_display_shows_a_heartbeat_for_silent_work_and_the_end_of_a_counted_task(monkeypatch):
    monkeypatch.setenv(progress.PLAIN_EVERY_ENV, "0.5")  # the real variable, read as a user sets it
    display, buf = _plain()
    with display:
        with activity("step 01 quantize"):
            time.sleep(1.6)  # reports nothing itself: the heartbeat shows it is alive
        for _ in track(range(4), "calibrating"):
            time.sleep(0.4)
    lines = buf.getvalue().splitlines()
    assert any(re.fullmatch(r"step 01 quantize \.\.\. \d+ s", line) for line in lines), lines
    assert any(re.fullmatch(r"calibrating: [123]/4 \(\d+ s, about \d+ s left\)", line) for line in lines), lines
    assert lines[-1].startswith("calibrating: 4/4 ("), lines


def test_quiet_display_prints_nothing_and_no_display_costs_nothing():
    buf = io.StringIO()
    with Display(Console(file=buf, force_terminal=False), "quiet") as display:
        display.log("step 01: done")
        for _ in track([1, 2], "samples"):
            pass
    assert buf.getvalue() == ""
    assert list(track([1, 2, 3], "outside any display")) == [1, 2, 3]


def test_quiet_run_prints_only_the_result(tmp_path, tiny_model, tiny_feeds):
    recipe = _recipe(tmp_path, tiny_model, tiny_feeds)
    res = cli("run", str(recipe), "--out", str(tmp_path / "run"), "--quiet")
    assert res.code == 0, res.stderr
    assert res.stderr == ""
    lines = res.stdout.splitlines()
    assert lines[0] == f"final model: {tmp_path / 'run' / 'final'}"
    assert lines[-1].startswith("report: ")
    assert not any("step 0" in line or "per-block error" in line for line in lines), lines


def test_terminal_table_shows_the_worst_blocks_unless_asked_for_all(tmp_path, tiny_feeds):
    model = tiny.save(tiny.conv_net(layers=12), tmp_path / "deep.onnx")  # 14 blocks, more than the table's 8
    recipe = _recipe(tmp_path, model, tiny_feeds)
    few = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    every = cli("run", str(recipe), "--out", str(tmp_path / "run"), "--all-blocks")
    assert few.code == every.code == 0, few.stderr + every.stderr
    layers = [f"/enc/layers.{i} " for i in range(12)]
    assert sum(name in every.stdout for name in layers) == 12
    assert sum(name in few.stdout for name in layers) <= 8


def _holder(folder: Path) -> subprocess.Popen:
    """Another process holding the run folder, as a live run does."""
    code = ("import sys, time; from pathlib import Path; from pipeline.engine.runfolder import hold\n"
            "with hold(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_run_holds_its_folder_and_a_killed_one_is_taken_over(tmp_path, tiny_model, tiny_feeds):
    recipe, folder = _recipe(tmp_path, tiny_model, tiny_feeds), tmp_path / "run"
    holder = _holder(folder)
    try:
        res = cli("run", str(recipe), "--out", str(folder))
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.code == 2 and len(lines) == 1, res.stderr
        assert f"in use by another run (process {holder.pid}" in lines[0], lines[0]
        assert "Traceback" not in res.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    res = cli("run", str(recipe), "--out", str(folder))
    assert res.code == 0, res.stderr
    assert f"taking over from run process {holder.pid}" in res.stderr
    assert (folder / "final").is_dir()
    again = cli("run", str(recipe), "--out", str(folder))  # released cleanly: nothing to take over
    assert again.code == 0 and "taking over" not in again.stderr


@pytest.mark.e2e
def test_ctrl_c_leaves_a_resumable_folder_and_the_progress_shows_on_a_real_piper_run(tmp_path):
    """The shipped INT8 voice: interrupted while it calibrates, then resumed with the command it prints. Its
    log (not a terminal) shows the calibration's progress with the time left."""
    folder = tmp_path / "run"
    args = [sys.executable, "-m", "pipeline.cli", "run", str(REPO / "recipes" / "piper_int8.yaml"), "--out",
            str(folder)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200", PIPELINE_PROGRESS_EVERY_S="2")
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "calibrating:" in line:  # the first heartbeat, 2 s into the calibration
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    stderr = "".join(seen) + rest
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    hint = re.search(r"interrupted: finished steps are kept in .*; resume with: (pipeline run .*)$", stderr, re.M)
    assert hint, stderr
    assert not list(folder.glob("steps/.*partial")) and not (folder / "tmp").exists()
    assert (folder / "steps" / "00-base").is_dir() and not (folder / "steps" / "01-int8-flow-activations").exists()

    resume = hint.group(1).split()[1:]  # the printed command, run as the user would
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", *resume], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr
    assert "step 00 base: cached" in res.stderr
    assert re.search(r"calibrating: \d+/60 \(\d+ s, about \d+ s left\)", res.stderr), res.stderr
    assert (folder / "final" / "en_US-joe-medium.onnx").is_file()
