"""One run per run folder at a time.

Two runs writing the same folder would rename each other's half-built steps
away (`.00-base.partial`). A run holds an advisory lock (`flock`) on
`DIR/.pipeline.lock` for as long as it works there; the file records the
holder's process id for the message a second run gets. The kernel drops the
lock when the holder dies, however it dies, so a folder left by a killed run
is taken over without anyone deleting anything. The file itself stays: removing
it would let a waiting run lock a file that is no longer the folder's.

Holding is re-entrant within one process: a precision search runs several
runners into the folder it holds.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import PipelineError

LOCK_FILE = ".pipeline.lock"
_held: dict[Path, int] = {}


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the folder is resumable, and `hint` says how."""

    def __init__(self, hint: str):
        super().__init__(hint)
        self.hint = hint


@contextlib.contextmanager
def hold(folder: Path, resume_hint: str | None = None, log: Callable[[str], None] = lambda m: None) -> Iterator[None]:
    """Hold `folder` for this process; a second process gets one line naming the holder."""
    from .runner import prepare_out_dir

    prepare_out_dir(folder)
    key = folder.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
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
