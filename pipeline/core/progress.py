"""Progress of long work: counted tasks (samples, trials, repetitions) and activities (a step running).

Work anywhere in the tool reports through this module's functions, like
`logging`: `update("check: samples", 3, 8)`, `with activity("step 01: quantize"):`,
`for f in track(feeds, "calibrating"):`. Nothing shows until a front end
installs a `Display` (the CLI does, for the length of a command); without one
the calls cost a context-variable lookup.

A `Display` draws in one of three ways:
- `rich`: live bars with elapsed time and an estimate of the time left, for a
  terminal;
- `plain`: for logs (CI, a pipe): a line for each task still running every
  `plain_every_s()` seconds (a heartbeat thread, so a step that reports nothing
  for a minute still shows it is alive), and a last line when a counted task
  ends;
- `quiet`: nothing; only what the command prints as its result.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from pipeline.core.errors import PipelineError, during

T = TypeVar("T")
PLAIN_EVERY_ENV = "PIPELINE_PROGRESS_EVERY_S"


def plain_every_s() -> float:
    """A log's heartbeat period in seconds: 10, or what PIPELINE_PROGRESS_EVERY_S says (a busier CI log, or a
    quieter one): a number from 0.1 to 86400, else a one-line error."""
    text = os.environ.get(PLAIN_EVERY_ENV, "10")
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.1 <= value <= 86400:  # also NaN
        raise PipelineError(f"environment variable {PLAIN_EVERY_ENV}={text!r}: give seconds between a log's "
                            f"progress lines, a number from 0.1 to 86400")
    return value


MODES = ("rich", "plain", "quiet")

_display: contextvars.ContextVar[Display | None] = contextvars.ContextVar("pipeline_progress", default=None)


def clock(seconds: float) -> str:
    """12 s, 3 min 05 s, 1 h 02 min."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class _Task:
    def __init__(self, what: str, total: int | None):
        self.what, self.total, self.done = what, total, 0
        self.note = ""
        self.start = time.perf_counter()
        self.shown_at = 0.0
        self.rich_id: int | None = None

    def eta(self) -> float | None:
        if not self.total or not self.done or self.done >= self.total:
            return None
        return (time.perf_counter() - self.start) / self.done * (self.total - self.done)

    def label(self) -> str:
        return f"{self.what}: {self.note}" if self.note else self.what

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        if self.total is None:
            return f"{self.label()} ... {clock(elapsed)}"
        eta = self.eta()
        left = f", about {clock(eta)} left" if eta is not None else ""
        return f"{self.label()}: {self.done}/{self.total} ({clock(elapsed)}{left})"


class Display:
    """Where progress and log lines go for one command: a rich live display, plain lines, or nothing."""

    def __init__(self, console, mode: str = "rich"):
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r} is not one of {MODES}")
        self.console, self.mode = console, mode
        self.every_s = plain_every_s() if mode == "plain" else 10.0
        self.tasks: dict[str, _Task] = {}
        self._progress = None
        self._lock = threading.Lock()  # the heartbeat thread reads the tasks the work updates
        self._stop = threading.Event()

    def __enter__(self) -> Display:
        if self.mode == "rich":
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                      TextColumn("{task.fields[count]}"), _time_column(), console=self.console,
                                      transient=True)
            self._progress.__enter__()
        elif self.mode == "plain":
            threading.Thread(target=self._heartbeat, name="progress-heartbeat", daemon=True).start()
        self._token = _display.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _display.reset(self._token)
        self._stop.set()
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def _heartbeat(self) -> None:
        while not self._stop.wait(1.0):
            now = time.perf_counter()
            with self._lock:
                due = [t for t in self.tasks.values() if now - t.shown_at >= self.every_s]
                for t in due:
                    t.shown_at = now
                    self._plain(t.line())

    def _plain(self, line: str) -> None:
        self.console.print(line, soft_wrap=True, highlight=False, markup=False)

    def log(self, message: str) -> None:
        if self.mode == "quiet":
            return
        from rich.markup import escape

        (self._progress.console if self._progress else self.console).print(escape(message), soft_wrap=True)

    def update(self, what: str, done: int, total: int | None, note: str | None = None) -> None:
        if self.mode == "quiet":
            return
        with self._lock:
            task = self.tasks.get(what)
            if task is None or task.total != total:
                task = self._start(what, total)
            task.done = done
            if note is not None:
                task.note = note
            if self._progress is not None:
                self._progress.update(task.rich_id, completed=done, total=total, description=task.label(),
                                      count=f"{done}/{total}" if total is not None else "")
            if total is not None and done >= total:
                if self.mode == "plain" and task.shown_at > task.start:  # it showed a heartbeat: show its end
                    self._plain(task.line())
                self._drop(what)

    def finish(self, what: str) -> None:
        with self._lock:
            self._drop(what)

    def _drop(self, what: str) -> None:
        task = self.tasks.pop(what, None)
        if task is not None and self._progress is not None:
            self._progress.remove_task(task.rich_id)

    def _start(self, what: str, total: int | None) -> _Task:
        self._drop(what)
        task = self.tasks[what] = _Task(what, total)
        task.shown_at = task.start  # plain: the first line comes after every_s
        if self._progress is not None:
            task.rich_id = self._progress.add_task(what, total=total, count="")
        return task


def _time_column():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class TimeColumn(ProgressColumn):
        """Elapsed time, and the time left where the task is counted: `12 s, about 30 s left`."""

        def render(self, task) -> Text:
            elapsed = task.finished_time if task.finished else task.elapsed
            text = clock(elapsed or 0)
            if task.total and task.completed and task.time_remaining is not None:
                text += f", about {clock(task.time_remaining)} left"
            return Text(text, style="progress.elapsed")

    return TimeColumn()


def update(what: str, done: int, total: int | None = None) -> None:
    """`done` of `total` units of `what` finished (total None: an activity whose size is unknown)."""
    display = _display.get()
    if display is not None:
        display.update(what, done, total)


def status(what: str) -> Callable[[str], None]:
    """A callback for code that reports what it is doing as text: one line `what: <latest text>`."""
    def show(note: str) -> None:
        display = _display.get()
        if display is not None:
            display.update(what, 0, None, note=note)

    return show


def finish(what: str) -> None:
    display = _display.get()
    if display is not None:
        display.finish(what)


@contextlib.contextmanager
def activity(what: str) -> Iterator[None]:
    """A piece of work of unknown size (a quantize step): a spinner with its elapsed time while it runs.

    A disk or memory error inside it names this work in its one-line message (`errors.during`)."""
    update(what, 0, None)
    try:
        with during(what):
            yield
    finally:
        finish(what)


def track(items: Iterable[T], what: str, total: int | None = None) -> Iterator[T]:
    """Yield `items`, counting them as done one by one (`total` defaults to len(items) when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    update(what, 0, total)
    done = 0
    try:
        for item in items:
            yield item
            done += 1
            update(what, done, total)
    finally:  # also when the consumer stops early
        finish(what)


def counter(what: str) -> Callable[[int, int], None]:
    """A (done, total) callback that reports as `what`: for code that takes a progress callback."""
    return lambda done, total: update(what, done, total)
