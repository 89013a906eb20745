"""ChatTTS GPT decode speed at full size (seeded weights, ChatTTS's exact config), in one run.

    python benchmarks/bench_chattts.py [--out runs/bench] [--cache 128] [--steps 20]

Runs recipes/chattts_int8.yaml (cached in OUT/chattts_int8: the exported FP32
ModelSet is its step 00, the INT8 one its final/), then times, interleaved:
- PyTorch eager FP32 (our layer modules, which match transformers' LlamaModel),
- ONNX Runtime FP32 and INT8,
one decode step (one token) with `--cache` tokens already in the KV cache, and
a prefill of 64 tokens. 2 threads everywhere. Prints medians, ratios, weight
bytes read per decode step and the bandwidth that implies.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.exporters.chattts import ChatTTSGPT, load_weights
from pipeline.modelset import ModelSet
from pipeline.procinfo import peak_rss_mb
from pipeline.runtime.chattts import ChatTTSRuntime

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench")
    ap.add_argument("--cache", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    run = args.out / "chattts_int8"
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(REPO / "recipes" / "chattts_int8.yaml"),
                    "--out", str(run)], check=True, capture_output=True)
    fp32_dir, int8_dir = run / "steps" / "00-base", run / "final"
    w = load_weights(None)
    torch_model = ChatTTSGPT(w)
    c = w.config
    rts = {"ort_fp32": ChatTTSRuntime(fp32_dir), "ort_int8": ChatTTSRuntime(int8_dir)}
    rng = np.random.default_rng(0)
    past = [(rng.standard_normal((1, c.num_attention_heads, args.cache, c.head_dim)).astype(np.float32),) * 2
            for _ in range(c.num_hidden_layers)]
    hidden1 = rng.standard_normal((1, 1, c.hidden_size)).astype(np.float32)
    hidden64 = rng.standard_normal((1, 64, c.hidden_size)).astype(np.float32)
    torch_past = [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in past]
    empty = torch_model.empty_cache(1)

    def torch_step(hidden, cache):
        with torch.no_grad():
            h, _ = torch_model.step(torch.from_numpy(hidden), cache)
            torch_model.lm_head_text(h)

    def ort_step(rt):
        return lambda hidden, cache: rt._forward(hidden, cache)

    variants = {"torch_eager_fp32": (torch_step, torch_past, empty),
                **{k: (ort_step(rt), past, rt._empty_cache(1)) for k, rt in rts.items()}}
    decode = {k: [] for k in variants}
    prefill = {k: [] for k in variants}
    for name, (fn, cache, _) in variants.items():  # warm-up
        fn(hidden1, cache)
    for _ in range(args.steps):
        for name, (fn, cache, empty_cache) in variants.items():
            t0 = time.perf_counter()
            fn(hidden1, cache)
            decode[name].append(time.perf_counter() - t0)
    for _ in range(max(3, args.steps // 5)):
        for name, (fn, cache, empty_cache) in variants.items():
            t0 = time.perf_counter()
            fn(hidden64, empty_cache)
            prefill[name].append(time.perf_counter() - t0)
    base = statistics.median(decode["torch_eager_fp32"])
    layer_bytes = {k: sum(ModelSet.read(d).path(n).stat().st_size for n in ModelSet.read(d).names()
                          if n.startswith("layer_")) for k, d in (("fp32", fp32_dir), ("int8", int8_dir))}
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}; torch and ORT 2 threads")
    print(f"ChatTTS GPT full size, seeded random weights (untrained); decode step with {args.cache} cached tokens "
          f"(20 layers + norm + text head), median of {args.steps}; prefill 64 tokens")
    for name in variants:
        d, p = statistics.median(decode[name]), statistics.median(prefill[name])
        print(f"  {name:18s} decode {d * 1e3:7.1f} ms  ({base / d:4.2f}x torch eager)   prefill64 {p * 1e3:7.1f} ms")
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
