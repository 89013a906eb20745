"""Where a ChatTTS decode step's time goes: per graph, per op type, and outside ONNX Runtime.

    python benchmarks/profile_chattts.py RUN/final [--cache 128] [--steps 32] [--threads 2]

Runs the model set's decode loop as `pipeline generate` does (text mode:
embedding, the layers and norm joined into one session when they keep their
cache in place, text head; io_binding; one shared thread pool) after a
prefill of `--cache` random tokens, and prints:
- per graph kind, the median time inside `run_with_iobinding` and its share
  of the step; the rest of the step is Python and binding;
- per op type, ONNX Runtime's own profile of the same steps (every session
  profiled), summed over layers: what the kernels cost, and what is left of a
  session run beyond its kernels (ORT's per-run overhead).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from pipeline.families.chattts import runtime as chattts_runtime
from pipeline.families.chattts.runtime import ChatTTSRuntime
from pipeline.core.onnx_io import share_one_thread_pool
from pipeline.core.procinfo import machine_line


def kind(graph: str) -> str:
    return "layers" if graph.startswith("layer_") else "layers + norm" if graph == "stack" else graph


def timed_runs(dec) -> dict[str, list[float]]:
    """Wrap every graph's run so each call's time is kept, by graph kind, for the current step."""
    spent: dict[str, list[float]] = defaultdict(list)
    for name, run in list(dec.runs.items()):
        def wrapped(binding, run=run, k=kind(name)):
            t0 = time.perf_counter()
            run(binding)
            spent[k].append(time.perf_counter() - t0)
        dec.runs[name] = wrapped
    return spent


def profiled_session(path, threads=2, **_):
    """The runtime's sessions (on the process's shared pool, as `pipeline generate` runs them), profiled."""
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = opts.enable_mem_pattern = False
    opts.use_per_session_threads = False
    opts.log_severity_level = 3
    opts.enable_profiling = True
    joined = isinstance(path, onnx.ModelProto)  # the runtime's stack of layers (ChatTTSRuntime.stack)
    opts.profile_file_prefix = str(PROFILE_DIR / ("stack" if joined else Path(path).stem))
    source = path.SerializeToString() if joined else str(path)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


PROFILE_DIR = Path("runs") / "profile"


def op_totals(files: list[Path], steps: int) -> tuple[dict[str, float], float]:
    """Per op type, kernel microseconds per step (decode events only: one token), and per-run total."""
    ops: dict[str, float] = defaultdict(float)
    runs = 0.0
    for f in files:
        events = json.loads(f.read_text())
        decode_runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-steps:]
        if not decode_runs:
            continue
        start = decode_runs[0]["ts"]
        runs += sum(e["dur"] for e in decode_runs)
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
                ops[e["args"]["op_name"]] += e["dur"]
    return {k: v / steps for k, v in ops.items()}, runs / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--cache", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 21178, (1, args.cache))
    token = np.array([[7]], np.int64)

    share_one_thread_pool(args.threads)  # as `pipeline generate` runs
    rt = ChatTTSRuntime(args.folder, threads=args.threads)
    dec = rt.decoder(args.cache, args.steps + 2)
    dec.forward("embed_text", prompt)
    dec.forward("embed_text", token)  # warm-up
    spent = timed_runs(dec)
    steps = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        dec.forward("embed_text", token)
        steps.append(time.perf_counter() - t0)
    step = statistics.mean(steps)  # the mean, as the per-graph shares below are sums
    print(machine_line())
    print(f"{args.folder}: decode step mean {step * 1e3:.2f} ms (median {statistics.median(steps) * 1e3:.2f}) over {args.steps} steps at "
          f"{args.cache}..{args.cache + args.steps} cached tokens, {args.threads} threads, "
          f"{len(rt.layers)} layers{' (in-place KV)' if rt.in_place else ''}")
    inside = 0.0
    for k, times in spent.items():
        per_step = sum(times) / args.steps
        inside += per_step
        print(f"  {k:14s} {per_step * 1e3:7.2f} ms  {per_step / step:5.1%}  ({len(times) // args.steps} run(s) a step)")
    print(f"  {'outside ORT':14s} {(step - inside) * 1e3:7.2f} ms  {(step - inside) / step:5.1%}  "
          f"(Python, binding, the step's lengths)")

    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    for old in PROFILE_DIR.glob("*.json"):
        old.unlink()
    chattts_runtime.session = profiled_session
    rt = ChatTTSRuntime(args.folder, threads=args.threads)
    dec = rt.decoder(args.cache, args.steps + 2)
    dec.forward("embed_text", prompt)
    for _ in range(args.steps):
        dec.forward("embed_text", token)
    sessions = [*rt.sessions.values(), *([rt.stack()] if rt.in_place else [])]
    files = [Path(s.end_profiling()) for s in sessions]
    ops, runs = op_totals(files, args.steps)
    kernels = sum(ops.values())
    print(f"ONNX Runtime's profiler (its own timing, profiling on): session runs {runs / 1e3:.2f} ms a step, "
          f"kernels {kernels / 1e3:.2f} ms, per-run overhead {(runs - kernels) / 1e3:.2f} ms")
    for op, us in sorted(ops.items(), key=lambda kv: -kv[1]):
        print(f"  {op:34s} {us / 1e3:7.2f} ms  {us / kernels:5.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
