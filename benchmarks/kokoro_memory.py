"""Peak RSS of the Kokoro-82M recipes against the bound "4x the model's file size plus 1 GB".

    python benchmarks/kokoro_memory.py [--out runs/kokoro_memory] [--only kokoro_fp16 ...]

For each shipped Kokoro recipe without a search (recipes/kokoro_*.yaml), one at a time, each in its own process:
1. `pipeline run RECIPE`: the whole run, every pass and the check; its peak RSS is the most any of them reached.
2. `pipeline compare REFERENCE FINAL --recipe RECIPE`: the check alone (the recipe's reference step, its 8 held-out
   sentences, durations pinned), so a check's peak is not hidden under a pass's.
The bound is taken on the largest model file the run holds (the float model a `dequantize` step makes, 325 MB),
not on the 92 MB INT8 export it starts from: every later step and the check handle the float model.
Peaks are the child's own (`wait4`'s ru_maxrss: this script's own peak is far below them). Prints the machine,
a table, and PASS/FAIL per row; writes OUT/memory.json. Run nothing else meanwhile: a second process's pages do
not count here, but its CPU use stretches the runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline.core.procinfo import machine_line

REPO = Path(__file__).resolve().parent.parent
RECIPES = ["kokoro_float", "kokoro_fp16", "kokoro_int8_weights", "kokoro_int8_dynamic", "kokoro_int8_static"]
MB = 2**20


def measured(argv: list[str], log: Path) -> tuple[int, float, int]:
    """Run a command in its own process: (exit code, wall seconds, peak RSS bytes)."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - t0, usage.ru_maxrss * 1024


def largest_model(run: Path) -> Path:
    return max(run.glob("steps/*/*.onnx"), key=lambda p: p.stat().st_size)


def check_reference(run: Path) -> Path:
    """The graph the run's check measured against: its report names it (`01-dequantize/x.onnx` or the file)."""
    label = json.loads((run / "report.json").read_text())["reference"]
    if "/" in label:
        step, name = label.split("/", 1)
        return run / "steps" / step / name
    return next(run.glob(f"steps/00-base/{label}"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "kokoro_memory")
    ap.add_argument("--only", nargs="*", choices=RECIPES, help="Measure these recipes only.")
    args = ap.parse_args()
    print(machine_line(), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    pipeline = [sys.executable, "-m", "pipeline.cli"]
    rows = []
    for name in args.only or RECIPES:
        run = args.out / name
        shutil.rmtree(run, ignore_errors=True)  # a fresh run: no step may come from an earlier one
        recipe = str(REPO / "recipes" / f"{name}.yaml")
        code, run_s, run_peak = measured([*pipeline, "run", recipe, "--out", str(run)], args.out / f"{name}-run.log")
        if code != 0:
            print(f"{name}: run failed (exit {code}); see {args.out / f'{name}-run.log'}", flush=True)
            rows.append({"recipe": name, "ok": False})
            continue
        model = largest_model(run)
        bound = 4 * model.stat().st_size + 1024 * MB
        code, check_s, check_peak = measured(
            [*pipeline, "compare", str(check_reference(run)), str(run / "final"), "--recipe", recipe, "-q"],
            args.out / f"{name}-check.log")
        ok = code == 0 and max(run_peak, check_peak) <= bound
        rows.append({"recipe": name, "ok": ok, "model_mb": model.stat().st_size / MB, "bound_mb": bound / MB,
                     "run_peak_mb": run_peak / MB, "run_s": run_s, "check_peak_mb": check_peak / MB,
                     "check_s": check_s, "check_exit": code})
        print(f"{name:22s} model {model.stat().st_size / MB:6.1f} MB  bound {bound / MB:6.0f} MB  "
              f"run peak {run_peak / MB:6.0f} MB ({run_s:5.0f} s)  check alone {check_peak / MB:6.0f} MB "
              f"({check_s:4.0f} s)  {'PASS' if ok else 'FAIL'}", flush=True)
    (args.out / "memory.json").write_text(json.dumps({"machine": machine_line(), "rows": rows}, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
