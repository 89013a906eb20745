"""The variants of benchmarks/bench_chattts.py, each run in a worker process of its own.

A variant is a kind and a folder: `eager` (PyTorch, our ChatTTSGPT modules on the seeded weights; no
folder), `ours` (a ChatTTS GPT ModelSet through ChatTTSRuntime), `genai` (an ONNX Runtime GenAI model
folder). Imports are lazy, so an ONNX Runtime worker never loads torch and the reverse.

- `time_decode`: prefill `cache` seeded text tokens, 1 warm-up decode step, then `steps` timed steps of
  one token each (the token through embedding, layers, norm, text head, then the greedy pick);
- `bandwidth_gbs`: memory read bandwidth (torch sum over 1 GiB, best of 5) with n threads;
- `genai_check`: GenAI FP32 against our FP32 (logits at a seeded prompt, greedy tokens);
- `write_reference` / `accuracy`: teacher-forced prefill of prompt + FP32 eager's greedy continuation;
  final hidden states (SQNR) and text-head top-1 agreement against FP32 eager;
- `ours_step_bytes`, `genai_step_bytes`: the weight bytes a decode step reads, from the files.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

PROMPT_SEED = 0
ACCURACY_STEPS = 32


def prompt_ids(n: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(PROMPT_SEED).integers(0, vocab, (1, n)).astype(np.int64)


def vocab_of(kind: str, path: Path | None) -> int:
    if kind == "genai":
        return int(json.loads((path / "genai_config.json").read_text())["model"]["vocab_size"])
    if kind == "ours":
        from pipeline.core.modelset import ModelSet

        return int(ModelSet.read(path).meta["config"]["num_text_tokens"])
    from pipeline.families.chattts.exporter import GPTConfig

    return GPTConfig().num_text_tokens


# --- decode steps: each maker prefills (untimed) and returns a call that runs one decode step -----------

def eager_model(threads: int):
    import torch

    from pipeline.families.chattts.exporter import ChatTTSGPT, load_weights

    torch.set_num_threads(threads)
    return ChatTTSGPT(load_weights(None, seed=0))


def eager_bytes(model) -> int:
    """FP32 parameter bytes of layers, norm and text head, plus one row of the text embedding."""
    parts = [*model.layers, model.norm, model.lm_head_text]
    table = model.embed_text.emb_text.weight
    return (sum(p.numel() * p.element_size() for m in parts for p in m.parameters())
            + table.shape[1] * table.element_size())


def eager_step(model, prompt: np.ndarray, tokens: list[int]):
    """Prefill `prompt`; each call feeds the last greedy token and appends the next one to `tokens`."""
    import torch

    cache = model.empty_cache(1)

    @torch.inference_mode()
    def forward(ids: np.ndarray) -> None:
        nonlocal cache
        hidden, cache = model.step(model.embed_text(torch.from_numpy(ids)), cache)
        tokens.append(int(model.lm_head_text(hidden[:, -1:])[0, -1].argmax()))

    forward(prompt)
    return lambda: forward(np.array([[tokens[-1]]], np.int64))


def ours_step(folder: Path, threads: int, prompt: np.ndarray, steps: int, tokens: list[int]):
    """As `eager_step`, through ChatTTSRuntime's decoder (io_binding), for up to `steps` steps."""
    from pipeline.families.chattts.runtime import ChatTTSRuntime
    from pipeline.core.onnx_io import share_one_thread_pool

    share_one_thread_pool(threads)  # as `pipeline generate` runs it: this worker process only generates
    dec = ChatTTSRuntime(folder, threads=threads).decoder(prompt.shape[1], steps)
    tokens.append(int(dec.forward("embed_text", prompt)[0, -1].argmax()))

    def step() -> None:
        tokens.append(int(dec.forward("embed_text", np.array([[tokens[-1]]], np.int64))[0, -1].argmax()))

    return step


def time_decode(kind: str, path: Path | None, threads: int, cache: int, steps: int) -> dict:
    """Median and min of `steps` timed decode steps after a prefill of `cache` tokens and 1 warm-up step."""
    from pipeline.core.procinfo import peak_rss_mb

    t0 = time.perf_counter()
    prompt = prompt_ids(cache, vocab_of(kind, path))
    extra = {}
    if kind == "eager":
        model = eager_model(threads)
        extra["weight_bytes"] = eager_bytes(model)
        step = eager_step(model, prompt, [])
    elif kind == "ours":
        step = ours_step(path, threads, prompt, steps + 1, [])
    else:
        import genai_peer

        step = genai_peer.decode_step(path, threads, prompt, steps + 1)
    load_s = time.perf_counter() - t0
    step()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": float(np.median(times)), "min_ms": min(times), "times_ms": times,
            "load_and_prefill_s": load_s, "peak_rss_mb": peak_rss_mb(), **extra}


def bandwidth_gbs(threads: int, mb: int = 1024, repeat: int = 5) -> float:
    """Read bandwidth: torch sum over a float32 buffer far larger than any cache, `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(mb * 2**20 // 4)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def genai_check(ours: Path, genai: Path, threads: int, cache: int, steps: int = 16) -> dict:
    """Is GenAI's FP32 model ours? Logits at a seeded prompt, and `steps` greedy tokens (EOS suppressed
    on both sides, as GenAI's generator here does)."""
    import genai_peer
    from pipeline.families.chattts.runtime import ChatTTSRuntime

    prompt = prompt_ids(cache, vocab_of("ours", ours))
    dec = ChatTTSRuntime(ours, threads=threads).decoder(cache, steps)
    logits = dec.forward("embed_text", prompt)[0, -1].copy()
    theirs = genai_peer.prompt_logits(genai, threads, prompt)
    tokens = []
    row = logits.copy()
    for _ in range(steps):
        row[genai_peer.EOS] = -np.inf
        tokens.append(int(row.argmax()))
        if len(tokens) < steps:
            row = dec.forward("embed_text", np.array([[tokens[-1]]], np.int64))[0, -1].copy()
    their_tokens = genai_peer.greedy(genai, threads, prompt, steps)
    return {"logits_max_abs_diff": float(np.abs(logits - theirs).max()), "logits_max_abs": float(np.abs(logits).max()),
            "tokens_equal": sum(a == b for a, b in zip(tokens, their_tokens)), "steps": steps,
            "ours": tokens, "genai": their_tokens}


# --- accuracy -------------------------------------------------------------------------------------------

def write_reference(dest: Path, threads: int, cache: int) -> dict:
    """FP32 eager: greedy continuation of the seeded prompt, then one teacher-forced prefill of prompt +
    continuation; saves ids, the last layer's output (pre-norm), the final norm's output and the top-1."""
    import torch

    model = eager_model(threads)
    prompt = prompt_ids(cache, model.config.num_text_tokens)
    cont: list[int] = []
    step = eager_step(model, prompt, cont)
    while len(cont) < ACCURACY_STEPS:
        step()
    ids = np.concatenate([prompt, np.array([cont], np.int64)], axis=1)
    with torch.inference_mode():
        pre, post, logits = eager_prefill(model, ids)
    np.savez(dest, ids=ids, prompt_len=cache, pre=pre, post=post, top1=logits.argmax(-1))
    return {"tokens": cont}


def eager_prefill(model, ids: np.ndarray):
    """(last layer's output, final norm's output, text logits), each [S, ...], of one prefill of `ids`."""
    import torch

    z = model.empty_cache(1)[0][0]
    h = model.embed_text(torch.from_numpy(ids))
    for layer in model.layers:
        h, _, _ = layer(h, z, z)
    post = model.norm(h)
    return h[0].numpy(), post[0].numpy(), model.lm_head_text(post)[0].numpy()


def accuracy(kind: str, path: Path, ref: Path, threads: int) -> dict:
    """Against the FP32 eager reference: SQNR of the final norm's output (and of the last layer's output,
    ours only) over all positions; top-1 agreement of the text head at the continuation's positions."""
    from pipeline.core.audio import sqnr_db

    r = np.load(ref)
    ids, p = r["ids"], int(r["prompt_len"])
    if kind == "ours":
        from pipeline.families.chattts.check import _chain
        from pipeline.families.chattts.runtime import ChatTTSRuntime

        outs, ins = _chain(ChatTTSRuntime(path, threads=threads), ids[0].tolist(), None)
        pre, post, logits = ins["norm"][0], outs["norm"][0][0], outs["lm_head_text"][0][0]
    else:
        import genai_peer

        out = genai_peer.prefill_outputs(path, threads, ids)
        pre, post, logits = None, out.get("hidden_states"), out["logits"]
    agree = logits[p - 1:-1].argmax(-1) == r["top1"][p - 1:-1]
    return {"sqnr_final_norm_db": None if post is None else sqnr_db(r["post"], post),
            "sqnr_last_layer_db": None if pre is None else sqnr_db(r["pre"], pre),
            "top1_agreement": float(agree.mean()), "positions": int(agree.size)}


# --- weight bytes per decode step, from the files --------------------------------------------------------

def tensor_bytes(t) -> int:
    """Stored bytes of an initializer: its external-data length, raw data, or dims x element size."""
    import onnx

    if t.data_location == onnx.TensorProto.EXTERNAL:
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            return int(ext["length"])
    if t.raw_data:
        return len(t.raw_data)
    n = math.prod(t.dims)
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (n + 1) // 2
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def embedding_rule(sizes: dict[str, int], tables: dict[str, int]) -> int:
    """Sum of `sizes`, each embedding table (name -> row count) counted as one row."""
    return sum(sizes.values()) - sum(sizes[k] - sizes[k] // rows for k, rows in tables.items())


def ours_step_bytes(folder: Path) -> int:
    """Initializers of embed_text (one row), every layer, norm and lm_head_text."""
    import onnx

    from pipeline.core.modelset import ModelSet

    ms = ModelSet.read(folder)
    sizes, tables = {}, {}
    for g in ["embed_text", *ms.meta["layers"], "norm", "lm_head_text"]:
        inits = onnx.load(str(ms.path(g)), load_external_data=False).graph.initializer
        sizes.update({f"{g}/{t.name}": tensor_bytes(t) for t in inits})
        if g == "embed_text":
            table = max(inits, key=tensor_bytes)
            tables[f"{g}/{table.name}"] = table.dims[0]
    return embedding_rule(sizes, tables)


def genai_step_bytes(folder: Path) -> int:
    """Initializers of model.onnx (+ .data), the Gather table fed input_ids counted as one row."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    tables = {n.input[0]: inits[n.input[0]].dims[0] for n in model.graph.node
              if n.op_type in ("Gather", "GatherBlockQuantized") and n.input[0] in inits
              and n.input[1] == "input_ids"}
    return embedding_rule({k: tensor_bytes(t) for k, t in inits.items()}, tables)
