"""Generation with a Tortoise ModelSet in ONNX Runtime: prefill once, then one decode step per code.

Both graphs run over io_binding, as ChatTTS's runtime does: the KV cache is
`kv_cache.KVBuffers` (two flat buffers per layer and K/V, the past read from
one and the grown present written into the other, allocated once per
generation), the logits land in one preallocated buffer, and each step's
hidden state is written straight into its row of the result array. Nothing is
allocated per step but ONNX Runtime's own intermediates.

Tortoise's conventions (tortoise-tts 3.0.0, inference_speech with the KV cache):
the prefill is `[cond latent | start_text, text..., stop_text | start_mel]`;
code k (1-based) is embedded at mel position k + 1; generation stops at
stop_mel. The diffusion latents are a second pass over the finished codes
(`latents`), not the decode-time states.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeline.core import kv_cache
from pipeline.core.errors import PipelineError
from pipeline.core.modelset import ModelSet
from pipeline.core.onnx_io import session
from .exporter import EXPORTER, kv_names
from .sample_head import TortoiseSampling

PLACEHOLDER_ID = 1  # inference_speech's fake input ids before start_mel: they are in the penalty's history


def prefill_positions(text_tokens: int) -> int:
    """The prefill's sequence: cond latent, start_text, the text, stop_text, start_mel."""
    return 1 + 1 + text_tokens + 1 + 1


@dataclass
class Generation:
    codes: list[int]
    hidden: np.ndarray  # [steps, dim]: the decode-time hidden state at each code's input
    prefill_s: float
    step_s: list[float] = field(default_factory=list)
    stopped: bool = False  # ended at stop_mel before the step budget


class TortoiseRuntime:
    def __init__(self, folder: Path, threads: int = 2):
        self.ms = ModelSet.read(Path(folder))
        meta = self.ms.meta
        if meta.get("exporter") != EXPORTER:
            raise PipelineError(f"{folder}: not a Tortoise model set (modelset.json meta.exporter)")
        missing = [n for n in ("prefill", "decode") if n not in self.ms.names()]
        if missing:
            raise PipelineError(f"{folder}: model set lacks graphs {', '.join(missing)}")
        self.ms.require_unchanged()
        self.config = meta["config"]
        self.layers = self.config["layers"]
        self.dim = self.config["model_dim"]
        self.threads = threads
        self._sessions: dict[str, ort.InferenceSession] = {}

    def run_decode(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One plain decode run on past ++ new feeds (`past_key_N` of exactly the cache so far), whichever KV
        convention the graph keeps: [logits, hidden, presents...], presents one position longer."""
        if not hasattr(self, "_adapt"):
            self._adapt = kv_cache.feed_adapter(self.ms.path("decode"))
        return self.session("decode").run(None, self._adapt(feeds))

    def decode_in_place(self) -> bool:
        return kv_cache.is_in_place(i.name for i in self.session("decode").get_inputs())

    def session(self, name: str) -> ort.InferenceSession:
        if name not in self._sessions:
            self._sessions[name] = session(self.ms.path(name), threads=self.threads, spinning=False)
        return self._sessions[name]

    # -- input checks: one clear line each ---------------------------------------------
    def check_text(self, text_ids: list[int]) -> None:
        c = self.config
        if not text_ids:
            raise PipelineError("empty text: give at least one text token id")
        vocab = c["number_text_tokens"] + 1
        bad = [i for i in text_ids if not 0 <= i < vocab]
        if bad:
            raise PipelineError(f"text ids outside the text vocabulary (0..{vocab - 1}): {bad[:5]}")
        if len(text_ids) > c["max_text_tokens"]:
            raise PipelineError(f"{len(text_ids)} text tokens: the model takes at most {c['max_text_tokens']}")

    def check_latent(self, latent: np.ndarray) -> np.ndarray:
        given = latent = np.asarray(latent)
        if latent.ndim == 1:
            latent = latent[None]
        if latent.shape != (1, self.dim) or not np.issubdtype(latent.dtype, np.floating):
            raise PipelineError(f"conditioning latent of shape {list(given.shape)} ({given.dtype}): this model "
                                f"takes one float latent of {self.dim} values ([1, {self.dim}] or [{self.dim}])")
        if not np.isfinite(latent).all():
            raise PipelineError("conditioning latent holds NaN or infinite values")
        return latent.astype(np.float32)

    def max_steps(self) -> int:
        """inference_speech's limit: max_mel_tokens - 1 codes after start_mel."""
        return self.config["max_mel_tokens"] - 1

    def check_steps(self, steps: int) -> None:
        if not 1 <= steps <= self.max_steps():
            raise PipelineError(f"--steps {steps}: this model generates 1..{self.max_steps()} codes "
                                f"(max_mel_tokens {self.config['max_mel_tokens']} - 1)")

    # -- stages ---------------------------------------------------------------------------
    def conditioning(self, mels: np.ndarray) -> np.ndarray:
        """Reference mels [B, clips, 80, frames] -> conditioning latent [B, dim]."""
        if "conditioning" not in self.ms.names():
            raise PipelineError(f"{self.ms.root}: model set has no conditioning graph")
        mels = np.asarray(mels, np.float32)
        if mels.ndim != 4 or mels.shape[2] != self.config["mel_channels"]:
            raise PipelineError(f"reference mels of shape {list(mels.shape)}: expected [batch, clips, "
                                f"{self.config['mel_channels']}, frames]")
        return self.session("conditioning").run(None, {"mels": mels})[0]

    def prefill(self, text_ids: list[int], latent: np.ndarray, mel_ids: list[int]) -> list[np.ndarray]:
        """[logits, hidden, presents...] of the prefill graph, a plain run (the check and the latents use it)."""
        return self.session("prefill").run(None, {"text_ids": np.array([text_ids], np.int64),
                                                  "cond_latent": latent, "mel_ids": np.array([mel_ids], np.int64)})

    def latents(self, text_ids: list[int], latent: np.ndarray, codes: list[int]) -> np.ndarray:
        """The diffusion decoder's latents [N, dim] for codes c1..cN: forward(return_latent=True), i.e. the
        hidden states at `[start_mel, c1, ..., c_{N-1}]` at mel positions 0..N-1, in one prefill."""
        if not codes:
            return np.zeros((0, self.dim), np.float32)
        self.check_text(text_ids)
        latent = self.check_latent(latent)
        return self.prefill(text_ids, latent, [self.config["start_mel_token"], *codes[:-1]])[1][0]

    def generate(self, text_ids: list[int], latent: np.ndarray, steps: int,
                 sampling: TortoiseSampling | None = None, seed: int = 0) -> Generation:
        """Up to `steps` codes, greedy (`sampling` None) or with Tortoise's sampling through the sample head,
        its uniform noise drawn from `seed`. Stops at stop_mel, which is not returned."""
        self.check_text(text_ids)
        latent = self.check_latent(latent)
        self.check_steps(steps)
        c = self.config
        prompt_len = prefill_positions(len(text_ids))
        loop = _Loop(self, prompt_len + steps)
        sampler = _Sampler(self, sampling, seed, prompt_len) if sampling else None
        t0 = time.perf_counter()
        logits = loop.prefill(text_ids, latent)
        out = Generation([], loop.hidden, time.perf_counter() - t0)
        while True:
            code = sampler.next(logits) if sampler else int(np.argmax(logits))
            if code == c["stop_mel_token"]:
                out.stopped = True
                break
            out.codes.append(code)
            if len(out.codes) == steps:
                break
            t0 = time.perf_counter()
            logits = loop.decode(code, len(out.codes) + 1)
            out.step_s.append(time.perf_counter() - t0)
        out.hidden = loop.hidden[:len(out.codes)]
        return out


class _Loop:
    """One generation's prefill and decode sessions over io_binding. The decode graph keeps its cache either
    way of pipeline/core/kv_cache.py: present = past ++ new (`KVBuffers`), or in place (`fuse_attention` with
    `kv_cache: in_place`: one buffer per layer and K/V bound once as past and present, `InPlaceKV`; the
    prefill's presents are copied into it once)."""

    def __init__(self, rt: TortoiseRuntime, max_len: int):
        c = rt.config
        self.rt = rt
        self.prefill_s, self.decode_s = rt.session("prefill"), rt.session("decode")
        self.bindings = {"prefill": self.prefill_s.io_binding(), "decode": self.decode_s.io_binding()}
        dims = (c["layers"], c["heads"], c["model_dim"] // c["heads"], max_len)
        self.in_place = kv_cache.is_in_place(i.name for i in self.decode_s.get_inputs())
        self.kv = kv_cache.InPlaceKV(*dims, inv_freq=None) if self.in_place else kv_cache.KVBuffers(*dims)
        self.logits = np.empty((1, 1, c["number_mel_codes"]), np.float32)
        self.hidden = np.empty((max_len, c["model_dim"]), np.float32)  # row k: the state at code k's input
        self.row = 0
        self.presents = kv_names(c["layers"], "present")
        self.pasts = kv_names(c["layers"], "past")
        logits = ort.OrtValue.ortvalue_from_numpy(self.logits)
        for b in self.bindings.values():
            b.bind_ortvalue_output("logits", logits)
        if self.in_place:
            self._bind_in_place()

    def _bind_in_place(self) -> None:
        """Once per generation: each layer's buffers as its past and present, the shared step lengths."""
        b = self.bindings["decode"]
        for n, (key, value) in enumerate(self.kv.layer_values()):
            b.bind_ortvalue_input(self.pasts[2 * n], key)
            b.bind_ortvalue_input(self.pasts[2 * n + 1], value)
            b.bind_ortvalue_output(self.presents[2 * n], key)
            b.bind_ortvalue_output(self.presents[2 * n + 1], value)
        for name, value in self.kv.shared.items():
            b.bind_ortvalue_input(name, value)

    def _bind_hidden(self, graph: str) -> None:
        row = self.hidden[self.row:self.row + 1][None]  # [1, 1, dim], contiguous
        self.bindings[graph].bind_ortvalue_output("hidden", ort.OrtValue.ortvalue_from_numpy(row))
        self.row += 1

    def _bind_concat(self, graph: str, new: int) -> None:
        binding = self.bindings[graph]
        for n, (past, present) in enumerate(self.kv.grow(new)):
            if graph == "decode":
                binding.bind_ortvalue_input(self.pasts[2 * n], past[0])
                binding.bind_ortvalue_input(self.pasts[2 * n + 1], past[1])
            binding.bind_ortvalue_output(self.presents[2 * n], present[0])
            binding.bind_ortvalue_output(self.presents[2 * n + 1], present[1])

    def prefill(self, text_ids: list[int], latent: np.ndarray) -> np.ndarray:
        b = self.bindings["prefill"]
        b.bind_cpu_input("text_ids", np.array([text_ids], np.int64))
        b.bind_cpu_input("cond_latent", latent)
        b.bind_cpu_input("mel_ids", np.array([[self.rt.config["start_mel_token"]]], np.int64))
        self._bind_hidden("prefill")
        total = prefill_positions(len(text_ids))
        if not self.in_place:
            self._bind_concat("prefill", total)
            self.prefill_s.run_with_iobinding(b)
            return self.logits[0, -1]
        data = self.kv.data
        presents = np.empty((*data.shape[:4], total, data.shape[5]), np.float32)
        for n in range(data.shape[0]):
            for kv in (0, 1):
                b.bind_ortvalue_output(self.presents[2 * n + kv], ort.OrtValue.ortvalue_from_numpy(presents[n, kv]))
        self.prefill_s.run_with_iobinding(b)
        data[:, :, :, :, :total] = presents
        self.kv.length = total
        return self.logits[0, -1]

    def decode(self, code: int, position: int) -> np.ndarray:
        b = self.bindings["decode"]
        b.bind_cpu_input("mel_id", np.array([[code]], np.int64))
        b.bind_cpu_input("position", np.array([position], np.int64))
        self._bind_hidden("decode")
        if self.in_place:
            self.kv.advance(1)
        else:
            self._bind_concat("decode", 1)
        self.decode_s.run_with_iobinding(b)
        return self.logits[0, -1]


class _Sampler:
    """Tortoise's sampling through the sample head; the history starts with inference_speech's fake inputs."""

    def __init__(self, rt: TortoiseRuntime, sampling: TortoiseSampling, seed: int, prompt_len: int):
        if "sample_head" not in rt.ms.names():
            raise PipelineError(f"{rt.ms.root}: this model set has no sample_head graph; generate greedily")
        c = rt.config
        self.head = rt.session("sample_head")
        self.seen = np.zeros((1, c["number_mel_codes"]), bool)
        if prompt_len > 1:
            self.seen[0, PLACEHOLDER_ID] = True
        self.seen[0, c["start_mel_token"]] = True
        self.rng = np.random.default_rng(seed)
        self.fixed = {"temperature": np.array([[sampling.temperature]], np.float32),
                      "penalty": np.array([[sampling.repetition_penalty]], np.float32),
                      "top_k": np.array([[sampling.top_k]], np.int64),
                      "top_p": np.array([[sampling.top_p]], np.float32), "greedy": np.array(False)}

    def next(self, logits: np.ndarray) -> int:
        code = int(self.head.run(["next_ids"], {"logits": logits[None], "seen": self.seen,
                                                "noise": self.rng.random((1, 1), dtype=np.float32),
                                                **self.fixed})[0][0])
        self.seen[0, code] = True
        return code
