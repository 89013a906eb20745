"""Generation with a ChatTTS GPT ModelSet in ONNX Runtime: prefill, then one decode step per token.

Each layer graph takes the cache so far and returns it one step longer; the
runtime carries it from step to step. Greedy text mode for now.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import PipelineError
from ..modelset import ModelSet
from ..onnx_io import session


@dataclass
class Generation:
    ids: list[int]
    prefill_s: float
    step_s: list[float] = field(default_factory=list)


class ChatTTSRuntime:
    def __init__(self, folder: Path, threads: int = 2):
        self.ms = ModelSet.read(Path(folder))
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

    def _forward(self, hidden: np.ndarray, cache):
        new = []
        for name, (k, v) in zip(self.layers, cache):
            hidden, k, v = self.sessions[name].run(None, {"hidden": hidden, "past_key": k, "past_value": v})
            new.append((k, v))
        hidden = self.sessions["norm"].run(None, {"hidden": hidden})[0]
        return self.sessions["lm_head_text"].run(None, {"hidden": hidden})[0], new

    def generate_text(self, prompt: list[int], steps: int) -> Generation:
        """Greedy: the most likely next text token, `steps` times."""
        limit = self.config["max_position_embeddings"]
        if len(prompt) + steps > limit:
            raise PipelineError(f"prompt of {len(prompt)} tokens + {steps} steps exceeds the position limit {limit}")
        if not prompt:
            raise PipelineError("empty prompt")
        vocab = self.config["num_text_tokens"]
        bad = [i for i in prompt if not 0 <= i < vocab]
        if bad:
            raise PipelineError(f"prompt ids out of the text vocabulary (0..{vocab - 1}): {bad[:5]}")
        t0 = time.perf_counter()
        emb = self.sessions["embed_text"].run(None, {"input_ids": np.array([prompt], np.int64)})[0]
        logits, cache = self._forward(emb, self._empty_cache(1))
        out = Generation([int(np.argmax(logits[0, -1]))], time.perf_counter() - t0)
        for _ in range(steps - 1):
            t0 = time.perf_counter()
            emb = self.sessions["embed_text"].run(None, {"input_ids": np.array([[out.ids[-1]]], np.int64)})[0]
            logits, cache = self._forward(emb, cache)
            out.ids.append(int(np.argmax(logits[0, -1])))
            out.step_s.append(time.perf_counter() - t0)
        return out
