"""One run per run folder at a time.

Two runs writing the same folder would rename each other's half-built steps
away (`.00-base.partial`). A run holds an advisory lock (`flock`) on
`DIR/.pipeline.lock` for as long as it works there; the file records the
holder's process id for the message a second run gets. The kernel drops the
lock when the holder dies, however it dies, so a folder left by a killed run
is taken over without anyone deleting anything. The file itself stays: removing
it would let a waiting run lock a file that is no longer the folder's.

The lock is taken once, by whoever owns the run folder (`pipeline.search.run.run_recipe`, which the CLI
calls): the runners a search starts inside it, into the folder or a subfolder (`tune/items/...`), check
that it is held (`require_held`) and take nothing themselves.

What a run may touch (the README's contract): a run writes only inside its run
folder, and replaces or deletes only what a run made there. A folder becomes a
run folder when a run finds it missing or empty and writes the marker
`DIR/.pipeline-run` into it; a non-empty folder without the marker (or the
lock file of a run made before the marker existed) is refused, so `--out .`
in a project folder never replaces a `final/` the user made. Nothing the run
reads may lie inside the run folder: a model there would be replaced by the
run's own `final/` or `steps/`. The recipe file itself may lie at the folder's
top level (a `resolved_recipe.yaml` is run from where tune wrote it), unless
the run writes a file of that name.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError, few

LOCK_FILE = ".pipeline.lock"
MARKER = ".pipeline-run"
# What a run writes at its folder's top level besides the step, final, scratch and search folders.
RUN_FILES = ("manifest.json", "report.json", "report.md", "report.html", "report.png", "report-tune.png",
             "report-tokens.png", LOCK_FILE, MARKER)
RUN_FOLDERS = ("steps", "final", "tmp", "tune", "report-audio")
RESOLVED_RECIPE = "resolved_recipe.yaml"  # written by the automatic fallback and by pipeline tune
_held: dict[Path, int] = {}  # the folders this process holds (one lock each)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the folder is resumable, and `hint` says how."""

    def __init__(self, hint: str):
        super().__init__(hint)
        self.hint = hint


@contextlib.contextmanager
def hold(folder: Path, resume_hint: str | None = None, log: Callable[[str], None] = lambda m: None,
         inputs: Sequence[Path] = (), recipe: Path | None = None, writes_resolved: bool = False) -> Iterator[None]:
    """Hold `folder` for this process; a second process gets one line naming the holder.

    `inputs` (and the `recipe` file) are what the run reads: refused, before anything is written, when they lie
    where the run writes (the module's docstring)."""
    refuse_inputs_inside(folder, inputs, recipe, writes_resolved)
    claim(folder)
    key = folder.resolve()
    if key in _held:
        raise RuntimeError(f"{folder} is held already by this process: its owner holds it once")
    fd = _lock(folder, log)
    _held[key] = 1
    try:
        yield
    except KeyboardInterrupt:
        hint = resume_hint or "re-run the same command"
        raise RunInterrupted(f"interrupted: finished steps are kept in {folder}; resume with: {hint}") from None
    finally:
        del _held[key]
        os.ftruncate(fd, 0)  # a clean end leaves no holder to report
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def held_by_parent(folder: Path) -> Iterator[None]:
    """In a child process of `folder`'s holder, which keeps the lock and waits for it to end: runners may work
    there (`pipeline.search.apart`). Taking the lock here would wait on the parent forever."""
    key = folder.resolve()
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]


def require_held(folder: Path) -> None:
    """A runner works only in a folder its owner holds (the folder, or a run folder above it)."""
    path = folder.resolve()
    if not any(p in _held for p in (path, *path.parents)):
        raise RuntimeError(f"{folder} is not held: run it through pipeline.search.run.run_recipe, or hold it "
                           f"(pipeline.engine.runfolder.hold) around the Runner")


def claim(folder: Path) -> None:
    """Make `folder` a run folder, or prove it is one already, and that it is writable; before any work."""
    try:
        if folder.exists() and not folder.is_dir():
            raise PipelineError(f"run folder {folder} is a file, not a folder: choose another --out")
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / MARKER).is_file():
            _mark(folder)
    except OSError as e:
        raise PipelineError(f"cannot write to output folder {folder}: {e.strerror or e}") from None


def _mark(folder: Path) -> None:
    """Write the marker into a new or empty folder, or one an earlier version ran in (its lock file)."""
    if any(folder.iterdir()) and not (folder / LOCK_FILE).is_file():
        names = few(sorted(p.name for p in folder.iterdir()), 4)
        raise PipelineError(f"{folder} is not a run folder (it holds {names}, and no {MARKER} marker): a run may "
                            f"replace what it finds there, so give a new or empty folder with --out")
    (folder / MARKER).write_text(json.dumps({"tool": "tts-onnx-pipeline", "created": time.time()}) + "\n")


def is_run_folder(folder: Path) -> bool:
    """True when a run made `folder` its run folder (the marker, or an earlier version's lock file)."""
    return (folder / MARKER).is_file() or (folder / LOCK_FILE).is_file()


def refuse_inputs_inside(folder: Path, inputs: Sequence[Path], recipe: Path | None = None,
                         writes_resolved: bool = False) -> None:
    """One line when something the run reads lies inside its run folder (the module's docstring says why)."""
    root = folder.resolve()
    for path in inputs:
        if _inside(path, root):
            raise PipelineError(f"input {path} lies inside the run folder {folder}, where the run writes and "
                                f"replaces files: move it out, or choose another --out")
    if recipe is not None and _inside(recipe, root):
        written = RUN_FILES + ((RESOLVED_RECIPE,) if writes_resolved else ())
        where = recipe.resolve()
        if where.parent != root or where.name in written:
            raise PipelineError(f"recipe {recipe} lies where the run in {folder} writes: copy it out of the run "
                                f"folder, or choose another --out")


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root)


def _lock(folder: Path, log: Callable[[str], None]) -> int:
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise PipelineError(f"cannot create the run folder's lock {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd)
        os.close(fd)
        raise PipelineError(f"{folder} is in use by another run (process {holder.get('pid', '?')}"
                            f"{_since(holder)}): wait for it to end, or choose another folder with --out") from None
    left = _read(fd)
    if left.get("pid"):  # written by a run that never released it: killed, or its machine went down
        log(f"{folder}: taking over from run process {left['pid']}, which ended without releasing it")
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd


def _read(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _since(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    if not isinstance(started, (int, float)):
        return ""
    host = holder.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"{where}, started {time.strftime('%H:%M:%S', time.localtime(started))}"


def check_report_paths(reports: dict[str, list[Path]], inputs: Sequence[Path]) -> None:
    """Files a command writes outside any run folder (`--json`, `--html`, `--md`), each option with everything it
    writes: checked before any work, so a missing folder fails at once and no report replaces an input."""
    owner: dict[Path, str] = {}
    for option, paths in reports.items():
        for path in paths:
            if not path.parent.is_dir():
                raise PipelineError(f"{option} {paths[0]}: the folder {path.parent} does not exist; make it first")
            where = path.resolve()
            if path is paths[0] or not path.name.endswith("-audio"):  # only md's and html's -audio/ may be shared
                if where in owner:
                    raise PipelineError(f"{option} and {owner[where]} both name {path}: give each its own file")
                owner[where] = option
            for item in inputs:
                if where == item.resolve() or (item.is_dir() and where.is_relative_to(item.resolve())):
                    raise PipelineError(f"{option} {paths[0]} would write {path}, which is the input {item} or "
                                        f"lies inside it: write the report elsewhere")
            if path.is_dir() and path is paths[0]:
                raise PipelineError(f"{option} {path} is a folder: give a file name")
