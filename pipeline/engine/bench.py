"""Benchmark model variants against a reference, interleaved in one process.

Latency is measured round-robin (every repetition runs every variant on every
sentence in turn), so machine noise hits all variants alike and ratios mean
something on a noisy 2-core box. Peak RSS is measured per variant in a fresh
child process, since a process's high-water mark cannot be un-set.
Inputs, output metrics and duration pinning come from the model's family
(`Family.bench_inputs`, `Family.audio`): audio metrics at the family's sample
rate where it makes audio, output SQNR always.
"""
from __future__ import annotations

import multiprocessing
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibration import SourceContext, check_feeds

from pipeline.core.feeds import Feeds

from pipeline.core import progress as progress_display
from pipeline.core.audio import compare_audio, sqnr_db
from pipeline.core.modelset import ModelSet
from pipeline.core.onnx_io import load_onnx, session
from pipeline.core.procinfo import cpu_description
from pipeline.core.procinfo import peak_rss_mb as process_peak_rss_mb

if TYPE_CHECKING:
    from pipeline.families import AudioOutput


@dataclass
class Variant:
    label: str
    path: Path  # the .onnx file, or the folder of a ModelSet of several chained graphs

    @property
    def bytes(self) -> int:
        return ModelSet.read(self.path).total_bytes() if self.path.is_dir() else self.path.stat().st_size

    def entry_model(self):
        """The graph the feeds go into (a chain's entry graph)."""
        if not self.path.is_dir():
            return load_onnx(self.path)
        from pipeline.evaluation.chain import entry_graphs

        ms = ModelSet.read(self.path)
        return ms.load(entry_graphs(ms)[0])


class _Chain:
    """A chained ModelSet run like one session: `run(None, feeds)` returns the last graph's outputs."""

    def __init__(self, folder: Path, threads: int):
        from pipeline.evaluation.chain import ChainRunner, sink_graphs

        ms = ModelSet.read(folder)
        self.runner, self.sink = ChainRunner(ms, threads), sink_graphs(ms)[0]

    def run(self, _names, feeds: Feeds) -> list[np.ndarray]:
        return list(self.runner.run(feeds)[self.sink][1].values())


def _session(path: Path | str, threads: int):
    path = Path(path)
    return _Chain(path, threads) if path.is_dir() else session(path, threads=threads)


@dataclass
class SentenceQuality:
    text: str
    ref_samples: int
    cand_samples: int
    length_diff: float
    log_mel_distance: float | None  # None: the family makes no audio
    snr_db: float | None
    mcd_db: float | None = None
    # Where the length changed: log-mel with the candidate run on the reference's durations (pinned).
    pinned_log_mel_distance: float | None = None
    sqnr_db: float | None = None  # of the first output, where shapes match


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
    asr: dict[str, float] | None = None  # with --asr: WER and CER against the sentences, and the WER increase

    @property
    def max_abs_length_diff(self) -> float:
        return max((abs(s.length_diff) for s in self.sentences), default=0.0)

    @property
    def total_length_diff(self) -> float:
        ref = sum(s.ref_samples for s in self.sentences)
        return (sum(s.cand_samples for s in self.sentences) - ref) / max(ref, 1)

    @property
    def mean_log_mel(self) -> float | None:
        values = [s.log_mel_distance for s in self.sentences if s.log_mel_distance is not None]
        return float(np.mean(values)) if values else None

    @property
    def max_log_mel(self) -> float | None:
        return max((s.log_mel_distance for s in self.sentences if s.log_mel_distance is not None), default=None)


def resolve_variant(path: Path, label: str | None = None) -> Variant:
    """A .onnx file, or a ModelSet folder (a run's final/): its graph, or the folder when its graphs chain."""
    from pipeline.engine.comparison import model_file

    default = (path.parent.name if path.name == "final" else path.name) if path.is_dir() else path.stem
    if path.is_dir() and len(ModelSet.read(path).graphs) > 1:
        from pipeline.evaluation.chain import dataflow_edges

        dataflow_edges(ModelSet.read(path))  # a loop (a GPT) is not benchmarked as one pass
        return Variant(label or default, path)
    file = model_file(path)
    load_onnx(file)
    return Variant(label or default, file)


def npz_inputs(reference: Variant, folder: Path, count: int) -> tuple[list[str], list[Feeds]]:
    """(labels, feeds) of `bench --npz`: the first `count` feed files of the folder, checked against the
    reference's entry graph and labelled by the text each speaks (the folder's texts.txt), else by file name."""
    from pipeline.families import draw_samples

    feeds, source = draw_samples("npz", {"folder": str(folder)}, SourceContext(None), reference.entry_model(),
                                 "bench --npz", limit=count)
    return source.texts() or [p.name for p in sorted(folder.glob("*.npz"))][:count], feeds


def _audio(sess, feeds: Feeds, output: str | None = None) -> np.ndarray:
    """The output measured (`output`: a declared audio output; None: the first), flat."""
    return (sess.run([output], feeds) if output else sess.run(None, feeds))[0].reshape(-1)


def _peak_rss_child(path: str, feeds: list[Feeds], threads: int, queue) -> None:
    sess = _session(path, threads)
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


def _timed_child(paths: list[str], feeds: list[Feeds], threads: int, repeat: int) -> list[float]:
    sessions = [_session(p, threads) for p in paths]
    for s in sessions:
        s.run(None, feeds[0])  # warm-up
    return time_interleaved(sessions, feeds, repeat)


def time_interleaved_apart(paths: list[Path], feeds: list[Feeds], threads: int, repeat: int) -> list[float]:
    """`time_interleaved` over sessions of these model files, warmed up, in a fresh process: the sessions' memory
    does not land on the caller's (a tune search holding its state: 2.9 GB on Kokoro with both in it)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_timed_child, [str(p) for p in paths], feeds, threads, repeat).result()


def time_interleaved(sessions: list, feeds: list[Feeds], repeat: int, progress=lambda msg: None) -> list[float]:
    """Median seconds per pass over `feeds` of each (warmed-up) session, the sessions taking turns in every
    repetition so that a slower or busier stretch of the machine lands on all of them."""
    timings: list[list[float]] = [[] for _ in sessions]
    for r in progress_display.track(range(repeat), "latency repetitions"):
        progress(f"latency, repetition {r + 1}/{repeat}")
        for vi, s in enumerate(sessions):
            t0 = time.perf_counter()
            for f in feeds:
                s.run(None, f)
            timings[vi].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in timings]


def run_bench(variants: list[Variant], feeds: list[Feeds], texts: list[str], repeat: int = 5,
              threads: int = 2, measure_rss: bool = True, progress=lambda msg: None,
              audio: AudioOutput | None = None, asr: bool = False) -> dict[str, Any]:
    """Reference is variants[0]. Returns a JSON-ready dict with per-variant results.

    `audio` (the family's audio output) adds audio metrics, and pins durations where a length changed; `asr`
    adds each variant's WER and CER against `texts` (the sentences spoken) and the increase over the
    reference's."""
    sessions = []
    for v in variants:
        model = v.entry_model()
        for i, f in enumerate(feeds):
            check_feeds(f, model, f"bench: {v.label}, sentence {i}")
        sessions.append(_session(v.path, threads))
    progress("quality")
    heard = audio.output if audio is not None else None
    outputs = [[_audio(s, f, heard) for f in feeds] for s in sessions]  # also the warm-up run
    latencies = time_interleaved(sessions, feeds, repeat, progress)
    rss = []
    for v in variants:
        progress(f"peak RSS of {v.label}")
        rss.append(peak_rss_mb(v.path, feeds, threads) if measure_rss else float("nan"))
    ref = variants[0]
    results = []
    for vi, v in enumerate(variants):
        pinned = None
        sentences = []
        for text, f, ref_out, cand_out in zip(texts, feeds, outputs[0], outputs[vi]):
            quality = _quality(text, ref_out, cand_out, audio)
            if audio is not None and quality.length_diff != 0 and \
                    (pinned := pinned or _durations_pinned(ref.path, v.path, audio.durations, threads)):
                run = pinned.run(f)
                k = pinned.reference_outputs.index(heard) if heard else 0
                quality.pinned_log_mel_distance = compare_audio(run.reference[k], run.candidate[k],
                                                                mel=audio.mel).log_mel_distance
            sentences.append(quality)
        results.append(VariantResult(v.label, str(v.path), v.bytes, v.bytes / ref.bytes, latencies[vi],
                                     latencies[vi] / latencies[0], rss[vi], sentences))
        if asr and audio is not None:
            from pipeline.evaluation.asr import measure_asr

            progress(f"transcribing {v.label}")
            a = measure_asr(list(zip(outputs[0], outputs[vi])), texts, audio.sample_rate)
            results[-1].asr = {"wer_reference": a.wer_reference, "wer": a.wer_candidate,
                               "wer_increase": a.wer_increase, "cer": a.cer_candidate}
    return {
        "machine": {**cpu_description(), "platform": platform.platform(), "threads": threads},
        "repeat": repeat,
        "sentences": len(feeds),
        "reference": ref.label,
        "variants": [asdict(r) | {"max_abs_length_diff": r.max_abs_length_diff,
                                  "total_length_diff": r.total_length_diff,
                                  "mean_log_mel": r.mean_log_mel, "max_log_mel": r.max_log_mel}
                     for r in results],
    }


def _quality(label: str, reference: np.ndarray, candidate: np.ndarray, audio: AudioOutput | None) -> SentenceQuality:
    if audio is None:
        sqnr = sqnr_db(reference, candidate) if reference.shape == candidate.shape else None
        diff = (candidate.size - reference.size) / max(reference.size, 1)
        return SentenceQuality(label, reference.size, candidate.size, diff, None, sqnr, sqnr_db=sqnr)
    cmp = compare_audio(reference, candidate, mel=audio.mel)  # its SNR is the output's SQNR (same samples)
    return SentenceQuality(label, cmp.ref_samples, cmp.cand_samples, cmp.length_diff, cmp.log_mel_distance,
                           cmp.snr_db, cmp.mcd_db, sqnr_db=cmp.snr_db)


def _durations_pinned(reference: Path, candidate: Path, durations: str | None, threads: int):
    """Reference and candidate with the candidate's durations pinned to the reference's, or None when the
    family names no duration tensor or the graph lacks it (a changed length then stays unexplained)."""
    from pipeline.core.graph import intermediate_names
    from pipeline.evaluation.pinning import PinnedPair

    if durations is None or candidate.is_dir() or durations not in intermediate_names(load_onnx(candidate)):
        return None
    return PinnedPair(reference, candidate, [durations], threads=threads)


BENCH_NOTE = ("log-mel distance is over the common length where lengths differ; 'pinned max' is the worst "
              "log-mel of those sentences with the candidate run on the reference's durations; "
              "min SNR is shown only when every sentence kept its length.")


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def results_table(result: dict[str, Any]):
    """The bench results as a rich table, one row per variant."""
    from rich.table import Table

    m = result["machine"]
    table = Table(title=f"{result['sentences']} sentences, {result['repeat']} interleaved repetitions, "
                        f"{m['threads']} threads, {m['cpus']} CPUs ({m['model']}; {', '.join(m['extensions'])})")
    cols = ("variant", "MB", "size x", "latency ms", "latency x", "peak RSS MB", "max |len| %",
            "total len %", "log-mel mean", "log-mel max", "pinned max", "MCD dB", "min SNR dB")
    asr = any(v.get("asr") for v in result["variants"])
    for col in cols + (("WER %", "WER +pts") if asr else ()):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for v in result["variants"]:
        wer = ((f"{v['asr']['wer']:.1f}", f"{v['asr']['wer_increase']:+.1f}") if v.get("asr") else ("-", "-")) \
            if asr else ()
        snrs = [s["snr_db"] for s in v["sentences"] if s["snr_db"] is not None]
        min_snr = "-" if len(snrs) < len(v["sentences"]) else f"{min(snrs):.1f}"
        pinned = [s["pinned_log_mel_distance"] for s in v["sentences"] if s["pinned_log_mel_distance"] is not None]
        table.add_row(v["label"], f"{v['bytes'] / 1e6:.1f}", f"{v['size_ratio']:.3f}",
                      f"{v['latency_s'] * 1e3:.0f}", f"{v['latency_ratio']:.2f}", f"{v['peak_rss_mb']:.0f}",
                      f"{v['max_abs_length_diff'] * 100:.2f}", f"{v['total_length_diff'] * 100:+.2f}",
                      _fmt(v["mean_log_mel"], 4), _fmt(v["max_log_mel"], 4), f"{max(pinned):.4f}" if pinned else "-",
                      _fmt(np.mean(mcds) if (mcds := [s["mcd_db"] for s in v["sentences"] if s["mcd_db"] is not None])
                           else None, 2), min_snr, *wer)
    return table
