"""Every repo path and module the README and docs/ mention exists: a moved file cannot leave the docs behind.

What counts as a mention (the rule, applied to the whole text, code spans and code blocks included):

1. **Repo paths**: a token that starts at one of the repository's top-level folders (`REPO_ROOTS`: `pipeline/`,
   `passes/`, `recipes/`, `tests/`, ...) and runs over path characters, e.g. `pipeline/engine/runner.py`,
   `recipes/piper_int8.yaml`, `.ci/run`. It must exist; a glob (`recipes/*.yaml`) must match something; a
   placeholder (`pipeline/families/<name>/`) is checked up to where it starts. Paths rooted anywhere else are not
   this repository's: run-folder outputs (`runs/piper_int8/final/...`, `final/<format>/`), user files in examples
   (`/data/my_mels`, `hello.wav`), other projects' files (`tortoise/models/autoregressive.py`).
2. **Bare file names**: a token with no folder and a source or data extension (`BARE_EXTENSIONS`: `check.py`,
   `eval_en.txt`, `resolved_recipe.yaml`). It must be the name of a file somewhere in the repo, unless
   `NOT_REPO_FILES` lists it (what a run writes, what a user or another project has).
3. **Module references**: a dotted name rooted at one of our packages (`pipeline.core.audio.MelSettings`,
   `calibration.tortoise_texts`). Its longest importable prefix is imported and the rest looked up as
   attributes; every part must resolve, unless `NOT_MODULES` lists it (metadata keys, recipe key paths).
   In code blocks, `from pipeline.x import a, b` must also resolve `a` and `b`.

And nothing may mention the team's background design notes, which live outside the repo: a clone lacks them.
"""
from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import pytest
from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# The repository's top-level folders and files: a path starting at one of them claims to be a file of this repo.
REPO_ROOTS = ("pipeline", "passes", "calibration", "recipes", "tests", "benchmarks", "docs", ".ci")
ROOT_FILES = ("README.md", "pyproject.toml", ".gitignore")
# Our importable packages: a dotted name starting with one of them claims to be a module or an attribute of one.
PACKAGES = ("pipeline", "passes", "calibration")
BARE_EXTENSIONS = ("py", "md", "toml", "yaml", "yml", "txt", "json", "cfg")

# Bare file names that are not files of this repository, each for a reason.
NOT_REPO_FILES = {
    # what a run writes into its run folder, or the ModelSet folders it makes (pipeline/engine/runner.py,
    # pipeline/engine/runfolder.py, pipeline/core/modelset.py, pipeline/formats/targets.py)
    "manifest.json", "step.json", "modelset.json", "report.json", "report.md", "resolved_recipe.yaml",
    ".final.json", ".target.json",
    # a sidecar a Piper voice carries next to its .onnx (`<voice>.onnx.json`), and the metadata file the TorchScript
    # target writes inside the .pt
    ".onnx.json", "pipeline.json",
    # files a user names on the command line in the README's examples
    "before.json", "out.json", "cmp.json", "kokoro.json",
    # what a user puts beside an npz folder's feeds: the text each speaks (calibration/npz_folder.py)
    "texts.txt",
    # other projects' files: Tortoise's api.py and tokenizer.json, a sharded Hugging Face checkpoint's index
    "api.py", "tokenizer.json", "model.safetensors.index.json",
}
# Dotted names rooted at a package name that are not Python references.
NOT_MODULES = {
    # provenance keys written into every output ONNX's metadata_props (README, "Writing a family")
    "pipeline.recipe", "pipeline.passes", "pipeline.version", "pipeline.recipe_sha256",
    # the TorchScript target's metadata file inside the .pt
    "pipeline.json",
    # a recipe key path in an error message (the recipe's `calibration:` section)
    "calibration.params.count",
}
# Files that are never the repository's own, whatever mentions them (see the module docstring).
OUTSIDE_NOTES = "DESIGN" ".md"  # spelt in two pieces so this file does not cite it either
FORBIDDEN = re.compile(re.escape(OUTSIDE_NOTES), re.IGNORECASE)

_PATH = re.compile(r"(?<![\w./~-])(?:" + "|".join(re.escape(r) for r in REPO_ROOTS) + r")/[\w./*-]*")
_ROOT_FILE = re.compile(r"(?<![\w./~-])(?:" + "|".join(re.escape(f) for f in ROOT_FILES) + r")(?![\w/-])")
_BARE = re.compile(r"(?<![\w./~<-])\.?[\w-][\w.-]*\.(?:" + "|".join(BARE_EXTENSIONS) + r")(?![\w/.-])")
_DOTTED = re.compile(r"(?<![\w./~-])(?:" + "|".join(PACKAGES) + r")(?:\.\w+)+")
# `from X import a, b as c` on one line, or `from X import (a,\n b)` over several
_FROM_IMPORT = re.compile(r"from[ \t]+((?:" + "|".join(PACKAGES) + r")(?:\.\w+)*)[ \t]+import[ \t]+"
                          r"(?:\(([\w\s,]+)\)|([\w \t,]+))")
_IGNORED_DIRS = {".git", ".venv", "venv", "runs", "build", "dist", "__pycache__", ".hypothesis", ".pytest_cache"}


def repo_paths(text: str) -> set[str]:
    """Rule 1: paths rooted at a top-level folder of the repo, and its top-level files."""
    found = {m.rstrip(".") for m in _PATH.findall(text)}
    return found | set(_ROOT_FILE.findall(text))


def bare_names(text: str) -> set[str]:
    """Rule 2: file names without a folder (a name inside a path is the path's, rule 1)."""
    return {m for m in _BARE.findall(text) if "/" not in m and not FORBIDDEN.fullmatch(m)} - set(ROOT_FILES)


def module_refs(text: str) -> set[str]:
    """Rule 3: dotted names rooted at one of our packages, plus `from X import a, b` as `X.a`, `X.b`."""
    refs = set(_DOTTED.findall(text))
    for module, wrapped, names in _FROM_IMPORT.findall(text):
        imported = [n.split()[0] for n in (wrapped or names).split(",") if n.strip()]  # `a as b`: a
        refs |= {f"{module}.{n}" for n in imported}
    return refs - NOT_MODULES


def missing_path(path: str, root: Path) -> bool:
    """True when a mentioned repo path names nothing (a glob: matches nothing) under `root`."""
    if "*" in path:
        return not any(root.glob(path))
    return not (root / path).exists()


def repo_file_names(root: Path) -> set[str]:
    """Names of the files in the checkout, outside what git ignores (the venv, runs, caches)."""
    names: set[str] = set()
    for _folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _IGNORED_DIRS and not d.endswith(".egg-info")]
        names.update(files)
    return names


def unresolved(ref: str) -> str | None:
    """Why a dotted reference does not resolve (None: it does): the longest importable module, then attributes."""
    parts = ref.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and not module_name.startswith(e.name) and not e.name.startswith(module_name):
                return f"importing {module_name} needs {e.name}, which is not installed"
            continue
        for depth in range(cut, len(parts)):
            if not hasattr(obj, parts[depth]):
                return f"{'.'.join(parts[:depth])} has no attribute {parts[depth]!r}"
            obj = getattr(obj, parts[depth])
        return None
    return f"no module {parts[0]!r}"


def problems(text: str, root: Path, file_names: set[str], check_modules: bool = True) -> list[str]:
    """Every mention in `text` that names nothing, one line each."""
    found = [f"path {p}: no such file or folder" for p in sorted(repo_paths(text)) if missing_path(p, root)]
    found += [f"file {n}: no file of that name in the repo (an output? add it to NOT_REPO_FILES)"
              for n in sorted(bare_names(text) - NOT_REPO_FILES - file_names)]
    if check_modules:
        found += [f"module reference {r}: {why}" for r in sorted(module_refs(text)) if (why := unresolved(r))]
    found += [f"mentions {m!r}, a file a clone does not have" for m in sorted(set(FORBIDDEN.findall(text)))]
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_path_and_module_a_doc_mentions_exists(doc: Path):
    found = problems(doc.read_text(), REPO, repo_file_names(REPO))
    assert not found, f"{doc.relative_to(REPO)} mentions what is not there:\n" + "\n".join(found)


def test_the_architecture_doc_is_among_the_checked_ones():
    assert REPO / "docs" / "architecture.md" in DOCS


def test_the_rule_catches_a_missing_path_a_stale_module_and_design_md(tmp_path):
    (tmp_path / "pipeline" / "engine").mkdir(parents=True)
    (tmp_path / "pipeline" / "engine" / "runner.py").write_text("")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "a.yaml").write_text("")
    text = ("See `pipeline/engine/runner.py`, recipes/*.yaml and pipeline/engine/gone.py. The voice lands in "
            "`runs/x/final/voice.onnx`; `python -c 'open(\"/data/my.npz\")'` writes `report.json`.\n"
            "```\nfrom pipeline.core.audio import MelSettings, NoSuchThing\n```\n"
            "`pipeline.runtime.piper_streaming` and `pipeline.recipe` (a metadata key), as " + OUTSIDE_NOTES + " says.")
    found = problems(text, tmp_path, {"runner.py", "a.yaml"})
    assert found == [
        "path pipeline/engine/gone.py: no such file or folder",
        "module reference pipeline.core.audio.NoSuchThing: pipeline.core.audio has no attribute 'NoSuchThing'",
        "module reference pipeline.runtime.piper_streaming: pipeline has no attribute 'runtime'",
        f"mentions '{OUTSIDE_NOTES}', a file a clone does not have",
    ]


def test_bare_file_names_are_checked_against_the_repo_and_outputs_are_listed():
    text = "`check.py` and `tune_trials.py` write `resolved_recipe.yaml` beside `myvocoder.onnx`."
    assert bare_names(text) == {"check.py", "tune_trials.py", "resolved_recipe.yaml"}
    assert problems(text, REPO, {"check.py"}, check_modules=False) == [
        "file tune_trials.py: no file of that name in the repo (an output? add it to NOT_REPO_FILES)"]
