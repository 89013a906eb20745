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
from pydantic import BaseModel, ConfigDict, Field

from calibration.tortoise_texts import TortoiseTexts

from ...errors import PipelineError
from ...metrics import Metric
from ...modelset import ModelSet
from .. import Exporter, Family, Generated, GenerateRequest, files_key
from .gguf import GGUF_TARGET

EXPORTER = "tortoise_gpt"


class TortoiseParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(None, description="Tortoise's autoregressive.pth (a plain state_dict); none: "
                                                     "seeded random weights with the released config")
    seed: int = Field(0, description="seed of the random weights when there is no checkpoint")
    config: dict[str, Any] = Field(default_factory=dict, description="UnifiedVoice arguments that differ from the "
                                   "released model (layers, model_dim, heads, ...); tests use a small model")


def _config(params: TortoiseParams):
    from dataclasses import fields

    from .model import TortoiseConfig

    names = {f.name for f in fields(TortoiseConfig)}
    unknown = sorted(set(params.config) - names)
    if unknown:
        raise PipelineError(f"model.params.config: unknown keys {unknown} (valid: {', '.join(sorted(names))})")
    c = TortoiseConfig(**params.config)
    if c.model_dim % c.heads:
        raise PipelineError(f"model.params.config: model_dim {c.model_dim} is not a multiple of heads {c.heads}")
    return c


def gpt_weights(params: TortoiseParams, resolve):
    """The UnifiedVoice weights these params name: the export's, and every target's."""
    from .weights import load_checkpoint, seeded_weights

    c = _config(params)
    return load_checkpoint(resolve(params.checkpoint), c) if params.checkpoint else seeded_weights(c, params.seed)


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
    exporters = (Exporter(EXPORTER, TortoiseParams, _export, _key),)
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
        from .check import capture_tortoise, captured_feeds

        if not cache:  # one sweep captures every graph's inputs
            cache.update(capture_tortoise(reference.root, entry_feeds))
        return captured_feeds(cache, graph)

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
