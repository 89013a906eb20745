"""ChatTTS's GPT: a LlamaModel exported block by block, generated autoregressively in ONNX Runtime.

The ModelSet is `{embed_text, embed_code, layer_00..layer_NN, norm, lm_head_text,
lm_head_code, sample_head}` (`exporter.py`); graphs pass hidden states and a
KV cache in a loop (`runtime.py`), not plain dataflow. So this family:
- checks the recipe's prompts against `embed_text` and fits the sampled ids
  to the exported vocabulary;
- captures every graph's inputs in one teacher-forced sweep of the FP32
  model on real prompts and its own audio codes (`check.capture_chattts`);
- checks per graph (isolated and accumulated) with token metrics for both
  heads (`check.compare_chattts`);
- generates text tokens or audio-code frames (`pipeline generate`).
"""
from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from calibration.chattts_prompts import ChatTTSPrompts, load_tokenizer
from pydantic import (BaseModel, ConfigDict, Field, ValidationInfo, field_serializer, field_validator,
                      model_validator)

from pipeline.core.errors import PipelineError, one_line
from pipeline.core.modelset import ModelSet
from pipeline.core.recipe import parse_params
from .. import Exporter, Family, Generated, GenerateRequest, files_key
from .exporter import gpt_weights
from .gguf import GGUF_TARGET

EXPORTER = "chattts_gpt"


class GPTConfigParams(BaseModel):
    """GPTConfig (exporter.py) as the recipe's `config` overrides: its fields, defaults and the ranges the
    modules can be built with (layers.py). Sizes are strict whole numbers: `true` or "8" is refused, not read
    as 1 or 8; the floats take YAML's `1e-6`, which yaml.safe_load reads as a string. Defaults are validated
    too: the heads check holds for a default against an override (hidden_size 64 with the default 12 heads)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    hidden_size: int = Field(768, gt=0, strict=True, description="width of the hidden states")
    intermediate_size: int = Field(3072, gt=0, strict=True, description="width of each layer's MLP")
    num_attention_heads: int = Field(12, gt=0, strict=True, description="attention heads; hidden_size / heads "
                                                                        "must be a whole, even number (RoPE)")
    num_hidden_layers: int = Field(20, gt=0, strict=True, description="decoder layers (graphs layer_00..)")
    max_position_embeddings: int = Field(4096, gt=0, strict=True, description="longest sequence generated, "
                                                                             "prompt included")
    # At least 2: the sample head is traced on id 1, and the code head's last id is its end-of-sequence.
    num_audio_tokens: int = Field(626, ge=2, strict=True, description="audio-code vocabulary per codebook, "
                                                                      "end-of-sequence included")
    num_text_tokens: int = Field(21178, ge=2, strict=True, description="text vocabulary")
    num_vq: int = Field(4, gt=0, strict=True, description="codebooks per audio frame")
    rms_norm_eps: float = Field(1e-6, gt=0, description="RMSNorm's epsilon")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE's base")

    @field_validator("num_attention_heads")
    @classmethod
    def _heads(cls, n: int, info: ValidationInfo) -> int:
        h = info.data.get("hidden_size")  # absent when it failed its own check: that error is enough
        if h is None:
            return n
        if h % n:
            raise ValueError(f"hidden_size {h} is not a multiple of num_attention_heads {n}")
        if (h // n) % 2:  # RoPE rotates the two halves of each head (layers._rotate_half)
            raise ValueError(f"hidden_size {h} / num_attention_heads {n} = {h // n}, odd: RoPE needs an even "
                             f"head size")
        return n


class ChatTTSParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    asset: str | None = Field(None, description="ChatTTS's asset folder (gpt/ + Embed.safetensors); none: seeded "
                                                "random weights with ChatTTS's config")
    seed: int = Field(0, ge=0, lt=2**64, strict=True, description="seed of the random weights when there is no "
                                                                   "asset (torch.Generator.manual_seed's range)")
    config: GPTConfigParams = Field(default_factory=GPTConfigParams, description="GPTConfig overrides for seeded "
                                    "weights (tests use a small model); an asset has its own gpt/config.json")

    @model_validator(mode="after")
    def _overrides_or_asset(self) -> ChatTTSParams:
        if self.asset and self.config.model_fields_set:
            raise ValueError("'config' overrides apply to seeded weights; an asset folder has its own")
        return self

    @field_serializer("config")
    def _only_overrides(self, config: GPTConfigParams) -> dict[str, Any]:
        # the cache key (files_key) and the run's record hold what the recipe set, as before the schema
        return config.model_dump(exclude_unset=True)


def gpt_config(params: ChatTTSParams, resolve):
    """The GPTConfig these params name: the asset's gpt/config.json, or ChatTTS's with the overrides."""
    from .exporter import GPTConfig, config_from_hf

    if params.asset:
        return config_from_hf(resolve(params.asset) / "gpt" / "config.json")
    return GPTConfig(**params.config.model_dump())


def _check(params: ChatTTSParams, resolve, where: str) -> None:
    """The GPT built and run on torch's meta device from its config alone: the config's own numbers (an asset's
    config.json is held to the recipe's ranges too), then anything only building shows."""
    from .exporter import build_on_meta

    c = gpt_config(params, resolve)
    key = f"{where}.asset ({resolve(params.asset) / 'gpt' / 'config.json'})" if params.asset else f"{where}.config"
    parse_params(GPTConfigParams, asdict(c), key)
    try:
        build_on_meta(c)
    except Exception as e:  # a config the ranges let through but the modules refuse
        raise PipelineError(f"{key}: the model cannot be built: {one_line(f'{type(e).__name__}: {e}')}") from None


def _export(params: ChatTTSParams, dest: Path, resolve):
    from .exporter import export_modelset

    return export_modelset(gpt_weights(params, resolve), dest)


def _key(params: ChatTTSParams, resolve) -> str:
    files = sorted(f for f in resolve(params.asset).rglob("*") if f.is_file()) if params.asset else []
    return files_key(params, files)


def _vocab(ms: ModelSet) -> int:
    return ms.meta["config"]["num_text_tokens"]


class ChatTTSFamily(Family):
    name = "chattts"
    description = "ChatTTS's GPT: block-wise LlamaModel, text and audio-code heads, generated in a KV-cache loop"
    exporters = (Exporter(EXPORTER, ChatTTSParams, _export, _key, check=_check),)
    sources = (ChatTTSPrompts,)
    targets = (GGUF_TARGET,)
    autoregressive = True

    def tokens(self, ms: ModelSet | None) -> bool:
        return True

    def entry_graph(self, ms: ModelSet) -> str:
        return "embed_text"

    def fit_source(self, source, ms: ModelSet, explicit: dict[str, Any]) -> None:
        if isinstance(source, ChatTTSPrompts) and "vocab" not in explicit:  # sampled ids must fit this vocabulary
            source.params.vocab = _vocab(ms)

    def eval_source(self, model_path, ms):
        return "chattts", ({"vocab": _vocab(ms)} if ms is not None else {})

    def capture(self, reference: ModelSet, entry_feeds, graph: str, cache, progress):
        from pipeline.evaluation.loops import captured_feeds

        from .check import capture_chattts

        if not cache:  # one sweep captures every graph's inputs
            cache.update(capture_chattts(reference.root, entry_feeds))
        return captured_feeds(cache, graph, "ChatTTS", "prompts")

    def check_loop(self, reference: ModelSet, candidate: ModelSet, samples, decode_steps: int, progress):
        from .check import compare_chattts

        prompts = [f["input_ids"][0].tolist() for f in samples]
        return compare_chattts(reference.root, candidate.root, prompts, steps=decode_steps, progress=progress)

    def generate(self, ms: ModelSet, request: GenerateRequest) -> Generated:
        from .runtime import ChatTTSRuntime, SamplingParams, infer_code_sampling

        prompt = _prompt_ids(request)
        rt = ChatTTSRuntime(ms.root, threads=request.threads)
        lines = []
        if rt.ms.meta.get("seeded"):
            lines.append(f"note: {rt.ms.meta.get('source')}: ChatTTS's exact config, untrained; tokens mean nothing")
        mode = request.mode or "text"
        if mode == "code":
            sampling = None if request.greedy else infer_code_sampling(seed=request.seed)
            frames, gen = rt.generate_codes(prompt, request.steps, sampling)
            lines.append(f"frames ({len(frames)} of {rt.config['num_vq']} codes): "
                         + " | ".join(" ".join(map(str, f)) for f in frames))
            ids: Any = frames
        elif mode == "text":
            gen = rt.generate_text(prompt, request.steps, None if request.greedy else SamplingParams(seed=request.seed))
            lines.append("ids: " + " ".join(map(str, gen.ids)))
            ids = gen.ids
        else:
            raise PipelineError(f"--mode: {mode!r} is not a ChatTTS mode (text, code)")
        ms_steps = [t * 1e3 for t in gen.step_s]
        if ms_steps:
            lines.append(f"prefill {gen.prefill_s * 1e3:.1f} ms ({len(prompt)} tokens); decode step median "
                         f"{statistics.median(ms_steps):.1f} ms, min {min(ms_steps):.1f}, max {max(ms_steps):.1f} "
                         f"over {len(ms_steps)} steps")
        data = {"prompt": prompt, "mode": mode, "ids": ids, "prefill_s": gen.prefill_s,
                "step_s": gen.step_s, "seeded": rt.ms.meta.get("seeded")}
        return Generated(lines, data)


def _prompt_ids(request: GenerateRequest) -> list[int]:
    if (request.ids is None) == (request.prompt is None):
        raise PipelineError("give the prompt either as --ids 3,14,15 or as --prompt TEXT with --tokenizer DIR")
    if request.prompt is not None:
        if request.tokenizer is None:
            raise PipelineError("--prompt needs --tokenizer DIR (the ChatTTS asset's tokenizer folder); or use --ids")
        return list(load_tokenizer(request.tokenizer).encode(request.prompt, add_special_tokens=False))
    return request.ids
