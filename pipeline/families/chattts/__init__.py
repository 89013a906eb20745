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
from dataclasses import fields
from pathlib import Path
from typing import Any

from calibration.chattts_prompts import ChatTTSPrompts, load_tokenizer
from pydantic import BaseModel, ConfigDict

from ...errors import PipelineError
from ...modelset import ModelSet
from .. import Exporter, Family, Generated, GenerateRequest, files_key
from .gguf import GGUF_TARGET

EXPORTER = "chattts_gpt"


class ChatTTSParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    asset: str | None = None  # ChatTTS's asset folder (gpt/ + Embed.safetensors); none: seeded random weights
    seed: int = 0
    config: dict[str, Any] = {}  # GPTConfig overrides for seeded weights (tests use a small model)


def gpt_weights(params: ChatTTSParams, resolve):
    """The GPT's PyTorch weights these params name: the export's, and every target's."""
    from .exporter import GPTConfig, load_weights

    names = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(params.config) - names)
    if unknown:
        raise PipelineError(f"model.params.config: unknown keys {unknown} (valid: {', '.join(sorted(names))})")
    if params.asset and params.config:
        raise PipelineError("model.params: 'config' overrides apply to seeded weights; an asset folder has its own")
    asset = resolve(params.asset) if params.asset else None
    return load_weights(asset, GPTConfig(**params.config) if params.config else None, seed=params.seed)


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
    exporters = (Exporter(EXPORTER, ChatTTSParams, _export, _key),)
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
        from .check import capture_chattts, captured_feeds

        if not cache:  # one sweep captures every graph's inputs
            cache.update(capture_chattts(reference.root, entry_feeds))
        return captured_feeds(cache, graph)

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
