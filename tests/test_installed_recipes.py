"""The shipped recipes are package data: `pipeline recipes` lists them, and every command takes a recipe's name
(`pipeline run piper_int8`) from any folder, as after a plain `pip install` of the package."""
from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli, one_line, tree


SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))



def test_pipeline_recipes_lists_every_shipped_recipe_with_its_description(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: the listing must not depend on the current folder
    res = cli("recipes")
    assert res.exit_code == 0, res.output
    lines = {line.split()[0]: line for line in res.stdout.splitlines() if line.strip()}
    assert len(SHIPPED) >= 15
    for path in SHIPPED:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        # The name a user types is the file's stem; it must be the recipe's own `name` (runs/<name>) too.
        assert data["name"] == path.stem
        assert data["description"], f"{path.name} has no description to list"
        assert path.stem in lines, res.stdout
        assert " ".join(data["description"].split()) in " ".join(lines[path.stem].split())
    assert list(tmp_path.iterdir()) == []  # listing writes nothing


def test_validate_takes_an_installed_recipe_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli("validate", "piper_int8")
    assert res.exit_code == 0, res.output
    assert one_line(res.stdout) == "piper_int8: ok (3 steps, 60 calibration samples)"
    assert list(tmp_path.iterdir()) == []


def test_tune_takes_a_name_too(tmp_path, monkeypatch):
    """`pipeline tune NAME` resolves the name like every command (load_recipe): piper_int8 is found, and refused
    only because it has no tune section, not as a missing file."""
    monkeypatch.chdir(tmp_path)
    res = cli("tune", "piper_int8")
    assert res.exit_code == 2
    line = one_line(res.stderr)
    assert "no 'tune' section" in line and "not found" not in line


def test_an_unknown_name_is_one_line_listing_the_installed_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in ("run", "validate", "tune"):
        res = cli(command, "piper_int9")
        assert res.exit_code == 2, res.output
        line = one_line(res.stderr)
        assert line.startswith("error: recipe not found: 'piper_int9' is no file here and no installed recipe")
        installed = line.split("(installed: ", 1)[1].split(";")[0].split(", ")
        assert installed == [p.stem for p in SHIPPED]
    assert list(tmp_path.iterdir()) == []  # no runs/ folder for a recipe that does not exist


def test_a_path_works_as_before_and_an_existing_file_wins_over_a_name(tmp_path, monkeypatch, tiny_model, tiny_feeds):
    monkeypatch.chdir(tmp_path)
    # A file in the current folder named like an installed recipe is that file, not the installed recipe.
    (tmp_path / "piper_int8").write_text(f"name: local\nmodel: {{path: {tiny_model}}}\nsteps: [{{pass: simplify}}]\n")
    res = cli("validate", "piper_int8")
    assert res.exit_code == 0, res.output
    assert one_line(res.stdout) == "piper_int8: ok (1 steps)"
    # A path to a shipped file, and the errors of paths that do not exist, are what they always were.
    res = cli("validate", str(REPO / "recipes" / "piper_fp16.yaml"))
    assert res.exit_code == 0 and "piper_fp16.yaml: ok" in res.stdout, res.output
    for missing in ("piper_fp16.yaml", "sub/piper_fp16", str(tmp_path / "nope.yml")):
        res = cli("validate", missing)
        assert res.exit_code == 2
        assert one_line(res.stderr) == f"error: recipe not found: {missing}"


def test_pyproject_ships_every_package_and_data_file():
    """pyproject.toml lists its packages (recipes/ is mapped into `pipeline.recipes`, which discovery cannot do):
    a subpackage or a calibration data file that is not listed would be missing from a plain install."""
    import tomllib  # Python 3.11+, as the tests need anyway (contextlib.chdir): never skipped
    from setuptools import find_packages

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = find_packages(str(REPO), include=["pipeline*", "passes*", "calibration*"])
    assert sorted(config["packages"]) == sorted([*on_disk, "pipeline.recipes"])
    assert config["package-dir"] == {"pipeline.recipes": "recipes"}
    data = config["package-data"]
    for path in (REPO / "calibration" / "data").rglob("*"):
        name = path.relative_to(REPO / "calibration").as_posix()
        assert path.is_dir() or any(fnmatch.fnmatch(name, pattern) for pattern in data["calibration"]), name
    assert data["pipeline.recipes"] == ["*.yaml"]


def _source_copy(dest: Path) -> Path:
    """What a wheel is built from, copied: building in the checkout would write build/ there, and a stale build/
    from an earlier layout would end up in the wheel and hide a missing mapping."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("pipeline", "passes", "calibration", "recipes"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def test_the_wheel_holds_every_recipe_module_and_data_file(tmp_path):
    src = _source_copy(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "-w", str(tmp_path / "wheel"), "--no-deps",
                    "-q"], check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = (tmp_path / "wheel").glob("tts_onnx_pipeline-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in SHIPPED:
        assert f"pipeline/recipes/{path.name}" in names
    assert "pipeline/recipes/__init__.py" in names
    assert not any(n.startswith("recipes/") for n in names)  # no top-level `recipes` package in site-packages
    shipped_files = [p for folder in ("pipeline", "passes", "calibration") for p in (src / folder).rglob("*")
                     if p.is_file() and (p.suffix == ".py" or p.parent.name == "data")]
    missing = sorted(str(p.relative_to(src)) for p in shipped_files if str(p.relative_to(src)) not in names)
    assert missing == []
    assert {"calibration/data/sentences_en.txt", "calibration/data/tortoise_tokens.json"} <= names
    top = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top).decode().split() == ["calibration", "passes", "pipeline"]


@pytest.mark.e2e
def test_run_by_name_writes_runs_name_in_the_current_folder(tmp_path):
    """The README's first command on an installed package, by name, from a folder that is not the checkout."""
    res = cli("run", "piper_fp16", cwd=tmp_path)
    assert res.code == 0, res.stderr[-2000:]
    assert (tmp_path / "runs" / "piper_fp16" / "final" / "en_US-joe-medium.onnx").is_file()
    assert {p.split("/")[0] for p in tree(tmp_path)} == {"runs"}
