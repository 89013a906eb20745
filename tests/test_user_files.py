"""Nothing of the user's is ever lost or overwritten: names that become paths, outputs that alias inputs, numbers
nobody checked, and errors that name the file and the step. The examples are the ones users hit (issue text);
every refusal is one line and exit 2, with the user's files byte for byte as they were."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
from conftest import REPO, cli, one_line, sha256, tree

RECIPE = """name: {name}
model: {{path: {model}}}
calibration: {{source: npz, params: {{folder: {feeds}}}}}
steps:
  - pass: quantize
    name: {step}
    params: {{mode: dynamic, op_types: [Conv]}}
"""


def write_recipe(folder: Path, model: Path, feeds: Path, name: str = "user_files", step: str = "int8",
                 file: str = "recipe.yaml") -> Path:
    path = folder / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(RECIPE.format(name=name, model=model, feeds=feeds, step=step))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its sha256: what a refused command must leave exactly as it was."""
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(args: list[str], expect: str, folder: Path) -> str:
    """Run the command in-process; it must fail with one line containing `expect` and change nothing in
    `folder`."""
    before = snapshot(folder)
    res = cli(*args)
    assert res.exit_code == 2, res.output
    line = one_line(res.stderr)
    assert line.startswith("error:") and "internal error" not in line and expect in line, line
    assert snapshot(folder) == before
    return line


@pytest.fixture
def user(tmp_path: Path) -> dict[str, Path]:
    """A user's project folder: a model, its feeds, a folder of their own files beside it."""
    model = tiny.save(tiny.conv_net(), tmp_path / "models" / "tiny.onnx")
    feeds = tiny.write_npz_feeds(tmp_path / "feeds")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own file\n")
    return {"root": tmp_path, "model": model, "feeds": feeds, "mine": mine}


# -- 1. names that become paths -------------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["../../../mine", "../../../../mine", "a/b", "..", ".hidden", "-x"])
def test_a_step_name_that_is_no_plain_name_is_refused_before_anything_is_written(user, step):
    """The report: a step named with `../` made a run replace a folder outside --out, and exit 0."""
    root = user["root"]
    recipe = write_recipe(root, user["model"], user["feeds"], step=f"'{step}'")
    line = refused(["run", str(recipe), "--out", str(root / "work" / "run")], "steps.0.name:", root)
    assert "is not a plain name" in line and str(recipe) in line
    assert not (root / "work").exists()
    assert (user["mine"] / "notes.txt").read_text() == "the user's own file\n"


@pytest.mark.parametrize("step", ['"a\\0b"', "x" * 300])
def test_a_nul_byte_or_a_300_character_name_is_one_line_not_an_os_error(user, step):
    root = user["root"]
    recipe = write_recipe(root, user["model"], user["feeds"], step=step)
    refused(["run", str(recipe), "--out", str(root / "run")], "steps.0.name:", root)
    refused(["validate", str(recipe)], "is not a plain name", root)


@pytest.mark.parametrize("key,text", [("name", "name: '..'"), ("targets.0.format", "targets: [{format: ../x}]"),
                                      ("tune.menu.0.name", "tune: {menu: [{name: '..', pass: fp16}], "
                                                           "target: {max_log_mel: 1}}")])
def test_every_name_that_becomes_a_path_follows_the_one_rule(user, key, text):
    """A recipe named `..` would run in runs/.. (the current folder); a menu item's name names a step."""
    root = user["root"]
    recipe = root / "recipe.yaml"
    base = RECIPE.format(name="user_files", model=user["model"], feeds=user["feeds"], step="int8")
    recipe.write_text(text + "\n" + base if key == "name" else base + text + "\n")
    if key == "name":
        recipe.write_text(base.replace("name: user_files", text))
    refused(["validate", str(recipe)], f"{key}:", root)


# -- 2. outputs that alias inputs ---------------------------------------------------------------------------------


def test_a_model_inside_the_run_folder_is_refused_and_kept(user):
    """The report: R/final/x.onnx run with --out R was silently replaced by the run's own final/."""
    root, run = user["root"], user["root"] / "R"
    first = write_recipe(root, user["model"], user["feeds"])
    assert cli("run", str(first), "--out", str(run), "-q").exit_code == 0
    inside = run / "final" / "tiny.onnx"
    recipe = write_recipe(root, inside, user["feeds"], file="again.yaml")
    line = refused(["run", str(recipe), "--out", str(run)], "lies inside the run folder", root)
    assert str(inside) in line


def test_feeds_inside_the_run_folder_are_refused(user):
    root, run = user["root"], user["root"] / "R"
    run.mkdir()
    feeds = tiny.write_npz_feeds(run / "feeds")
    recipe = write_recipe(root, user["model"], feeds)
    refused(["run", str(recipe), "--out", str(run)], f"input {feeds} lies inside the run folder", root)


@pytest.mark.parametrize("out", ["", "   "])
def test_an_empty_out_is_an_error_and_the_current_folder_keeps_its_final(user, monkeypatch, out):
    """The report: `--out ""` (an unset shell variable) made the current folder the run folder, and the user's
    final/ there was deleted."""
    root = user["root"]
    (root / "final").mkdir()
    (root / "final" / "mine.onnx").write_bytes(b"the user's model")
    monkeypatch.chdir(root)
    recipe = write_recipe(root, user["model"], user["feeds"])
    refused(["run", str(recipe), "--out", out], "Invalid value for '--out': empty", root)
    recipe.write_text(recipe.read_text() + f"output: '{out}'\n")
    refused(["run", str(recipe)], "output: an empty folder name", root)


def test_a_folder_that_no_run_made_is_not_taken_as_a_run_folder(user, monkeypatch):
    """`--out .` in a project folder: the run would replace the final/ it finds there."""
    root, project = user["root"], user["root"] / "project"
    (project / "final").mkdir(parents=True)
    (project / "final" / "mine.onnx").write_bytes(b"the user's model")
    monkeypatch.chdir(project)
    recipe = write_recipe(root, user["model"], user["feeds"])
    refused(["run", str(recipe), "--out", "."], "is not a run folder", root)
    refused(["run", str(recipe), "--out", str(project)], "is not a run folder", root)
    refused(["run", str(recipe), "--out", str(user["mine"])], "no .pipeline-run marker", root)


def test_a_run_replaces_only_what_a_run_made(user):
    """Inside a run folder, a final/ without the run's manifest (the user's own) is not replaced."""
    root, run = user["root"], user["root"] / "R"
    recipe = write_recipe(root, user["model"], user["feeds"])
    assert cli("run", str(recipe), "--out", str(run), "-q").exit_code == 0
    assert (run / ".pipeline-run").is_file()
    (run / "final" / ".final.json").unlink()  # now final/ is not provably the run's
    (run / "final" / "notes.txt").write_text("mine")
    write_recipe(root, user["model"], user["feeds"], step="other")  # a new step: final/ must be rebuilt
    res = cli("run", str(recipe), "--out", str(run), "-q")
    assert res.exit_code == 2, res.output
    assert "final was not written by a run (no .final.json in it)" in one_line(res.stderr)
    assert (run / "final" / "notes.txt").read_text() == "mine"


def test_a_run_folder_of_an_earlier_version_is_still_one(user):
    """Folders an earlier version ran in have its lock file but no marker: they stay usable."""
    root, run = user["root"], user["root"] / "R"
    recipe = write_recipe(root, user["model"], user["feeds"])
    assert cli("run", str(recipe), "--out", str(run), "-q").exit_code == 0
    (run / ".pipeline-run").unlink()
    res = cli("run", str(recipe), "--out", str(run), "-q")
    assert res.exit_code == 0, res.output
    assert (run / ".pipeline-run").is_file()


def test_a_recipe_may_lie_at_the_top_of_its_run_folder_but_not_where_the_run_writes(user):
    """A resolved recipe is run from the folder tune wrote it into; one inside final/ would be replaced."""
    root, run = user["root"], user["root"] / "R"
    recipe = write_recipe(root, user["model"], user["feeds"])
    assert cli("run", str(recipe), "--out", str(run), "-q").exit_code == 0
    top = write_recipe(run, user["model"], user["feeds"], file="resolved_recipe.yaml")
    res = cli("run", str(top), "--out", str(run), "-q")
    assert res.exit_code == 0, res.output
    deep = write_recipe(run / "steps", user["model"], user["feeds"], file="mine.yaml")
    refused(["run", str(deep), "--out", str(run)], "lies where the run in", root)


def test_report_paths_never_name_an_input(user):
    """The report: `--json` naming one of the command's own inputs overwrote it."""
    root, model, feeds = user["root"], user["model"], user["feeds"]
    compare = ["compare", str(model), str(model), "--npz", str(feeds)]
    refused([*compare, "--json", str(model)], f"--json {model} would write {model}, which is the input", root)
    refused([*compare, "--html", str(feeds / "page.html")], "lies inside it", root)
    refused([*compare, "--md", str(model.with_suffix(".md")), "--json", str(model.with_suffix(".md"))],
            "both name", root)
    refused(["bench", str(model), str(model), "--json", str(model)], "which is the input", root)


@pytest.mark.parametrize("option,value,expect", [("--md", "", "empty"), ("--html", "  ", "empty"),
                                                  ("--json", ".", "names no file"), ("--md", "/", "names no file")])
def test_a_blank_report_path_is_one_line(user, option, value, expect):
    """`--md ''` crashed on `.with_suffix`, and `--md ' '` wrote files named ' ' and ' .png'."""
    model = str(user["model"])
    refused(["compare", model, model, "--npz", str(user["feeds"]), option, value], f"'{option}': {expect}"
            if expect == "empty" else expect, user["root"])


def test_a_report_path_in_a_missing_folder_fails_before_the_work(user):
    root, model = user["root"], user["model"]
    line = refused(["compare", str(model), str(model), "--npz", str(user["feeds"]), "--json",
                    str(root / "nowhere" / "r.json")], "does not exist; make it first", root)
    assert str(root / "nowhere") in line
    res = cli("compare", str(model), str(model), "--npz", str(user["feeds"]), "--md", str(root / "no" / "r.md"))
    assert res.exit_code == 2 and "peak RSS" not in res.stdout  # refused before any comparison ran


# -- 3. numbers and settings nobody checked --------------------------------------------------------------------


@pytest.mark.parametrize("args,option", [
    (["compare", "{m}", "{m}", "--npz", "{f}", "--samples", "0"], "--samples"),
    (["compare", "{m}", "{m}", "--npz", "{f}", "--samples", "-3"], "--samples"),
    (["bench", "{m}", "{m}", "--repeat", "0"], "--repeat"),
    (["bench", "{m}", "{m}", "--threads", "-1"], "--threads"),
    (["bench", "{m}", "{m}", "--sentences", "0"], "--sentences"),
    (["generate", "{r}", "--steps", "0"], "--steps"),
    (["generate", "{r}", "--seed", "-1"], "--seed"),
    (["generate", "{r}", "--threads", "0"], "--threads"),
    (["bench", "{m}", "{m}", "--repeat", "many"], "--repeat"),
])
def test_cli_numbers_out_of_range_are_one_line(user, args, option):
    filled = [a.format(m=user["model"], f=user["feeds"], r=user["root"]) for a in args]
    refused(filled, f"Invalid value for '{option}'", user["root"])


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", ""])
def test_a_bad_environment_variable_is_one_line_naming_it(user, monkeypatch, value):
    monkeypatch.setenv("PIPELINE_PROGRESS_EVERY_S", value)
    recipe = write_recipe(user["root"], user["model"], user["feeds"])
    refused(["run", str(recipe), "--out", str(user["root"] / "run")], "PIPELINE_PROGRESS_EVERY_S", user["root"])


@pytest.mark.parametrize("text,expect", [
    ("name: x\nmodel: &m {path: *m}\n", "model.path: a YAML anchor refers to itself"),
    ("name: x\nmodel: {path: m.onnx}\nsteps: &s [*s]\n", "steps.0: a YAML anchor refers to itself"),
    ("name: x\nmodel: {path: m.onnx}\nx: " + "[" * 40 + "]" * 40 + "\n", "nested deeper than"),
    ("name: x\nmodel: {path: m.onnx}\ncheck: {min_sqnr_db: .nan}\n", "check.min_sqnr_db"),
    ("name: x\nmodel: {path: m.onnx}\ntune: {menu: [{name: a, pass: fp16}], target: {max_log_mel: 1}, seed: -1}\n",
     "tune.seed"),
    ("name: x\nmodel: {path: ~no_such_user_here/m.onnx}\n", "no home folder is known for '~no_such_user_here'"),
    ("name: x\nmodel: {path: m.onnx}\ncalibration: {source: npz, params: {folder: f, pattern: ''}}\n"
     "steps: [{pass: fp16}]\n",
     "calibration.params: pattern: '': give a glob relative to the folder"),
    ("name: x\nmodel: {path: m.onnx}\nblocks: {patterns: ['[[a']}\n", "blocks.patterns: pattern '[[a' is not"),
    ("name: x\nmodel: {path: m.onnx}\nx: &a [1,2,3,4,5,6,7,8,9,10]\ny: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
     "z: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nw: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\nv: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n",
     "values once its aliases are expanded"),
])
def test_recipes_nobody_can_mean_are_one_line(tmp_path, text, expect):
    tiny.save(tiny.conv_net(), tmp_path / "m.onnx")
    tiny.write_npz_feeds(tmp_path / "f")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    refused(["validate", str(recipe)], expect, tmp_path)


# -- 4. errors that name the file and the step ---------------------------------------------------------------


def test_a_corrupt_graph_in_a_run_folder_is_named(user):
    root, run = user["root"], user["root"] / "R"
    recipe = write_recipe(root, user["model"], user["feeds"])
    assert cli("run", str(recipe), "--out", str(run), "-q").exit_code == 0
    graph = run / "final" / "tiny.onnx"
    graph.write_bytes(b"\x08\x07garbage" * 10)
    refused(["inspect", str(run)], f"{graph}: not a valid ONNX model", root)
    refused(["compare", str(run / "final"), str(user["model"]), "--npz", str(user["feeds"])], str(graph), root)


def test_a_full_disk_names_the_file_and_what_was_being_written(user):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    res = cli("compare", str(user["model"]), str(user["model"]), "--npz", str(user["feeds"]), "--json", "/dev/full")
    assert res.exit_code == 2, res.output
    assert one_line(res.stderr) == "error: writing --json /dev/full: No space left on device"


def test_a_write_the_os_refuses_names_the_step_and_the_path(user):
    """A real limit on file size (RLIMIT_FSIZE, as a quota does): the run stops at the step, naming both."""
    root = user["root"]
    recipe = write_recipe(root, user["model"], user["feeds"])

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--out", str(root / "run")],
                         capture_output=True, text=True, preexec_fn=small_files, cwd=REPO, timeout=300)
    assert res.returncode == 2, res.stderr
    line = one_line(res.stderr)
    assert line.startswith("error: step 00 base: ") and "File too large" in line, line
    assert str(root / "run" / "steps") in line
    assert sha256(user["model"]) == sha256(tiny.save(tiny.conv_net(), root / "again.onnx"))
    assert tree(user["mine"]) == {"notes.txt"}
