"""ChatTTS GPT decode speed at full size (seeded weights, ChatTTS's exact config), in one run.

    python benchmarks/bench_chattts.py [--out runs/bench] [--cache 128] [--steps 20] [--recipe R.yaml]

Runs recipes/chattts_int8.yaml, or `--recipe` (cached in OUT/<recipe file
name>: the exported FP32 ModelSet is its step 00, the INT8 one its final/),
then times, interleaved:
- PyTorch eager FP32 (our layer modules, which match transformers' LlamaModel),
- ONNX Runtime FP32 and INT8 through the runtime (io_binding, KV buffers
  allocated once per generation: `ort_fp32`, `ort_int8`),
- the same graphs through plain `session.run`, every layer returning a newly
  allocated cache (`*_run`: the runtime before io_binding),
decode steps of one token each (embedding, 20 layers, norm, text head) after a
prefill of `--cache` tokens, the cache growing by one a step as in real
generation, and a prefill of 64 tokens (for the runtime: with its buffers
allocated). 2 threads everywhere. Prints medians, ratios, weight bytes read
per decode step and the bandwidth that implies.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.families.chattts.exporter import ChatTTSGPT, load_weights
from pipeline.modelset import ModelSet
from pipeline.procinfo import machine_line, peak_rss_mb
from pipeline.families.chattts.runtime import ChatTTSRuntime

REPO = Path(__file__).resolve().parent.parent


def memory_bandwidth_gbs(mb: int = 512, repeat: int = 5) -> float:
    """Read bandwidth of one core: sum over a buffer far larger than any cache (best of `repeat`)."""
    buf = np.ones(mb * 2**20 // 8, dtype=np.float64)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best / 1e9


def torch_decoder(model: ChatTTSGPT, prompt: np.ndarray):
    """PyTorch eager: prefill `prompt` (untimed); the returned step feeds one token and grows the cache."""
    cache = model.empty_cache(1)

    @torch.no_grad()
    def step(ids: np.ndarray):
        nonlocal cache
        hidden, cache = model.step(model.embed_text(torch.from_numpy(ids)), cache)
        return model.lm_head_text(hidden[:, -1:])

    step(prompt)
    return step


def plain_decoder(rt: ChatTTSRuntime, prompt: np.ndarray):
    """ORT as before io_binding: `session.run` on numpy arrays, every layer returning a newly allocated cache."""
    heads = rt.config["num_attention_heads"]
    empty = np.zeros((1, heads, 0, rt.config["hidden_size"] // heads), np.float32)
    cache = [(empty, empty) for _ in rt.layers]

    def step(ids: np.ndarray):
        nonlocal cache
        s = rt.sessions
        hidden = s["embed_text"].run(None, {"input_ids": ids})[0]
        new = []
        for name, (k, v) in zip(rt.layers, cache):
            hidden, k, v = s[name].run(None, {"hidden": hidden, "past_key": k, "past_value": v})
            new.append((k, v))
        cache = new
        return s["lm_head_text"].run(None, {"hidden": s["norm"].run(None, {"hidden": hidden[:, -1:]})[0]})[0]

    step(prompt)
    return step


def iobinding_decoder(rt: ChatTTSRuntime, prompt: np.ndarray, steps: int):
    """The runtime's own chain: io_binding, KV buffers allocated once for prompt + `steps` positions."""
    dec = rt.decoder(prompt.shape[1], steps)
    dec.forward("embed_text", prompt)
    return lambda ids: dec.forward("embed_text", ids)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench")
    ap.add_argument("--cache", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "chattts_int8.yaml")
    args = ap.parse_args()
    torch.set_num_threads(2)
    run = args.out / args.recipe.stem
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(args.recipe), "--out", str(run)],
                         capture_output=True, text=True)
    if res.returncode:
        lines = res.stderr.strip().splitlines() or ["no message"]
        sys.exit(f"{args.recipe}: recipe run failed: {lines[-1]}")
    fp32_dir, int8_dir = run / "steps" / "00-base", run / "final"
    w = load_weights(None)
    torch_model = ChatTTSGPT(w)
    c = w.config
    rts = {"ort_fp32": ChatTTSRuntime(fp32_dir), "ort_int8": ChatTTSRuntime(int8_dir)}
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, c.num_text_tokens, (1, args.cache))
    prompt64 = rng.integers(0, c.num_text_tokens, (1, 64))
    token = np.array([[7]], np.int64)
    steps = args.steps + 1  # the warm-up step too
    # name -> (decode step after a prefill of `prompt`, a fresh prefill of 64 tokens)
    variants = {"torch_eager_fp32": (torch_decoder(torch_model, prompt), lambda: torch_decoder(torch_model, prompt64))}
    for k, rt in rts.items():
        variants[f"{k}_run"] = (plain_decoder(rt, prompt), lambda rt=rt: plain_decoder(rt, prompt64))
        variants[k] = (iobinding_decoder(rt, prompt, steps), lambda rt=rt: iobinding_decoder(rt, prompt64, 1))
    decode = {k: [] for k in variants}
    prefill = {k: [] for k in variants}
    for step, _ in variants.values():  # warm-up
        step(token)
    for _ in range(args.steps):
        for name, (step, _) in variants.items():
            t0 = time.perf_counter()
            step(token)
            decode[name].append(time.perf_counter() - t0)
    for _ in range(max(3, args.steps // 5)):
        for name, (_, start) in variants.items():
            t0 = time.perf_counter()
            start()
            prefill[name].append(time.perf_counter() - t0)
    base = statistics.median(decode["torch_eager_fp32"])
    layer_bytes = {k: sum(ModelSet.read(d).path(n).stat().st_size for n in ModelSet.read(d).names()
                          if n.startswith("layer_")) for k, d in (("fp32", fp32_dir), ("int8", int8_dir))}
    print(f"{machine_line()}; torch and ORT 2 threads")
    print(f"ChatTTS GPT full size, seeded random weights (untrained); decode step (embedding + 20 layers + norm + "
          f"text head) with {args.cache}..{args.cache + args.steps} cached tokens, median of {args.steps}; "
          f"prefill 64 tokens")
    for name in variants:
        d, p = statistics.median(decode[name]), statistics.median(prefill[name])
        print(f"  {name:18s} decode {d * 1e3:7.1f} ms  ({base / d:4.2f}x torch eager)   prefill64 {p * 1e3:7.1f} ms")
    for k in rts:
        gain = statistics.median(decode[f"{k}_run"]) / statistics.median(decode[k])
        print(f"  {k}: io_binding decode {gain:4.2f}x as fast as session.run with new caches each step")
    head_bytes = 4 * c.num_text_tokens * c.hidden_size  # the FP32 text head, read every step
    bw = memory_bandwidth_gbs()
    print(f"  measured read bandwidth (numpy sum over 512 MB, one core): {bw:.1f} GB/s")
    for k, key in (("ort_fp32", "fp32"), ("ort_int8", "int8")):
        read = layer_bytes[key] + head_bytes
        d = statistics.median(decode[k])
        print(f"  {k}: weights read per decode step ~{read / 1e6:.0f} MB -> {read / d / 1e9:.1f} GB/s effective "
              f"({read / d / 1e9 / bw:.1f}x one core's measured read bandwidth)")
    print(f"  INT8 layer files: {layer_bytes['int8'] / 1e6:.0f} MB vs FP32 {layer_bytes['fp32'] / 1e6:.0f} MB "
          f"= {layer_bytes['int8'] / layer_bytes['fp32']:.3f}x")
    print(f"  peak RSS of this process: {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
