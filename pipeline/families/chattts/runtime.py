"""Generation with a ChatTTS GPT ModelSet in ONNX Runtime: prefill, then one decode step per token.

Each layer graph takes the cache so far (`past_key`/`past_value` [B, H, P, D])
and returns it grown by the new positions (`present_*` [B, H, P+T, D]). With
`session.run` every layer returned a newly allocated cache every step (at full
size 16 MB a step at 128 cached tokens, 126 MB at 1024), which numpy then
owned. Here the graphs are chained with io_binding over memory allocated once
per generation; no cache or hidden state is allocated in the loop (ORT's
intermediates come from its own arena, reused):

- **KV buffers**, allocated once per generation for prompt + steps positions,
  in one of two ways, after the layers' convention (pipeline/core/kv_cache.py):
  - exported layers (present = past ++ new): per layer and per K/V two flat
    buffers, used in turn. A step binds `past_*` to an OrtValue over the
    contiguous prefix of one buffer viewed as [B, H, P, D] and `present_*` to
    the prefix of the other as [B, H, P+T, D]; the layer writes the grown cache
    straight into it, and that OrtValue is the next step's past. (A slice
    along axis 2 of one [B, H, Tmax, D] array would not be a dense tensor, and
    a present that overlaps its past would be overwritten while being read.)
    The layer still rewrites the whole cache every step: that is the graphs'
    contract. About twice the cache's size resident.
  - in-place layers (`fuse_attention` with `kv_cache: in_place`): per layer one
    key and one value buffer, bound once as both past and present; a step
    writes only its new positions. The step's lengths and the rotary tables
    are shared by every layer, the tables computed once per generation. These
    layers and the norm run joined into one session (`ChatTTSRuntime.stack`),
    so a step runs 3 sessions instead of 23.
  The buffers come from np.empty, so the OS commits pages only as the cache
  grows into them.
- **Hidden state**: two buffers; separate layers read one and write the other
  in turn, so the hidden bindings change only when the step's token count does
  (prefill -> decode). The norm reads the last position (a row view, or a
  Slice inside the joined session); norm and head write into their own
  buffers, and the logits are read from there.

Only the I/O names and shapes of the graphs are relied on, not what is inside
them (the attention may become an ORT contrib op). Batch 1, as the API takes
one prompt. Text and audio-code modes, greedy or sampled through the sample
head graph (a plain `run`: its inputs are tiny).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from pipeline.core import kv_cache
from pipeline.core.kv_cache import InPlaceKV, KVBuffers
from pipeline.core.errors import PipelineError, few
from pipeline.core.graph import join
from pipeline.core.modelset import ModelSet
from pipeline.core.onnx_io import parse_graph, session
from pipeline.core.procinfo import release_free_memory


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
        self.ms.require_unchanged()
        meta = self.ms.meta
        if meta.get("exporter") != "chattts_gpt":
            raise PipelineError(f"{folder}: not a ChatTTS GPT model set (modelset.json meta.exporter)")
        self.config = meta["config"]
        self.layers = meta["layers"]
        missing = [n for n in ["embed_text", "norm", "lm_head_text", *self.layers] if n not in self.ms.names()]
        if missing:
            raise PipelineError(f"{folder}: model set lacks graphs {', '.join(missing)}")
        # One session per graph, made when first run: without spinning, their idle threads leave the cores
        # to the one running (a process that only generates does better still:
        # onnx_io.share_one_thread_pool). Without an arena, each of the ~25 sessions gives its prefill's
        # activations back instead of keeping its largest prefill cached: INT8, 1024-token prompt, peak RSS
        # 2.8 -> 0.9 GB, and decode no slower.
        self.threads = threads
        self.sessions = _Sessions(lambda n: session(self.ms.path(n), threads=threads, spinning=False, arena=False))
        self.in_place, self.inv_freq = self._kv_layout()
        self._stack: ort.InferenceSession | None = None

    def _kv_layout(self) -> tuple[bool, np.ndarray | None]:
        """Whether the layers keep their cache in place (pipeline/core/kv_cache.py), and their rotary frequencies."""
        models = {n: parse_graph(self.ms.path(n)) for n in self.layers}
        kinds = {n: kv_cache.is_in_place(i.name for i in m.graph.input) for n, m in models.items()}
        if len(set(kinds.values())) > 1:
            odd = [n for n, k in kinds.items() if k != kinds[self.layers[0]]]
            raise PipelineError(f"{self.ms.root}: layers mix KV-cache conventions ({few(odd, 3)} differ from "
                                f"{self.layers[0]}); run fuse_attention with kv_cache in_place on every layer")
        if not kinds[self.layers[0]]:
            return False, None
        freqs = [kv_cache.inv_freq_of(m) for m in models.values()]
        if any((f is None) != (freqs[0] is None) or (f is not None and not np.array_equal(f, freqs[0]))
               for f in freqs):
            raise PipelineError(f"{self.ms.root}: in-place layers disagree on their rotary frequencies")
        return True, freqs[0]

    def stack(self) -> ort.InferenceSession:
        """In-place layers, then the last position's norm, joined into one session (made once): a decode step
        runs the embedding, this and a head, 3 sessions instead of 23, each run costing ONNX Runtime's
        per-run overhead. Inputs `layer_NN/past_*` and the step inputs, outputs `layer_NN/present_*` (the same
        buffers) and `norm/hidden_out`. Blocks stay graphs of their own for the check (`run_layer`)."""
        if self._stack is None:
            parts: list[tuple[str, onnx.ModelProto | Path]] = [(n, self.ms.path(n)) for n in self.layers]
            parts += [(STACK_LAST, _last_position(self.config["hidden_size"])), ("norm", self.ms.path("norm"))]
            chain = [n for n, _ in parts]
            links = {f"{b}/{'x' if b == STACK_LAST else 'hidden'}": f"{a}/{'y' if a == STACK_LAST else 'hidden_out'}"
                     for a, b in zip(chain, chain[1:])}
            presents = [f"{n}/present_{kv}" for n in self.layers for kv in ("key", "value")]
            # Through a file: the weights are never held twice while joining (graph.join), nor in Python
            # and in the session at once.
            with tempfile.TemporaryDirectory(prefix="chattts_stack_") as tmp:
                joined = Path(tmp) / "stack.onnx"
                join(parts, links, kv_cache.STEP_INPUTS, ["norm/hidden_out", *presents], joined)
                self._stack = session(joined, threads=self.threads, spinning=False, arena=False)
            release_free_memory()  # INT8, 1024-token prompt: peak RSS 933 -> 833 MB
        return self._stack

    def run_layer(self, name: str, hidden: np.ndarray, past_key: np.ndarray, past_value: np.ndarray
                  ) -> list[np.ndarray]:
        """[hidden_out, present_key, present_value] of one layer on its own, present = past ++ new whichever
        KV convention the graph keeps (the check and calibration capture feed layers this way)."""
        feeds = {"hidden": hidden, "past_key": past_key, "past_value": past_value}
        if self.in_place:
            feeds = kv_cache.contract_feeds(feeds, self.inv_freq)
        return self.sessions[name].run(None, feeds)

    def empty_kv(self, batch: int = 1) -> np.ndarray:
        """An empty past key (or value) [batch, heads, 0, head_dim], for running a layer graph on its own."""
        c = self.config
        return np.zeros((batch, c["num_attention_heads"], 0, c["hidden_size"] // c["num_attention_heads"]), np.float32)

    def decoder(self, prompt_len: int, steps: int, head: str = "lm_head_text") -> Decoder:
        """A chain over io_binding for one generation: a prefill of up to `prompt_len` tokens, then `steps`
        tokens one at a time, each call returning `head`'s logits at the last position."""
        missing = [n for n in (head, "embed_code" if head == "lm_head_code" else "embed_text")
                   if n not in self.ms.names()]
        if missing:
            raise PipelineError(f"{self.ms.root}: model set lacks graphs {', '.join(missing)}")
        return Decoder(self, head, max_len=prompt_len + steps, max_tokens=prompt_len)

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
        chain = self.decoder(len(prompt), max_frames, head="lm_head_code")
        logits = chain.forward("embed_text", np.array([prompt], np.int64))
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
            logits = chain.forward("embed_code", np.array([[frame]], np.int64))
            timing.step_s.append(time.perf_counter() - t0)
        timing.ids = [c for f in frames for c in f]
        return frames, timing

    def _next(self, logits: np.ndarray, history: list[int], sampling: SamplingParams | None,
              rng: np.random.Generator) -> int:
        if sampling is None:
            return int(np.argmax(logits))
        if "sample_head" not in self.ms.names():
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
        rng = np.random.default_rng(sampling.seed if sampling else 0)
        chain = self.decoder(len(prompt), steps)
        logits = chain.forward("embed_text", np.array([prompt], np.int64))
        out = Generation([self._next(logits[0, -1], [], sampling, rng)], time.perf_counter() - t0)
        for _ in range(steps - 1):
            t0 = time.perf_counter()
            logits = chain.forward("embed_text", np.array([[out.ids[-1]]], np.int64))
            out.ids.append(self._next(logits[0, -1], out.ids, sampling, rng))
            out.step_s.append(time.perf_counter() - t0)
        return out


STACK_LAST = "last_position"


class _Sessions(dict):
    """Graph name -> its session, made on first use (generation from in-place layers never needs theirs)."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, name: str) -> ort.InferenceSession:
        made = self[name] = self.make(name)
        return made


def _last_position(hidden: int) -> onnx.ModelProto:
    """x [B, S, hidden] -> y [B, 1, hidden], its last position: what the norm and head need a step."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", hidden])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 1, hidden])
    bounds = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in
              (("start", -1), ("end", np.iinfo(np.int64).max), ("axis", 1))]
    node = helper.make_node("Slice", ["x", "start", "end", "axis"], ["y"], name="/Slice")
    return helper.make_model(helper.make_graph([node], "last_position", [x], [y], bounds),
                             opset_imports=[helper.make_opsetid("", 17)])


class Decoder:
    """One generation's chain of sessions over io_binding: embedding -> layers -> norm -> one head, the layers
    and norm joined into one session (`ChatTTSRuntime.stack`) when they keep their cache in place.

    `forward` takes up to `max_tokens` new tokens a call and returns the logits at the last position, a view
    into a buffer that the next call overwrites."""

    def __init__(self, rt: ChatTTSRuntime, head: str, max_len: int, max_tokens: int):
        c = rt.config
        heads = c["num_attention_heads"]
        self.layers, self.head, self.max_tokens, self.in_place = rt.layers, head, max_tokens, rt.in_place
        sessions = {n: rt.sessions[n] for n in ("embed_text", "embed_code", head) if n in rt.ms.names()}
        if rt.in_place:
            sessions["stack"] = rt.stack()
        else:
            sessions.update({n: rt.sessions[n] for n in [*rt.layers, "norm"]})
        self.bindings = {n: s.io_binding() for n, s in sessions.items()}
        self.runs = {n: s.run_with_iobinding for n, s in sessions.items()}
        # Outputs by position, as `run(None, ...)` takes them (a layer's hidden output is named hidden_out).
        self.outputs = {n: [o.name for o in s.get_outputs()] for n, s in sessions.items()}
        dims = (len(rt.layers), c.get("num_key_value_heads") or heads, c["hidden_size"] // heads, max_len)
        self.hidden_size = c["hidden_size"]
        self.hidden = np.empty((2, max_tokens * self.hidden_size), np.float32)
        self.normed = np.empty((1, 1, self.hidden_size), np.float32)
        vocab = (c["num_text_tokens"],) if head == "lm_head_text" else (c["num_audio_tokens"], c["num_vq"])
        self.logits = np.empty((1, 1, *vocab), np.float32)
        if rt.in_place:
            self.kv = InPlaceKV(*dims, inv_freq=rt.inv_freq)
            self._bind_stack()
        else:
            self.kv = KVBuffers(*dims)
            self._bind_out("norm", 0, self.normed)
        self._bind_in(head, "hidden", self.normed)
        self._bind_out(head, 0, self.logits)
        self.tokens = 0  # the token count the hidden bindings are set for
        self.hidden_values: tuple[ort.OrtValue, ort.OrtValue] | None = None

    def _bind_stack(self) -> None:
        """Once per generation: every layer's buffer as its past and its present, the shared step inputs."""
        stack = self.bindings["stack"]
        for name, (key, value) in zip(self.layers, self.kv.layer_values()):
            stack.bind_ortvalue_input(f"{name}/past_key", key)
            stack.bind_ortvalue_input(f"{name}/past_value", value)
            stack.bind_ortvalue_output(f"{name}/present_key", key)
            stack.bind_ortvalue_output(f"{name}/present_value", value)
        for input_name, value in self.kv.shared.items():
            stack.bind_ortvalue_input(input_name, value)
        stack.bind_ortvalue_output("norm/hidden_out", ort.OrtValue.ortvalue_from_numpy(self.normed))

    def _bind_in(self, graph: str, name: str, array: np.ndarray) -> None:
        self.bindings[graph].bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))

    def _bind_out(self, graph: str, index: int, value: np.ndarray | ort.OrtValue) -> None:
        if isinstance(value, np.ndarray):
            value = ort.OrtValue.ortvalue_from_numpy(value)
        self.bindings[graph].bind_ortvalue_output(self.outputs[graph][index], value)

    def _bind_hidden(self, tokens: int) -> None:
        """The embedding writes hidden buffer 0. Separate layers: layer i reads buffer i % 2 and writes the
        other; the norm reads the last row of the last one. Joined: the stack reads buffer 0."""
        if tokens > self.max_tokens:
            raise PipelineError(f"{tokens} tokens in one call; this decoder was made for at most {self.max_tokens}")
        views = [buf[:tokens * self.hidden_size].reshape(1, tokens, self.hidden_size) for buf in self.hidden]
        self.hidden_values = tuple(ort.OrtValue.ortvalue_from_numpy(v) for v in views)
        if self.in_place:
            self.bindings["stack"].bind_ortvalue_input(f"{self.layers[0]}/hidden", self.hidden_values[0])
        else:
            for i, name in enumerate(self.layers):
                self.bindings[name].bind_ortvalue_input("hidden", self.hidden_values[i % 2])
                self._bind_out(name, 0, self.hidden_values[(i + 1) % 2])
            self._bind_in("norm", "hidden", views[len(self.layers) % 2][:, -1:])  # batch 1: the last row is contiguous
        self.tokens = tokens

    def forward(self, embed: str, input_ids: np.ndarray) -> np.ndarray:
        """Logits [1, 1, V] (text head) or [1, 1, V, num_vq] (code head) after `input_ids` through `embed`
        (embed_text: [1, T]; embed_code: [1, T, num_vq])."""
        tokens = input_ids.shape[1]
        if tokens != self.tokens:
            self._bind_hidden(tokens)
        self.bindings[embed].bind_cpu_input("input_ids", input_ids)
        self._bind_out(embed, 0, self.hidden_values[0])
        self.runs[embed](self.bindings[embed])
        if self.in_place:
            self.kv.advance(tokens)
            self.runs["stack"](self.bindings["stack"])
        else:
            self._concat_layers(tokens)
            self.runs["norm"](self.bindings["norm"])
        self.runs[self.head](self.bindings[self.head])
        return self.logits

    def _concat_layers(self, tokens: int) -> None:
        for name, (past, present) in zip(self.layers, self.kv.grow(tokens)):
            binding = self.bindings[name]
            binding.bind_ortvalue_input("past_key", past[0])
            binding.bind_ortvalue_input("past_value", past[1])
            self._bind_out(name, 1, present[0])
            self._bind_out(name, 2, present[1])
            self.runs[name](binding)
