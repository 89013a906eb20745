"""Tortoise-TTS's autoregressive GPT2 (`UnifiedVoice`, tortoise-tts 3.0.0): prefill and decode graphs with
hidden states, sharing one weights file.

The ModelSet is `{conditioning, prefill, decode, sample_head}` (`exporter.py`);
generation is a prefill, then a decode step per code over io_binding
(`runtime.py`). So this family:
- takes real sentences as Tortoise text tokens with a real voice's
  conditioning latent (`calibration/tortoise_texts.py`), the latent made by
  the model set's own conditioning graph;
- captures every graph's inputs in one sweep of the FP32 model on those
  sentences and its own greedy codes, teacher-forced (`check.capture_tortoise`);
- checks per GPT2 layer inside the graphs, the code head (teacher-forced) and
  the diffusion latents (`check.compare_tortoise`), with a latent-SQNR
  threshold of its own (`min_latent_sqnr_db`);
- generates codes, decode-time hidden states and the latents of the codes
  (`pipeline generate`).
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_serializer, field_validator

from calibration.tortoise_texts import TortoiseTexts

from pipeline.core.errors import PipelineError, one_line
from pipeline.evaluation.metrics import Metric
from pipeline.core.modelset import ModelSet
from .. import Exporter, Family, Generated, GenerateRequest, files_key
from .gguf import GGUF_TARGET
from .weights import gpt_weights, tortoise_config

EXPORTER = "tortoise_gpt"


class TortoiseConfigParams(BaseModel):
    """TortoiseConfig (model.py) as the recipe's `config` overrides: its fields, defaults and the ranges the
    modules can be built and exported with. Every field is a strict whole number: `true` or "8" is refused,
    not read as 1 or 8."""

    # defaults validated too: the cross-field checks hold for a default against an override
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)

    layers: int = Field(30, gt=0, description="GPT2 blocks")
    model_dim: int = Field(1024, gt=0, description="width of the hidden states; a multiple of heads")
    heads: int = Field(16, gt=0, description="attention heads, of the GPT2 blocks and the conditioning encoder")
    # at least 5: the export traces the prefill on 5 text tokens (exporter._export_stage)
    max_text_tokens: int = Field(402, ge=5, description="longest text, in tokens (start and stop not counted)")
    # at least 2: generation stops after max_mel_tokens - 1 codes (TortoiseRuntime.max_steps)
    max_mel_tokens: int = Field(604, ge=2, description="longest code sequence, start_mel included")
    max_conditioning_inputs: int = Field(2, gt=0, description="conditioning positions reserved in the mel "
                                                              "position table (its size is max_mel_tokens + 2 + this)")
    number_text_tokens: int = Field(255, gt=0, description="text vocabulary, without start_text "
                                                           "(the embedding holds number_text_tokens + 1)")
    start_text_token: int = Field(255, ge=0, description="id put before the text; at most number_text_tokens")
    # at least 2: the sample head is traced, and generation starts, with id 1 seen (runtime.PLACEHOLDER_ID)
    number_mel_codes: int = Field(8194, ge=2, description="code vocabulary, start_mel and stop_mel included")
    start_mel_token: int = Field(8192, ge=0, description="id that starts the codes; below number_mel_codes")
    stop_mel_token: int = Field(8193, ge=0, description="id that ends the codes; below number_mel_codes")
    conditioning_blocks: int = Field(6, gt=0, description="attention blocks of the conditioning encoder")
    mel_channels: int = Field(80, gt=0, description="mel bands of the reference clips")

    # Each check sits on the later field, so the error names it; a field that failed its own range is absent
    # from `info.data`, and its error is enough.
    @field_validator("heads")
    @classmethod
    def _heads(cls, heads: int, info: ValidationInfo) -> int:
        dim = info.data.get("model_dim")
        if dim is not None and dim % heads:
            raise ValueError(f"model_dim {dim} is not a multiple of heads {heads}")
        return heads

    @field_validator("start_text_token")
    @classmethod
    def _text_id(cls, token: int, info: ValidationInfo) -> int:
        vocab = info.data.get("number_text_tokens")
        if vocab is not None and token > vocab:  # the text embedding holds number_text_tokens + 1 ids
            raise ValueError(f"{info.field_name} {token} is past the text vocabulary (number_text_tokens {vocab} "
                             f"+ 1 ids)")
        return token

    @field_validator("start_mel_token", "stop_mel_token")
    @classmethod
    def _mel_id(cls, token: int, info: ValidationInfo) -> int:
        codes = info.data.get("number_mel_codes")
        if codes is not None and token >= codes:  # past the code embedding and the mel head
            raise ValueError(f"{info.field_name} {token} is not below number_mel_codes {codes}")
        return token


class TortoiseParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(None, description="Tortoise's autoregressive.pth (a plain state_dict); none: "
                                                     "seeded random weights with the released config")
    seed: int = Field(0, ge=0, lt=2**64, strict=True, description="seed of the random weights when there is no "
                                                                   "checkpoint (torch.Generator.manual_seed's range)")
    config: TortoiseConfigParams = Field(default_factory=TortoiseConfigParams, description="UnifiedVoice "
                                         "arguments that differ from the released model (layers, model_dim, heads, "
                                         "...); tests use a small model")

    @field_serializer("config")
    def _only_overrides(self, config: TortoiseConfigParams) -> dict[str, Any]:
        # the cache key (files_key) and the run's record hold what the recipe set, as before the schema
        return config.model_dump(exclude_unset=True)


def _check(params: TortoiseParams, resolve, where: str) -> None:
    """UnifiedVoice built and run on torch's meta device from the config alone (a checkpoint must fit it):
    anything the ranges let through but the modules refuse fails here, before any work."""
    from .model import build_on_meta

    try:
        build_on_meta(tortoise_config(params))
    except Exception as e:
        raise PipelineError(f"{where}.config: the model cannot be built: {one_line(f'{type(e).__name__}: {e}')}") \
            from None


def _export(params: TortoiseParams, dest: Path, resolve):
    from .exporter import export_modelset

    return export_modelset(gpt_weights(params, resolve), dest)


def _key(params: TortoiseParams, resolve) -> str:
    return files_key(params, [resolve(params.checkpoint)] if params.checkpoint else [])


class LatentSQNR(Metric):
    """SQNR of the diffusion latents of the FP32 codes: what Tortoise's diffusion decoder would be fed."""

    key = "latents"
    needs = "diffusion latents"
    thresholds = {"min_latent_sqnr_db": "SQNR of the diffusion latents, dB"}

    def failures(self, report, limits):
        limit = limits.get("min_latent_sqnr_db")
        latents = next((o for o in report.outputs if o.name == "latents"), None)
        if limit is None or latents is None or latents.sqnr_db >= limit:
            return []
        return [f"latents: SQNR {latents.sqnr_db:.1f} dB < {limit} dB"]


class TortoiseFamily(Family):
    name = "tortoise"
    description = "Tortoise-TTS's GPT2: prefill and decode graphs sharing one weights file, codes and latents"
    exporters = (Exporter(EXPORTER, TortoiseParams, _export, _key, check=_check),)
    sources = (TortoiseTexts,)
    targets = (GGUF_TARGET,)
    autoregressive = True

    def tokens(self, ms: ModelSet | None) -> bool:
        return True

    def metrics(self, ms: ModelSet | None) -> list[Metric]:
        return [LatentSQNR()]

    def entry_graph(self, ms: ModelSet) -> str:
        return "prefill"

    def fit_source(self, source, ms: ModelSet, explicit: dict[str, Any]) -> None:
        if isinstance(source, TortoiseTexts):
            from .runtime import TortoiseRuntime

            source.params.start_mel = ms.meta["config"]["start_mel_token"]
            source.conditioning_graph = TortoiseRuntime(ms.root).conditioning

    def eval_source(self, model_path, ms):
        return "tortoise", {"held_out": True}

    def capture(self, reference: ModelSet, entry_feeds, graph: str, cache, progress):
        from pipeline.evaluation.loops import captured_feeds

        from .check import capture_tortoise

        if not cache:  # one sweep captures every graph's inputs
            cache.update(capture_tortoise(reference.root, entry_feeds))
        return captured_feeds(cache, graph, "Tortoise", "sentences")

    def check_loop(self, reference: ModelSet, candidate: ModelSet, samples, decode_steps: int, progress):
        from .check import compare_tortoise

        return compare_tortoise(reference.root, candidate.root, samples, steps=decode_steps, progress=progress)

    def generate(self, ms: ModelSet, request: GenerateRequest) -> Generated:
        from .runtime import TortoiseRuntime
        from .sample_head import TortoiseSampling

        if request.mode not in (None, "code"):
            raise PipelineError(f"--mode: {request.mode!r} is not a Tortoise mode (code)")
        if request.ids is None or request.prompt is not None:
            raise PipelineError("give the text as Tortoise text token ids: --text-ids 23,41,2 (Tortoise's "
                                "tokenizer; calibration/make_tortoise_tokens.py makes them)")
        if request.conditioning is None:
            raise PipelineError("--conditioning LATENT.npy is required: the voice's conditioning latent")
        latent = _read_latent(request.conditioning)
        rt = TortoiseRuntime(ms.root, threads=request.threads)
        gen = rt.generate(request.ids, latent, request.steps, None if request.greedy else TortoiseSampling(),
                          seed=request.seed)
        latents = rt.latents(request.ids, latent, gen.codes)
        lines = []
        if ms.meta.get("seeded"):
            lines.append(f"note: {ms.meta.get('source')}: Tortoise's released config, untrained; codes mean nothing")
        lines.append(f"codes ({len(gen.codes)}{', stopped at stop_mel' if gen.stopped else ''}): "
                     + " ".join(map(str, gen.codes)))
        steps_ms = [t * 1e3 for t in gen.step_s]
        lines.append(f"prefill {gen.prefill_s * 1e3:.1f} ms ({len(request.ids)} text tokens)"
                     + (f"; decode step median {statistics.median(steps_ms):.1f} ms, min {min(steps_ms):.1f}, "
                        f"max {max(steps_ms):.1f} over {len(steps_ms)} steps" if steps_ms else ""))
        data = {"text_ids": request.ids, "codes": gen.codes, "stopped": gen.stopped, "prefill_s": gen.prefill_s,
                "step_s": gen.step_s, "seeded": ms.meta.get("seeded"), "greedy": request.greedy,
                "seed": None if request.greedy else request.seed}
        if request.json_path is not None:
            arrays = request.json_path.with_suffix(".npz")
            np.savez(arrays, decode_hidden=gen.hidden, latents=latents, codes=np.array(gen.codes, np.int64))
            data["arrays"] = str(arrays)
            lines.append(f"hidden states and latents: {arrays}")
        return Generated(lines, data)


def _read_latent(path: Path) -> np.ndarray:
    if not path.is_file():
        raise PipelineError(f"--conditioning: file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise PipelineError(f"--conditioning {path}: not a readable .npy file: {e}") from None
