"""`pipeline tune` against the hand-found recipes, on evaluation inputs the search never saw.

    python benchmarks/bench_tune.py [--out runs/bench_tune] [--only piper|hifigan] [--eval 8] [--repeat 7] [--keep]

For each family (the Piper joe voice, the universal HiFi-GAN):
1. runs its tune recipe (recipes/piper_tune.yaml, hifigan_tune.yaml) from an
   empty folder through the CLI, as a user would, and times it; then runs it
   again into the same folder and times the re-run (every trial cached);
2. runs the hand-found recipe (piper_int8, hifigan_int8) through the CLI;
3. measures FP32, the hand-found model and the tuned one interleaved in one
   process, 2 ONNX Runtime threads (`pipeline.engine.bench.run_bench`): size ratio,
   latency ratio (median of the summed per-sentence time), peak RSS, length
   change and log-mel distance against FP32, on the family's evaluation
   inputs (calibration/data/eval_en.txt: not the tune samples, which come from
   the calibration sentences);
4. prints the machine, the table, one trial's cost (mean screening trial and
   the workers' peak RSS, from tune/trials.jsonl) and PASS/FAIL per target;
   writes OUT/bench.json.

`--keep` reuses an existing tune folder instead of starting from nothing (the
first-run time is then not measured).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.engine.bench import resolve_variant, results_table, run_bench  # noqa: E402
from pipeline.core.progress import Display  # noqa: E402
from pipeline.families import get_family  # noqa: E402
from pipeline.core.modelset import ModelSet  # noqa: E402
from pipeline.core.procinfo import machine_line  # noqa: E402

CASES = {
    "piper": {"tune": "piper_tune", "hand": "piper_int8", "family": "piper",
              "targets": {"size": 0.40, "latency": 1.0, "log_mel": 0.10, "minutes": 20}},
    "hifigan": {"tune": "hifigan_tune", "hand": "hifigan_int8", "family": "hifigan",
                "targets": {"size": 0.40, "latency": 0.70, "log_mel": 0.10, "minutes": 20}},
}
console = Console(highlight=False, width=200)


def cli_run(recipe: str, out: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(REPO / "recipes" / f"{recipe}.yaml"),
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"{recipe} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def trial_cost(run: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run / "tune" / "trials.jsonl").read_text().splitlines()]
    screening = [r for r in rows if r["kind"] == "screening"]
    return {"screening_trials": len(screening), "trial_s_mean": statistics.mean(r["wall_s"] for r in screening),
            "worker_peak_rss_mb": max(r.get("worker_peak_rss_mb", 0) for r in screening)}


def bench_case(name: str, case: dict, out: Path, args) -> dict:
    tuned_dir, hand_dir = out / case["tune"], out / case["hand"]
    first = None
    if not (args.keep and tuned_dir.exists()):
        shutil.rmtree(tuned_dir, ignore_errors=True)
        console.print(f"{name}: running {case['tune']} from nothing ...")
        first = cli_run(case["tune"], tuned_dir)
    console.print(f"{name}: re-running {case['tune']} ...")
    second = cli_run(case["tune"], tuned_dir)
    console.print(f"{name}: running {case['hand']} ...")
    cli_run(case["hand"], hand_dir)
    base = ModelSet.read(tuned_dir / "steps" / "00-base")
    base_path = base.path(base.names()[0])
    family = get_family(case["family"])
    texts, feeds = family.bench_inputs(base_path, args.eval, None)
    variants = [resolve_variant(base_path, "FP32"), resolve_variant(hand_dir / "final", f"{case['hand']} (hand-found)"),
                resolve_variant(tuned_dir / "final", f"{case['tune']} (searched)")]
    console.print(f"{name}: measuring on {len(feeds)} evaluation inputs ...")
    with Display(console, "rich" if console.is_terminal else "plain"):
        result = run_bench(variants, feeds, texts, repeat=args.repeat, audio=family.audio(None))
    console.print(results_table(result))
    hand, tuned = result["variants"][1], result["variants"][2]
    t = case["targets"]
    checks = [
        (f"tuned size <= {t['size']}x", tuned["size_ratio"] <= t["size"], f"{tuned['size_ratio']:.3f}x"),
        (f"tuned latency <= {t['latency']}x", tuned["latency_ratio"] <= t["latency"], f"{tuned['latency_ratio']:.2f}x"),
        (f"tuned log-mel max <= {t['log_mel']}", tuned["max_log_mel"] <= t["log_mel"], f"{tuned['max_log_mel']:.4f}"),
        ("tuned lengths unchanged on every input", tuned["max_abs_length_diff"] == 0,
         f"{tuned['max_abs_length_diff']:.2%}"),
    ]
    if first is not None:
        checks += [(f"search <= {t['minutes']} min", first <= t["minutes"] * 60, f"{first / 60:.1f} min"),
                   ("re-run <= 10% of the first", second <= 0.1 * first, f"{second:.1f} s = {second / first:.1%}")]
    quality_ok = tuned["max_log_mel"] <= hand["max_log_mel"] and tuned["max_abs_length_diff"] <= hand["max_abs_length_diff"]
    beats = [w for w, k in (("size", "size_ratio"), ("latency", "latency_ratio")) if tuned[k] <= hand[k]]
    checks.append(("beats or matches the hand-found recipe on size or latency at equal or better quality",
                   quality_ok and bool(beats),
                   f"log-mel {tuned['max_log_mel']:.4f} vs {hand['max_log_mel']:.4f}; at least as good on "
                   f"{', '.join(beats) or 'neither'}"))
    for what, ok, value in checks:
        console.print(f"  {'PASS' if ok else 'FAIL'}  {what}: {value}")
    cost = trial_cost(tuned_dir)
    console.print(f"  one screening trial: {cost['trial_s_mean']:.2f} s on average ({cost['screening_trials']} trials), "
                  f"worker peak RSS {cost['worker_peak_rss_mb']:.0f} MB")
    return {"bench": result, "first_run_s": first, "rerun_s": second, "trial_cost": cost,
            "checks": [{"what": w, "pass": ok, "value": v} for w, ok, v in checks]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_tune")
    parser.add_argument("--only", choices=sorted(CASES), action="append")
    parser.add_argument("--eval", type=int, default=8, help="evaluation inputs (default 8)")
    parser.add_argument("--repeat", type=int, default=7, help="interleaved latency repetitions (default 7)")
    parser.add_argument("--keep", action="store_true", help="reuse existing tune folders")
    args = parser.parse_args()
    console.print(machine_line())
    results = {name: bench_case(name, CASES[name], args.out, args) for name in args.only or sorted(CASES)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    console.print(f"results: {args.out / 'bench.json'}")


if __name__ == "__main__":
    main()
