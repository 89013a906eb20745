"""The step cache: a folder is reused when its manifest carries the key of the work it holds.

A step, `final/` and each format folder are built under a temporary name and
renamed into place only when complete (`building`), so a folder appears only
whole: an interrupted run resumes at the step it was in, and a re-run of a
finished recipe only re-reads hashes. A folder is replaced only when its
manifest proves a run built it.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError
from pipeline.core.modelset import ModelSet
from pipeline.formats.targets import TARGET_MANIFEST, folder_size

STEP_MANIFEST = "step.json"


def cached_target(folder: Path, key: str) -> dict[str, Any] | None:
    """A target folder's record if it was made with `key` and its files are all there, at their sizes."""
    data = manifest_with_key(folder, TARGET_MANIFEST, key)
    if data is None:
        return None
    try:
        intact = all(folder_size(folder / name) == size for name, size in data.get("files", {}).items())
    except OSError:
        return None
    return data if intact else None


def manifest_with_key(folder: Path, manifest: str, key: str) -> dict[str, Any] | None:
    """A folder's manifest when it says it was built with `key`."""
    try:
        data = json.loads((folder / manifest).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("key") == key else None


def cached(folder: Path, key: str, manifest: str = STEP_MANIFEST) -> dict[str, Any] | None:
    """The folder's manifest if it was built with `key` and its files are intact."""
    data = manifest_with_key(folder, manifest, key)
    if data is None:
        return None
    try:
        ms = ModelSet.read(folder)
    except PipelineError:
        return None
    return data if ms.verify() else None


@contextlib.contextmanager
def building(target: Path, manifest: str = STEP_MANIFEST) -> Iterator[Path]:
    """Build a folder under a temporary name; rename it into place only when complete.

    An existing `target` is replaced only when its `manifest` proves a run built it: what a run did not make
    is never moved or deleted."""
    if target.exists() and not (target / manifest).is_file():
        raise PipelineError(f"{target} was not written by a run (no {manifest} in it), so it is not replaced: "
                            f"move it away, or choose another --out")
    tmp = target.with_name(f".{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def scratch_tmpdir(path: Path) -> Iterator[Path]:
    """Point Python's tempfile (which ORT's quantizer uses) into the run folder."""
    path.mkdir(parents=True, exist_ok=True)
    saved = tempfile.tempdir
    tempfile.tempdir = str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(path, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
