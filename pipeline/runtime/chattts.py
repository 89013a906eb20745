"""Generation with a ChatTTS GPT ModelSet in ONNX Runtime: prefill, then one decode step per token.

Each layer graph takes the cache so far and returns it one step longer; the
runtime carries it from step to step. Text and audio-code modes, greedy or
sampled through the sample head graph; io_binding with preallocated caches is
still to come.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import PipelineError
from ..modelset import ModelSet, file_sha256
from ..onnx_io import session


@dataclass
class SamplingParams:
    """ChatTTS's refine_text defaults; infer_code uses temperature 0.3 and penalty 1.05."""

    temperature: float = 0.7
    top_p: float = 0.7
    top_k: int = 20
    repetition_penalty: float = 1.0
    past_window: int = 16
    seed: int = 0


def infer_code_sampling(seed: int = 0) -> SamplingParams:
    """ChatTTS's infer_code defaults."""
    return SamplingParams(temperature=0.3, top_p=0.7, top_k=20, repetition_penalty=1.05, seed=seed)


@dataclass
class Generation:
    ids: list[int]
    prefill_s: float
    step_s: list[float] = field(default_factory=list)


class ChatTTSRuntime:
    def __init__(self, folder: Path, threads: int = 2):
        self.ms = ModelSet.read(Path(folder))
        changed = [g.file for g in self.ms.graphs if g.sha256 and file_sha256(self.ms.root / g.file) != g.sha256]
        if changed:
            raise PipelineError(f"{folder}: modelset.json does not match its files (changed since it was written: "
                                f"{', '.join(changed[:5])})")
        meta = self.ms.meta
        if meta.get("exporter") != "chattts_gpt":
            raise PipelineError(f"{folder}: not a ChatTTS GPT model set (modelset.json meta.exporter)")
        self.config = meta["config"]
        self.layers = meta["layers"]
        missing = [n for n in ["embed_text", "norm", "lm_head_text", *self.layers] if n not in self.ms.names()]
        if missing:
            raise PipelineError(f"{folder}: model set lacks graphs {', '.join(missing)}")
        # One session per graph: without spinning, their idle threads leave the cores to the one running.
        self.sessions = {n: session(self.ms.path(n), threads=threads, spinning=False) for n in self.ms.names()}

    def _empty_cache(self, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        c = self.config
        z = np.zeros((batch, c["num_attention_heads"], 0, c["hidden_size"] // c["num_attention_heads"]), np.float32)
        return [(z, z) for _ in self.layers]

    def _forward(self, hidden: np.ndarray, cache, head: str = "lm_head_text"):
        new = []
        for name, (k, v) in zip(self.layers, cache):
            hidden, k, v = self.sessions[name].run(None, {"hidden": hidden, "past_key": k, "past_value": v})
            new.append((k, v))
        hidden = self.sessions["norm"].run(None, {"hidden": hidden[:, -1:]})[0]
        return self.sessions[head].run(None, {"hidden": hidden})[0], new

    def _check_prompt(self, prompt: list[int], steps: int) -> None:
        limit = self.config["max_position_embeddings"]
        if len(prompt) + steps > limit:
            raise PipelineError(f"prompt of {len(prompt)} tokens + {steps} steps exceeds the position limit {limit}")
        if not prompt:
            raise PipelineError("empty prompt")
        vocab = self.config["num_text_tokens"]
        bad = [i for i in prompt if not 0 <= i < vocab]
        if bad:
            raise PipelineError(f"prompt ids out of the text vocabulary (0..{vocab - 1}): {bad[:5]}")

    def generate_codes(self, prompt: list[int], max_frames: int, sampling: SamplingParams | None = None
                       ) -> tuple[list[list[int]], Generation]:
        """Audio codes after a text prompt: one frame of `num_vq` codes a step, as ChatTTS's infer_code
        does (frames embedded as the sum of the codebook embeddings; a frame where any codebook says
        EOS = num_audio_tokens - 1 ends the sequence and is not returned). Greedy when `sampling` is None."""
        self._check_prompt(prompt, max_frames)
        vq, eos = self.config["num_vq"], self.config["num_audio_tokens"] - 1
        rng = np.random.default_rng(sampling.seed if sampling else 0)
        history: list[list[int]] = [[] for _ in range(vq)]
        frames: list[list[int]] = []
        t0 = time.perf_counter()
        emb = self.sessions["embed_text"].run(None, {"input_ids": np.array([prompt], np.int64)})[0]
        logits, cache = self._forward(emb, self._empty_cache(1), head="lm_head_code")
        timing = Generation([], time.perf_counter() - t0)
        for step in range(max_frames):
            rows = logits[0, -1].T  # [V, num_vq] -> one row per codebook, as ChatTTS reshapes
            frame = [self._next(rows[q], history[q], sampling, rng) for q in range(vq)]
            if eos in frame:
                break
            frames.append(frame)
            for q in range(vq):
                history[q].append(frame[q])
            if step == max_frames - 1:
                break
            t0 = time.perf_counter()
            emb = self.sessions["embed_code"].run(None, {"input_ids": np.array([[frame]], np.int64)})[0]
            logits, cache = self._forward(emb, cache, head="lm_head_code")
            timing.step_s.append(time.perf_counter() - t0)
        timing.ids = [c for f in frames for c in f]
        return frames, timing

    def _next(self, logits: np.ndarray, history: list[int], sampling: SamplingParams | None,
              rng: np.random.Generator) -> int:
        if sampling is None:
            return int(np.argmax(logits))
        if "sample_head" not in self.sessions:
            raise PipelineError(f"{self.ms.root}: this model set has no sample_head graph; generate greedily")
        window = history[-sampling.past_window:]
        past = np.full((1, sampling.past_window), -1, np.int64)
        past[0, :len(window)] = window
        next_ids, _ = self.sessions["sample_head"].run(None, {
            "logits": logits[None].astype(np.float32), "past_ids": past,
            "temperature": np.array([[sampling.temperature]], np.float32),
            "penalty": np.array([[sampling.repetition_penalty]], np.float32),
            "top_p": np.array([[sampling.top_p]], np.float32), "top_k": np.array([[sampling.top_k]], np.int64),
            "noise": rng.random((1, 1), dtype=np.float32), "greedy": np.array(False)})
        return int(next_ids[0])

    def generate_text(self, prompt: list[int], steps: int, sampling: SamplingParams | None = None) -> Generation:
        """Greedy (`sampling` None): the most likely next text token, `steps` times; else ChatTTS's sampling
        through the sample head, its uniform noise drawn from `sampling.seed`."""
        self._check_prompt(prompt, steps)
        t0 = time.perf_counter()
        emb = self.sessions["embed_text"].run(None, {"input_ids": np.array([prompt], np.int64)})[0]
        rng = np.random.default_rng(sampling.seed if sampling else 0)
        logits, cache = self._forward(emb, self._empty_cache(1))
        out = Generation([self._next(logits[0, -1], [], sampling, rng)], time.perf_counter() - t0)
        for _ in range(steps - 1):
            t0 = time.perf_counter()
            emb = self.sessions["embed_text"].run(None, {"input_ids": np.array([[out.ids[-1]]], np.int64)})[0]
            logits, cache = self._forward(emb, cache)
            out.ids.append(self._next(logits[0, -1], out.ids, sampling, rng))
            out.step_s.append(time.perf_counter() - t0)
        return out
