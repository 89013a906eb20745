"""Unmodified upstream Tortoise-TTS 3.0.0 `UnifiedVoice`, run in a child process, as a reference for our own.

Upstream's autoregressive.py needs transformers <= 4.48.3 (`transformers.utils.model_parallel_utils`, `generate` on a
`GPT2PreTrainedModel` subclass) while the venv has transformers 5.x. So `upstream_env()` builds, once, a cache folder
with the sdist's `tortoise` package and a `pip install --target` folder of the old transformers stack, and
`run_upstream()` runs `tortoise_upstream_runner.py` with those folders first on PYTHONPATH and torch from the venv.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

TORTOISE = "tortoise-tts==3.0.0"
# Installed with --no-deps, so pip never pulls torch. transformers 4.48.3 pins tokenizers <0.22 and
# huggingface-hub <1.0 (the venv has 0.23 / 2.x; its import-time version check refuses them); hub 0.x needs
# requests (+ urllib3, charset-normalizer, certifi; idna is in the venv); upstream's xtransformers.py needs einops.
PACKAGES = (
    "transformers==4.48.3", "tokenizers==0.21.4", "huggingface_hub==0.36.2", "requests==2.34.2", "urllib3==2.8.0",
    "charset-normalizer==3.5.3", "certifi==2026.10.19.post1", "einops==0.8.2",
)
# arch_util.py imports torchaudio at module level but UnifiedVoice never uses it (only TorchMelSpectrogram does).
# No torchaudio wheel loads against the venv's torch (its _torchaudio.so is built for one torch release), so a stub.
TORCHAUDIO_STUB = '''"""Stub: upstream tortoise imports torchaudio; the parts the reference runs never use it."""


def __getattr__(name):
    raise ImportError(f"torchaudio stub (tests/tortoise_upstream.py): torchaudio.{name} is not available")
'''
RUNNER = Path(__file__).with_name("tortoise_upstream_runner.py")
_KEY = hashlib.sha256(repr((TORTOISE, PACKAGES, TORCHAUDIO_STUB)).encode()).hexdigest()[:10]


def cache_root() -> Path:
    from pipeline.core.hashing import cache_home

    return cache_home() / "tortoise-upstream"


def _pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"pip {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def _extract_tortoise(sdist: Path, dst: Path) -> None:
    """Only the sdist's `tortoise` package, without its voices/ (sample wavs: 29 of the 30 MB)."""
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) < 3 or parts[1] != "tortoise" or "voices" in parts or ".." in parts:
                continue
            out = dst.joinpath(*parts[1:])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(m).read())


def child_env(pythonpath: list[str]) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(pythonpath + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def _build(dst: Path) -> dict:
    t0 = time.monotonic()
    wheels, site, src = dst / "wheels", dst / "site", dst / "src"
    _pip("download", "--no-deps", "--only-binary", ":all:", "-d", str(wheels), *PACKAGES)
    _pip("download", "--no-deps", "--no-binary", "tortoise-tts", "--no-build-isolation", "-d", str(wheels), TORTOISE)
    files = sorted(wheels.iterdir())
    download_bytes = sum(f.stat().st_size for f in files)
    _pip("install", "--no-deps", "--no-index", "--target", str(site), *[str(f) for f in files if f.suffix == ".whl"])
    (site / "torchaudio").mkdir()
    (site / "torchaudio" / "__init__.py").write_text(TORCHAUDIO_STUB)
    _extract_tortoise(next(f for f in files if f.name.startswith("tortoise")), src)
    shutil.rmtree(wheels)
    check = subprocess.run(
        [sys.executable, "-c", "import tortoise.models.autoregressive, transformers, torch; "
                               "print(transformers.__version__, torch.__file__)"],
        capture_output=True, text=True, env=child_env([str(site), str(src)]), timeout=600)
    if check.returncode or not check.stdout.startswith("4.48.3 ") or str(site) in check.stdout:
        raise RuntimeError(f"upstream tortoise env does not import:\n{check.stdout}\n{check.stderr[-4000:]}")
    info = {"packages": list(PACKAGES) + [TORTOISE], "download_bytes": download_bytes,
            "build_seconds": round(time.monotonic() - t0, 1)}
    (dst / "build.json").write_text(json.dumps(info, indent=1))
    print(f"tortoise upstream env built in {info['build_seconds']} s, downloaded {download_bytes / 2**20:.1f} MiB",
          file=sys.stderr)
    return info


@functools.cache
def upstream_env() -> dict:
    """Build (once, race-free across pytest-xdist workers) and describe the upstream environment.

    Returns {"root", "pythonpath": [target folder, sdist folder], "packages", "download_bytes", "build_seconds"}.
    """
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"env-{_KEY}"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second worker waits here instead of downloading too
        if not final.exists():
            for stale in root.glob(".tmp-*"):  # left by a killed build; nobody else builds while we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
            try:
                _build(tmp)
                os.rename(tmp, final)  # atomic: `final` exists only complete
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    info = json.loads((final / "build.json").read_text())
    return {"root": str(final), "pythonpath": [str(final / "site"), str(final / "src")], **info}


def run_upstream(args: dict, workdir: Path, timeout: float = 3600) -> dict[str, np.ndarray]:
    """Run tortoise_upstream_runner.py on `args` (see its docstring) and return the arrays it saved."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    args = {k: str(v) if isinstance(v, Path) else v for k, v in args.items()}
    args.setdefault("out", str(workdir / "upstream_out.npz"))
    spec = workdir / "upstream_args.json"
    spec.write_text(json.dumps(args, indent=1))
    env = upstream_env()
    try:
        proc = subprocess.run([sys.executable, str(RUNNER), str(spec)], capture_output=True, text=True,
                              env=child_env(env["pythonpath"]), cwd=workdir, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        raise RuntimeError(f"upstream runner timed out after {timeout} s:\n{err[-4000:]}") from e
    if proc.returncode:
        raise RuntimeError(f"upstream runner failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    with np.load(args["out"]) as data:
        return {k: data[k] for k in data.files}
