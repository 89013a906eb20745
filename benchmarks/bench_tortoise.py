"""Tortoise GPT2 decode step and prefill: PyTorch eager against our ONNX models in FP32 and INT8, side by side.

    python benchmarks/bench_tortoise.py [--out runs/bench] [--rounds 3] [--steps 32] [--cache 128]
        [--prefill 64] [--threads 2] [--fp32 recipes/tortoise_fp32.yaml] [--int8 recipes/tortoise_int8.yaml]
        [--json PATH]

Full size, seeded random weights (the released UnifiedVoice: 30 layers, 1024 dims, 16 heads, mel vocab 8194).
Variants:
- eager_fp32: transformers' GPT2Model (Tortoise's own GPT2, wpe zeroed) with the same weights and its KV
  cache, Tortoise's mel embedding, positions, final_norm and mel head around it, in PyTorch;
- ours_fp32: `pipeline run recipes/tortoise_fp32.yaml` (the export, its decode cache kept in place), through
  TortoiseRuntime's io_binding loop, as `pipeline generate` runs it;
- ours_int8: `recipes/tortoise_int8.yaml`'s result, the same way.
The recipes run into OUT/<recipe> (cached by the runner); the files on disk are also given for the export
itself (its base step).
Each variant is timed in a fresh process of its own, the variants in turn for --rounds rounds: a prefill
of --prefill positions (`[cond | start_text, text, stop_text | start_mel]`, timed 3 times, the median),
then a prompt of --cache positions, 1 warm-up step and --steps timed decode steps of one code each (the
greedy pick included). Reported: the median over rounds of each worker's median, the spread of the round
medians, the ratio to eager, the weight bytes a decode step reads (from the files; the embedding tables
count one row) as GB/s against the measured read bandwidth, peak RSS, and the files on disk. Then the
issue's targets, PASS/FAIL from this run alone. Progress goes to stderr, the report to stdout.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
ORDER = ("eager_fp32", "ours_fp32", "ours_int8")
WORKER_TIMEOUT_S = 1800
TABLES = ("mel_embedding.weight", "mel_pos_embedding.emb.weight", "text_embedding.weight",
          "text_pos_embedding.emb.weight")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- workers (each in a fresh process) ------------------------------------------------------------------

def prompt(positions: int) -> list[int]:
    """Text ids giving a prefill of `positions`: cond + start_text + text + stop_text + start_mel."""
    import numpy as np

    return np.random.default_rng(positions).integers(2, 255, positions - 4).tolist()


def eager_worker(threads: int, cache: int, steps: int, prefill: int) -> dict:
    import numpy as np
    import torch
    from transformers import DynamicCache, GPT2Config, GPT2Model

    from pipeline.families.tortoise.model import TortoiseConfig, UnifiedVoiceGPT
    from pipeline.families.tortoise.weights import seeded_weights

    torch.set_num_threads(threads)
    c = TortoiseConfig()
    w = seeded_weights(c, 0)
    ours = UnifiedVoiceGPT(c)
    ours.load_state_dict(w.state)
    gpt = GPT2Model(GPT2Config(vocab_size=1, n_positions=c.mel_positions + c.text_positions, n_embd=c.model_dim,
                               n_layer=c.layers, n_head=c.heads, activation_function="gelu_new")).eval()
    gpt.load_state_dict({k[4:]: v for k, v in w.state.items() if k.startswith("gpt.")}, strict=False)
    del ours.gpt, w
    with torch.no_grad():
        gpt.wpe.weight.zero_()
    latent = torch.from_numpy(np.random.default_rng(0).standard_normal((1, c.model_dim)).astype(np.float32))

    @torch.no_grad()
    def run_prefill(text: list[int]):
        x = torch.cat([ours.prompt(torch.tensor([text]), latent), ours.mel_inputs(torch.tensor([[c.start_mel_token]]), 0)], 1)
        out = gpt(inputs_embeds=x, past_key_values=DynamicCache(), use_cache=True)
        return ours.head(out.last_hidden_state[:, -1:])[0], out.past_key_values

    @torch.no_grad()
    def step(code: int, position: int, past):
        out = gpt(inputs_embeds=ours.mel_inputs(torch.tensor([[code]]), position), past_key_values=past,
                  use_cache=True)
        return int(ours.head(out.last_hidden_state)[0][0, -1].argmax()), out.past_key_values

    return _time(lambda text: run_prefill(text), lambda logits: int(logits[0, -1].argmax()), step, cache, steps,
                 prefill)


def ours_worker(folder: Path, threads: int, cache: int, steps: int, prefill: int) -> dict:
    import numpy as np

    from pipeline.families.tortoise.runtime import TortoiseRuntime, _Loop, prefill_positions
    from pipeline.core.onnx_io import share_one_thread_pool

    share_one_thread_pool(threads)  # as pipeline generate runs
    rt = TortoiseRuntime(folder, threads)
    latent = np.random.default_rng(0).standard_normal((1, rt.dim)).astype(np.float32)
    loops: dict[str, _Loop] = {}

    def run_prefill(text: list[int]):
        loops["current"] = _Loop(rt, prefill_positions(len(text)) + steps + 2)
        return loops["current"].prefill(text, latent), None

    def step(code: int, position: int, past):
        return int(np.argmax(loops["current"].decode(code, position))), None

    return _time(run_prefill, lambda logits: int(np.argmax(logits)), step, cache, steps, prefill)


def _time(run_prefill, pick, step, cache: int, steps: int, prefill: int) -> dict:
    from pipeline.core.procinfo import peak_rss_mb

    prefill_s = []
    for _ in range(4):
        t0 = time.perf_counter()
        run_prefill(prompt(prefill))
        prefill_s.append(time.perf_counter() - t0)
    logits, past = run_prefill(prompt(cache))
    code = pick(logits)
    code, past = step(code, 2, past)  # warm-up
    times = []
    for k in range(2, steps + 2):
        t0 = time.perf_counter()
        code, past = step(code, k + 1, past)
        times.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(times) * 1e3, "prefill_ms": statistics.median(prefill_s[1:]) * 1e3,
            "peak_rss_mb": peak_rss_mb()}


def worker(args: argparse.Namespace) -> dict:
    if args.worker == "bandwidth":
        import chattts_peers

        return {"gbs": chattts_peers.bandwidth_gbs(args.threads)}
    if args.variant == "eager_fp32":
        return eager_worker(args.threads, args.cache, args.steps, args.prefill)
    return ours_worker(args.path, args.threads, args.cache, args.steps, args.prefill)


def spawn(args: argparse.Namespace, kind: str, variant: str = "", path: Path | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--variant", variant,
           "--threads", str(args.threads), "--cache", str(args.cache), "--steps", str(args.steps),
           "--prefill", str(args.prefill)] + (["--path", str(path)] if path else [])
    from worker_process import run_worker

    return run_worker(cmd, REPO, WORKER_TIMEOUT_S)


# --- the comparison -------------------------------------------------------------------------------------

def run_recipe(recipe: str, out: Path) -> Path:
    log(f"pipeline run {recipe} --out {out}")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", recipe, "--out", str(out)],
                         capture_output=True, text=True, cwd=REPO)
    if res.returncode:
        raise SystemExit(f"{recipe} failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    return out


def prepare(args: argparse.Namespace) -> dict[str, Path | None]:
    """Run (or reuse) the recipes; the FP32 one's base step is the export as written."""
    fp32 = run_recipe(args.fp32, args.out / Path(args.fp32).stem)
    int8 = run_recipe(args.int8, args.out / Path(args.int8).stem)
    return {"eager_fp32": None, "ours_fp32": fp32 / "final", "ours_int8": int8 / "final",
            "export": fp32 / "steps" / "00-base"}


def step_bytes(folder: Path) -> int:
    """Weight bytes one decode step reads: every initializer of the decode graph but the embedding tables,
    of which it reads one row."""
    import onnx

    from pipeline.core.onnx_io import load_onnx

    model = load_onnx(folder / "decode.onnx")
    total = 0
    for t in model.graph.initializer:
        n = len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
        total += n // t.dims[0] if any(t.name.startswith(p) for p in TABLES) else n
    return total


def file_sizes(folder: Path) -> dict[str, int]:
    from pipeline.core.modelset import ModelSet

    ms = ModelSet.read(folder)
    return {f.name: f.stat().st_size for f in ms.files() if not f.name.startswith(("conditioning", "sample_head"))}


def fp32_weight_bytes() -> int:
    """The FP32 weights prefill and decode need: all but the conditioning encoder and the text head."""
    from pipeline.families.tortoise.model import TortoiseConfig
    from pipeline.families.tortoise.weights import expected_keys

    import math

    return 4 * sum(math.prod(s) for k, s in expected_keys(TortoiseConfig()).items()
                   if not k.startswith(("conditioning_encoder", "text_head")))


def report(args, results: dict[str, list[dict]], paths, bw: dict[int, float], load: list[float]) -> dict:
    from pipeline.core.procinfo import machine_line

    lines = [f"{machine_line()} (figures from different CPUs are not comparable)",
             f"load average (1 min) at start {load[0]:.2f}, at the end {load[1]:.2f}",
             f"Tortoise GPT2 full size (released config), seeded random weights (untrained); decode step: one code "
             f"through mel embedding + position, 30 layers, ln_f, final_norm, mel head, greedy pick; "
             f"{args.cache}..{args.cache + args.steps} cached positions; prefill of {args.prefill} positions; "
             f"{args.threads} threads; each variant in a fresh process, {args.rounds} rounds in turn",
             "memory read bandwidth (torch sum over 1 GiB, best of 5): "
             + ", ".join(f"{n} thread{'s' * (n > 1)} {g:.1f} GB/s" for n, g in bw.items())]
    med = {v: statistics.median(r["median_ms"] for r in rs) for v, rs in results.items() if rs}
    pre = {v: statistics.median(r["prefill_ms"] for r in rs) for v, rs in results.items() if rs}
    reads = {v: step_bytes(paths[v]) for v in ("ours_fp32", "ours_int8")}
    reads["eager_fp32"] = reads.get("ours_fp32")
    lines += ["", "| variant | decode step | round medians | vs eager | GB/s | prefill | vs eager | peak RSS |",
              "|---|---|---|---|---|---|---|---|"]
    for v in ORDER:
        rs = results.get(v) or []
        if not rs:
            lines.append(f"| {v} | skipped | | | | | | |")
            continue
        gbs = reads[v] / (med[v] / 1e3) / 1e9 if reads.get(v) else None
        lines.append(f"| {v} | {med[v]:.1f} ms | {min(r['median_ms'] for r in rs):.1f}-"
                     f"{max(r['median_ms'] for r in rs):.1f} | {med['eager_fp32'] / med[v]:.2f}x | "
                     f"{gbs:.1f} | {pre[v]:.0f} ms | {pre['eager_fp32'] / pre[v]:.2f}x | "
                     f"{max(r['peak_rss_mb'] for r in rs):.0f} MB |")
    sizes = {v: file_sizes(p) for v, p in paths.items() if p is not None}
    fp32 = fp32_weight_bytes()
    lines += ["", f"FP32 weights of prefill + decode: {fp32 / 1e6:.0f} MB"]
    for v, s in sizes.items():
        lines.append(f"{v} files: " + ", ".join(f"{n} {b / 1e6:.1f} MB" for n, b in s.items())
                     + f"; total {sum(s.values()) / 1e6:.0f} MB = {sum(s.values()) / fp32:.3f}x")
    floor = bw.get(args.threads)
    targets = {
        "INT8 decode >= 3x eager": med["eager_fp32"] / med["ours_int8"] >= 3,
        "FP32 decode >= 1.25x eager": med["eager_fp32"] / med["ours_fp32"] >= 1.25,
        f"FP32 decode reads >= 80% of the {args.threads}-thread bandwidth":
            reads["ours_fp32"] / (med["ours_fp32"] / 1e3) / 1e9 >= 0.8 * floor,
        "prefill + decode files <= 1.1x the FP32 weights": sum(sizes["export"].values()) <= 1.1 * fp32,
    }
    lines += ["", "targets:"] + [f"  {'PASS' if ok else 'FAIL'}  {t}" for t, ok in targets.items()]
    print("\n".join(lines))
    return {"lines": lines, "results": results, "targets": targets}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench")
    p.add_argument("--fp32", default=str(REPO / "recipes" / "tortoise_fp32.yaml"))
    p.add_argument("--int8", default=str(REPO / "recipes" / "tortoise_int8.yaml"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--cache", type=int, default=128)
    p.add_argument("--prefill", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)
    p.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> int:
    import os

    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    load = [os.getloadavg()[0]]
    paths = prepare(args)
    bw = {n: spawn(args, "bandwidth")["gbs"] if n == args.threads else None for n in (args.threads,)}
    results: dict[str, list[dict]] = {v: [] for v in ORDER}
    for r in range(args.rounds):
        for v in ORDER:
            res = spawn(args, "time", v, paths[v])
            if "error" in res:
                log(f"round {r + 1} {v}: {res['error']}")
                continue
            log(f"round {r + 1} {v}: step {res['median_ms']:.1f} ms, prefill {res['prefill_ms']:.0f} ms")
            results[v].append(res)
    load.append(os.getloadavg()[0])
    out = report(args, results, paths, bw, load)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str) + "\n")
    return 0 if all(out["targets"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
