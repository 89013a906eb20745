"""Benchmark model variants against a reference, interleaved in one process.

Latency is measured round-robin (every repetition runs every variant on every
sentence in turn), so machine noise hits all variants alike and ratios mean
something on a noisy 2-core box. Peak RSS is measured per variant in a fresh
child process, since a process's high-water mark cannot be un-set.
Quality is measured with the VITS noise at 0, so FP32 and candidate are
compared run for run.
"""
from __future__ import annotations

import multiprocessing
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration import DATA_DIR, Feeds, check_feeds
from calibration.piper_sentences import load_phonemizer, phoneme_ids, piper_feeds, read_sentences

from .audio import compare_audio
from .errors import PipelineError
from .onnx_io import load_onnx, session
from .procinfo import peak_rss_mb as process_peak_rss_mb


@dataclass
class Variant:
    label: str
    path: Path  # the .onnx file

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size


@dataclass
class SentenceQuality:
    text: str
    ref_samples: int
    cand_samples: int
    length_diff: float
    log_mel_distance: float
    snr_db: float | None
    mcd_db: float | None = None
    # Where the length changed: log-mel with the candidate run on the reference's durations (pinned).
    pinned_log_mel_distance: float | None = None


@dataclass
class VariantResult:
    label: str
    path: str
    bytes: int
    size_ratio: float
    latency_s: float  # median over repetitions of the summed per-sentence latency
    latency_ratio: float
    peak_rss_mb: float
    sentences: list[SentenceQuality] = field(default_factory=list)

    @property
    def max_abs_length_diff(self) -> float:
        return max((abs(s.length_diff) for s in self.sentences), default=0.0)

    @property
    def total_length_diff(self) -> float:
        ref = sum(s.ref_samples for s in self.sentences)
        return (sum(s.cand_samples for s in self.sentences) - ref) / max(ref, 1)

    @property
    def mean_log_mel(self) -> float:
        return float(np.mean([s.log_mel_distance for s in self.sentences])) if self.sentences else 0.0

    @property
    def max_log_mel(self) -> float:
        return max((s.log_mel_distance for s in self.sentences), default=0.0)


def resolve_variant(path: Path, label: str | None = None) -> Variant:
    """A .onnx file, or a ModelSet folder (a run's final/) with exactly one graph."""
    from .compare import model_file

    file = model_file(path)
    load_onnx(file)
    default = (path.parent.name if path.name == "final" else path.name) if path.is_dir() else path.stem
    return Variant(label or default, file)


def piper_eval_feeds(reference: Path, count: int, sentences: Path | None = None) -> tuple[list[str], list[Feeds]]:
    config = reference.with_name(reference.name + ".json")
    if not config.is_file():
        raise PipelineError(f"{reference}: no {config.name} next to it; bench needs a Piper voice config")
    texts = read_sentences(sentences or DATA_DIR / "eval_en.txt")[:count]
    if not texts:
        raise PipelineError("bench: no evaluation sentences")
    voice = load_phonemizer(config)
    return texts, [piper_feeds(phoneme_ids(voice, t)) for t in texts]


def _audio(sess, feeds: Feeds) -> np.ndarray:
    return sess.run(None, feeds)[0].reshape(-1)


def _peak_rss_child(path: str, feeds: list[Feeds], threads: int, queue) -> None:
    sess = session(path, threads=threads)
    for f in feeds:
        sess.run(None, f)
    queue.put(process_peak_rss_mb())


def peak_rss_mb(path: Path, feeds: list[Feeds], threads: int) -> float:
    """Peak RSS of a fresh process that loads `path` and runs every feed once."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_child, args=(str(path), feeds, threads, queue))
    proc.start()
    try:
        value = queue.get(timeout=600)
    finally:
        proc.join(timeout=60)
    return float(value)


def run_bench(variants: list[Variant], feeds: list[Feeds], texts: list[str], repeat: int = 5,
              threads: int = 2, measure_rss: bool = True, progress=lambda msg: None) -> dict[str, Any]:
    """Reference is variants[0]. Returns a JSON-ready dict with per-variant results."""
    sessions = []
    for v in variants:
        model = load_onnx(v.path)
        for i, f in enumerate(feeds):
            check_feeds(f, model, f"bench: {v.label}, sentence {i}")
        sessions.append(session(v.path, threads=threads))
    progress("quality (noise at 0)")
    outputs = [[_audio(s, f) for f in feeds] for s in sessions]  # also the warm-up run
    timings: list[list[float]] = [[] for _ in variants]
    for r in range(repeat):
        progress(f"latency, repetition {r + 1}/{repeat}")
        for vi, s in enumerate(sessions):
            t0 = time.perf_counter()
            for f in feeds:
                s.run(None, f)
            timings[vi].append(time.perf_counter() - t0)
    latencies = [statistics.median(t) for t in timings]
    rss = []
    for v in variants:
        progress(f"peak RSS of {v.label}")
        rss.append(peak_rss_mb(v.path, feeds, threads) if measure_rss else float("nan"))
    ref = variants[0]
    results = []
    for vi, v in enumerate(variants):
        sentences = []
        pinned = None
        for text, f, ref_audio, cand_audio in zip(texts, feeds, outputs[0], outputs[vi]):
            cmp = compare_audio(ref_audio, cand_audio)
            quality = SentenceQuality(text, cmp.ref_samples, cmp.cand_samples, cmp.length_diff,
                                      cmp.log_mel_distance, cmp.snr_db, cmp.mcd_db)
            if cmp.length_diff != 0 and (pinned := pinned or _durations_pinned(ref.path, v.path, threads)):
                run = pinned.run(f)
                quality.pinned_log_mel_distance = compare_audio(run.reference[0], run.candidate[0]).log_mel_distance
            sentences.append(quality)
        results.append(VariantResult(v.label, str(v.path), v.bytes, v.bytes / ref.bytes, latencies[vi],
                                     latencies[vi] / latencies[0], rss[vi], sentences))
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": multiprocessing.cpu_count(), "threads": threads},
        "repeat": repeat,
        "sentences": len(feeds),
        "reference": ref.label,
        "variants": [asdict(r) | {"max_abs_length_diff": r.max_abs_length_diff,
                                  "total_length_diff": r.total_length_diff,
                                  "mean_log_mel": r.mean_log_mel, "max_log_mel": r.max_log_mel}
                     for r in results],
    }


# Piper's VITS rounds its predicted durations up here (w_ceil): frames per phoneme.
DURATIONS = "/Ceil_output_0"


def _durations_pinned(reference: Path, candidate: Path, threads: int):
    """Reference and candidate with the candidate's durations pinned to the reference's, or None when the
    graphs have no Piper duration tensor (a changed length then stays unexplained)."""
    from .pinning import PinnedPair, intermediate_names

    if DURATIONS not in intermediate_names(load_onnx(candidate)):
        return None
    return PinnedPair(reference, candidate, [DURATIONS], threads=threads)


BENCH_NOTE = ("log-mel distance is over the common length where lengths differ; 'pinned max' is the worst "
              "log-mel of those sentences with the candidate run on the reference's durations; "
              "min SNR is shown only when every sentence kept its length.")


def results_table(result: dict[str, Any]):
    """The bench results as a rich table, one row per variant."""
    from rich.table import Table

    m = result["machine"]
    table = Table(title=f"{result['sentences']} sentences, {result['repeat']} interleaved repetitions, "
                        f"{m['threads']} threads, {m['cpus']} CPUs ({m['processor']})")
    cols = ("variant", "MB", "size x", "latency ms", "latency x", "peak RSS MB", "max |len| %",
            "total len %", "log-mel mean", "log-mel max", "pinned max", "MCD dB", "min SNR dB")
    for col in cols:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for v in result["variants"]:
        snrs = [s["snr_db"] for s in v["sentences"] if s["snr_db"] is not None]
        min_snr = "-" if len(snrs) < len(v["sentences"]) else f"{min(snrs):.1f}"
        pinned = [s["pinned_log_mel_distance"] for s in v["sentences"] if s["pinned_log_mel_distance"] is not None]
        table.add_row(v["label"], f"{v['bytes'] / 1e6:.1f}", f"{v['size_ratio']:.3f}",
                      f"{v['latency_s'] * 1e3:.0f}", f"{v['latency_ratio']:.2f}", f"{v['peak_rss_mb']:.0f}",
                      f"{v['max_abs_length_diff'] * 100:.2f}", f"{v['total_length_diff'] * 100:+.2f}",
                      f"{v['mean_log_mel']:.4f}", f"{v['max_log_mel']:.4f}",
                      f"{max(pinned):.4f}" if pinned else "-",
                      f"{np.mean([s['mcd_db'] for s in v['sentences']]):.2f}", min_snr)
    return table
