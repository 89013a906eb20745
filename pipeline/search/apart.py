"""A plan's run in a process of its own, inside a folder this process holds: a search's last build and check.

A search (`pipeline tune`) ends by building its chosen recipe and checking it. Run in the search's process,
that check starts from what the search left in the heap (ONNX Runtime's and glibc's free lists, the search's
own state): on Kokoro-82M the search's process held 700 MB when the check began, and the check peaked 600 MB
above what it needs alone. A fresh process starts from nothing and gives it all back when it ends.

The child runs the same `Runner` on the same (pickled) plan. This process keeps the folder's lock and waits;
the child works in the folder as its holder's (`runfolder.held_by_parent`). Log lines come back through a
queue and go to this process's log as they are written; a `PipelineError` in the child is raised here as
itself, one line; a Ctrl-C reaches both, the child cleans up its half-built folder and ends quietly, and
this process raises the interrupt its caller turns into the resume hint.
"""
from __future__ import annotations

import multiprocessing
import queue as queue_module
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError
from pipeline.engine.plan import Plan
from pipeline.engine.runfolder import held_by_parent
from pipeline.engine.runner import Runner, RunResult


def run_apart(plan: Plan, out_dir: Path, log: Callable[[str], None], finish: Any = None) -> RunResult:
    """`Runner(plan, out_dir).run()` in a spawned process; `finish(result)` (picklable: a module-level function
    or a callable object) runs there after it, on the result (a search adds its summary to the report)."""
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    child = context.Process(target=_child, args=(plan, out_dir, finish, messages), name="pipeline-run")
    child.start()
    try:
        return _wait(child, messages, log)
    finally:
        child.join()


def _wait(child, messages, log: Callable[[str], None]) -> RunResult:
    while True:
        try:
            kind, value = messages.get(timeout=0.5)
        except queue_module.Empty:
            if not child.is_alive():
                raise PipelineError(f"the run of the chosen recipe ended without a result (exit code "
                                    f"{child.exitcode}: killed by the system, out of memory?)") from None
            continue
        if kind == "log":
            log(value)
        elif kind == "result":
            return value
        elif kind == "error":
            raise PipelineError(value)
        elif kind == "interrupted":
            raise KeyboardInterrupt
        else:
            raise RuntimeError(f"the run of the chosen recipe failed:\n{value}")


def _child(plan: Plan, out_dir: Path, finish: Any, messages) -> None:
    def log(message: str) -> None:
        messages.put(("log", message))

    try:
        with held_by_parent(out_dir):
            result = Runner(plan, out_dir, log=log).run()
            if finish is not None:
                finish(result)
        messages.put(("result", result))
    except PipelineError as e:
        messages.put(("error", str(e)))
    except KeyboardInterrupt:
        messages.put(("interrupted", None))
    except BaseException:  # a bug: its traceback for the parent's internal-error report
        messages.put(("crash", traceback.format_exc()))
