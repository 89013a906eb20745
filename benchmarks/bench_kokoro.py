"""Kokoro-82M: every variant side by side in one run, each in its own process, in turn.

    python benchmarks/bench_kokoro.py [--out runs/bench_kokoro] [--sentences 8] [--repeat 3] [--rounds 2] [--json FILE]
                                     [--recipes kokoro_fp16 kokoro_int8 kokoro_tune]

Variants, all measured against FP32 (kokoro-onnx's INT8 export turned back into float by `dequantize`):
- fp32; the shipped INT8 as it is (kokoro-onnx's `kokoro-v1.0.int8.onnx`, from the four part wheels);
- `ort quantize_dynamic`: ONNX Runtime's `quantize_dynamic(fp32, out)` with its defaults, what users try first;
- ours: the shipped recipes kokoro_fp16, kokoro_int8 and kokoro_tune, run through the CLI into OUT (a run folder
  that exists is reused: its steps are cached).

Each variant is loaded in a fresh process, warmed up on the first sentence and timed over the held-out sentences
(the first N of calibration/data/eval_en.txt, which no recipe calibrates or searches on), `--repeat` passes, 2
threads; the process reports its passes, its audio and its peak RSS, and the next variant starts. `--rounds` goes
over all variants that many times, every other round in reverse order, so that a slower stretch of the machine
lands on all of them; latency is the median of all of a variant's passes. Quality is each variant's audio against FP32's on the same sentences: log-mel distance (mean, max),
MCD, the sentences whose length changed, and WER (Moonshine, the `asr` extra) and its increase over FP32's.
Ratios are only comparable within one run: the machine line says where it ran.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.core.audio import compare_audio
from pipeline.core.feeds import Feeds
from pipeline.core.procinfo import machine_line
from pipeline.engine.comparison import model_file

REPO = Path(__file__).resolve().parent.parent
RECIPES = ("kokoro_fp16", "kokoro_int8", "kokoro_tune")
THREADS = 2
# The targets, each (variant, key, bound, how it reads)
TARGETS = [
    ("kokoro_int8", "lengths_changed", 0, "every sentence keeps its length"),
    ("kokoro_int8", "log_mel_max", 0.10, "log-mel max <= 0.10"),
    ("kokoro_int8", "wer_increase", 1.0, "WER increase <= 1 point"),
    ("kokoro_int8", "size_ratio", 0.30, "size <= 0.30x"),
    ("kokoro_int8", "latency_ratio", 0.75, "latency <= 0.75x FP32"),
    ("kokoro_fp16", "size_ratio", 0.55, "size <= 0.55x"),
    ("kokoro_fp16", "log_mel_max", 0.02, "log-mel max <= 0.02"),
    ("kokoro_fp16", "lengths_changed", 0, "every sentence keeps its length"),
]


@dataclass
class Measured:
    label: str
    path: Path
    passes: list[float]
    audio: list[np.ndarray]
    peak_rss_mb: float


def _measure_child(path: str, feeds: list[Feeds], repeat: int) -> tuple[list[float], list[np.ndarray], float]:
    from pipeline.core.onnx_io import session
    from pipeline.core.procinfo import peak_rss_mb

    sess = session(Path(path), threads=THREADS)
    audio = [sess.run(None, f)[0].reshape(-1) for f in feeds]  # also the warm-up
    passes = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for f in feeds:
            sess.run(None, f)
        passes.append(time.perf_counter() - t0)
    return passes, audio, peak_rss_mb()


def measure(label: str, path: Path, feeds: list[Feeds], repeat: int) -> Measured:
    """One variant in a process of its own: nothing of the others is in its memory or its caches."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        passes, audio, rss = pool.submit(_measure_child, str(path), feeds, repeat).result()
    return Measured(label, path, passes, audio, rss)


def run_recipe(name: str, out: Path, console: Console) -> Path:
    if not (out / "final" / "modelset.json").is_file():
        console.print(f"running recipe {name} into {out} ...")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline.cli", "run", name, "--out", str(out), "--quiet"], check=True)
        console.print(f"  {name}: {time.perf_counter() - t0:.0f} s")
    return model_file(out / "final")


def ort_dynamic(fp32: Path, out: Path) -> Path:
    from onnxruntime.quantization import quantize_dynamic

    path = out / "kokoro-ort-dynamic.onnx"
    if not path.is_file():
        quantize_dynamic(str(fp32), str(path))
    return path


def variants(out: Path, recipes: list[str], console: Console) -> list[tuple[str, Path]]:
    from calibration.kokoro_inputs import kokoro_model

    out.mkdir(parents=True, exist_ok=True)
    ours = {name: run_recipe(name, out / name, console) for name in ["kokoro_int8", *recipes]}
    # kokoro_int8's step 01 is the dequantized float model every recipe starts from
    fp32 = model_file(out / "kokoro_int8" / "steps" / "01-dequantize")
    return [("fp32", fp32), ("shipped int8", kokoro_model(out)), ("ort quantize_dynamic", ort_dynamic(fp32, out)),
            *((name, path) for name, path in ours.items())]


def quality(reference: Measured, candidate: Measured, texts: list[str], asr: bool) -> dict:
    cmps = [compare_audio(r, c, sr=24000) for r, c in zip(reference.audio, candidate.audio)]
    row = {"log_mel_mean": float(np.mean([c.log_mel_distance for c in cmps])),
           "log_mel_max": float(max(c.log_mel_distance for c in cmps)),
           "mcd_db": float(np.mean([c.mcd_db for c in cmps if c.mcd_db is not None])),
           "lengths_changed": sum(c.length_diff != 0 for c in cmps),
           "changed_sentences": [i for i, c in enumerate(cmps) if c.length_diff != 0]}
    if asr:
        from pipeline.evaluation.asr import measure_asr

        a = measure_asr(list(zip(reference.audio, candidate.audio)), texts, 24000)
        row |= {"wer": a.wer_candidate, "wer_reference": a.wer_reference, "wer_increase": a.wer_increase}
    return row


def table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    cols = [("variant", "label", None), ("MB", "mb", ".1f"), ("size x", "size_ratio", ".3f"),
            ("latency s", "latency_s", ".2f"), ("latency x", "latency_ratio", ".2f"), ("RTF", "rtf", ".3f"),
            ("peak RSS MB", "peak_rss_mb", ".0f"), ("lengths changed", "lengths_changed", "d"),
            ("log-mel mean", "log_mel_mean", ".3f"), ("log-mel max", "log_mel_max", ".3f"),
            ("MCD dB", "mcd_db", ".2f"), ("WER %", "wer", ".1f"), ("WER +pts", "wer_increase", "+.1f")]
    for name, _, _ in cols:
        t.add_column(name, justify="left" if name == "variant" else "right")
    for r in rows:
        t.add_row(*[str(r[k]) if fmt is None else ("-" if r.get(k) is None else format(r[k], fmt))
                    for _, k, fmt in cols])
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_kokoro", help="folder for the runs")
    ap.add_argument("--sentences", type=int, default=8, help="held-out sentences (first N of eval_en.txt)")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes over the sentences per variant and round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over all variants, every other one in reverse "
                    "order; latency is the median of every round's passes")
    ap.add_argument("--no-asr", action="store_true", help="leave out WER (the asr extra)")
    ap.add_argument("--json", type=Path, help="write one object per variant here")
    ap.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES),
                    help="our variants (kokoro_int8 always: its float step is the reference)")
    args = ap.parse_args()
    console = Console(width=200)
    console.print(machine_line(), markup=False)
    from calibration import SourceContext
    from pipeline.core.onnx_io import load_onnx
    from pipeline.families import draw_samples

    found = variants(args.out, args.recipes, console)
    feeds, source = draw_samples("kokoro", {"sentences": str(REPO / "calibration" / "data" / "eval_en.txt"),
                                            "count": args.sentences}, SourceContext(None), load_onnx(found[0][1]),
                                 "bench inputs")
    texts = source.texts()
    measured = {label: None for label, _ in found}
    for r in range(args.rounds):  # every other round in reverse: a drift of the machine lands on all variants
        for label, path in (found if r % 2 == 0 else found[::-1]):
            console.print(f"round {r + 1}/{args.rounds}: measuring {label} ({path.name}) in its own process ...")
            m = measure(label, path, feeds, args.repeat)
            if measured[label] is None:
                measured[label] = m
            else:
                measured[label].passes += m.passes
                measured[label].peak_rss_mb = max(measured[label].peak_rss_mb, m.peak_rss_mb)
    measured = list(measured.values())
    ref = measured[0]
    ref_latency = statistics.median(ref.passes)
    audio_s = sum(a.size for a in ref.audio) / 24000
    rows = []
    for m in measured:
        latency = statistics.median(m.passes)
        size = m.path.stat().st_size + sum(f.stat().st_size for f in m.path.parent.glob("*.data"))
        rows.append({"label": m.label, "path": str(m.path), "mb": size / 1e6,
                     "size_ratio": size / found[0][1].stat().st_size, "latency_s": latency,
                     "latency_ratio": latency / ref_latency, "rtf": latency / audio_s, "peak_rss_mb": m.peak_rss_mb,
                     **quality(ref, m, texts, not args.no_asr)})
    console.print(table(rows, f"Kokoro-82M, {len(feeds)} held-out sentences ({audio_s:.1f} s of FP32 audio), "
                              f"median of {args.rounds} x {args.repeat} passes, {THREADS} threads, each variant in its own process, "
                              f"in turn"))
    by_label = {r["label"]: r for r in rows}
    for label, key, bound, text in TARGETS:
        if label not in by_label:
            continue
        value = by_label[label].get(key)
        ok = value is not None and value <= bound
        console.print(f"[{'green' if ok else 'red'}]{'PASS' if ok else 'FAIL'}[/] {label}: {text} ({value})")
    shipped = by_label["shipped int8"]["latency_ratio"]
    ok = by_label["kokoro_int8"]["latency_ratio"] < shipped
    console.print(f"[{'green' if ok else 'red'}]{'PASS' if ok else 'FAIL'}[/] kokoro_int8: latency below the shipped "
                  f"INT8's ({by_label['kokoro_int8']['latency_ratio']:.2f}x vs {shipped:.2f}x)")
    if args.json:
        keys = ("size_ratio", "latency_ratio", "log_mel_max", "lengths_changed", "wer_increase")
        args.json.write_text(json.dumps([{"variant": r["label"], **{k: r.get(k) for k in keys},
                                          "details": r} for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
