"""Output metrics and the thresholds each one owns.

A check's thresholds are checked against the report by the metric that
measures them; a threshold whose metric has nothing to measure on this
ModelSet (`max_log_mel` on a model without audio) is an error before any work
starts, naming the threshold. Which metrics a ModelSet has comes from its
family: block and output SQNR always, audio metrics where the family says the
ModelSet makes audio, token metrics where it makes tokens, plus any metric the
family adds (`Family.metrics`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from pipeline.core.audio import compare_audio
from pipeline.core.errors import PipelineError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from pipeline.families import AudioOutput, Family
    from pipeline.core.modelset import ModelSet
    from pipeline.evaluation.results import AudioExample, CheckReport


class Metric:
    """Measures one aspect of the outputs and owns the thresholds on it.

    `thresholds` maps each threshold name to what it bounds. A metric that
    measures outputs sample by sample (`per_sample`) gets every (reference,
    candidate) pair of the output it is attached to and writes `to_json()`
    under `key` in that output's report entry (`OutputResult.extra(key)` reads
    it back). `failures` gets the typed report (`pipeline.evaluation.results.CheckReport`)."""

    key: ClassVar[str]
    needs: ClassVar[str]  # what a ModelSet must have for it, for the error naming a threshold
    thresholds: ClassVar[dict[str, str]] = {}
    per_sample: ClassVar[bool] = False
    output: str | None = None  # the output a per-sample metric measures; None: the first

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        raise NotImplementedError

    def update_pinned(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """The last sample's candidate again, run on the reference's durations (its length had changed)."""

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def failures(self, report: CheckReport, limits: dict[str, float]) -> list[str]:
        raise NotImplementedError


class BlockSQNR(Metric):
    key = "blocks"
    needs = "blocks"
    thresholds = {"min_sqnr_db": "every block's isolated SQNR, dB"}

    def failures(self, report, limits):
        limit = limits.get("min_sqnr_db")
        if limit is None:
            return []
        return [f"block {b.block}: isolated SQNR {b.isolated.sqnr_db:.1f} dB < {limit} dB" for b in report.blocks
                if b.matched and not math.isnan(b.isolated.sqnr_db) and b.isolated.sqnr_db < limit]


class OutputSQNR(Metric):
    key = "sqnr_db"
    needs = "outputs"
    thresholds = {"min_output_sqnr_db": "every output's SQNR, dB"}

    def failures(self, report, limits):
        limit = limits.get("min_output_sqnr_db")
        if limit is None:
            return []
        return [f"output {o.name}: SQNR {o.sqnr_db:.1f} dB < {limit} dB" for o in report.outputs
                if o.sqnr_db < limit]


class AudioMetric(Metric):
    """Log-mel distance, MCD and length change at the family's sample rate and mel front end.

    It also keeps every (reference, candidate) waveform pair, float32, so that the report can let a person
    hear the worst and a typical sample (`examples`): evaluation sets are a handful of sentences of a few
    seconds (8 x 3 s at 22 kHz: 4 MB), and which samples to keep is known only at the end."""

    key = "audio"
    needs = "an audio output"
    thresholds = {"max_log_mel": "worst sample's log-mel distance"}
    per_sample = True

    def __init__(self, audio: AudioOutput):
        self.spec = audio
        self.output = audio.output
        self.comparisons: list[Any] = []
        self.waveforms: list[tuple[np.ndarray, np.ndarray]] = []
        self.pinned: dict[int, float] = {}  # sample -> log-mel on the reference's durations, where lengths differ

    def update_pinned(self, reference, candidate):
        ref = np.asarray(reference, dtype=np.float32).reshape(-1)
        cand = np.asarray(candidate, dtype=np.float32).reshape(-1)
        self.pinned[len(self.comparisons) - 1] = compare_audio(ref, cand, mel=self.spec.mel).log_mel_distance

    def update(self, reference, candidate):
        ref = np.asarray(reference, dtype=np.float32).reshape(-1)
        cand = np.asarray(candidate, dtype=np.float32).reshape(-1)
        self.comparisons.append(compare_audio(ref, cand, mel=self.spec.mel))
        self.waveforms.append((ref, cand))

    def to_json(self):
        c = self.comparisons
        return {
            "log_mel_mean": float(np.mean([x.log_mel_distance for x in c])),
            "log_mel_max": float(np.max([x.log_mel_distance for x in c])),
            "mcd_db_mean": float(np.mean([x.mcd_db for x in c])),
            "length_diff_max_abs": float(np.max([abs(x.length_diff) for x in c])),
            "samples_with_length_change": int(sum(x.length_diff != 0 for x in c)),
            "sample_rate": self.spec.sample_rate,
            "note": "log-mel over the common length where lengths differ",
            "per_sample": [{"log_mel": x.log_mel_distance, "mcd_db": x.mcd_db, "length_change": x.length_diff,
                            "divergence_s": x.divergence_s, **({"log_mel_pinned": self.pinned[i]}
                                                               if i in self.pinned else {})}
                           for i, x in enumerate(c)],
            **self._pinned_max(),
        }

    def _pinned_max(self) -> dict[str, float]:
        """Every sample's log-mel with durations pinned (a sample whose length kept is its own), where any
        length changed and could be pinned."""
        if not self.pinned:
            return {}
        values = [self.pinned.get(i, x.log_mel_distance) for i, x in enumerate(self.comparisons)]
        return {"log_mel_pinned_max": float(max(values))}

    def examples(self, output: str) -> list[tuple[AudioExample, np.ndarray, np.ndarray]]:
        """(example, reference waveform, candidate waveform) of the samples to listen to (`choose_examples`)."""
        from pipeline.evaluation.results import AudioExample

        rate = self.spec.sample_rate
        found = []
        for i, why in choose_examples([x.log_mel_distance for x in self.comparisons]):
            x, (ref, cand) = self.comparisons[i], self.waveforms[i]
            found.append((AudioExample(
                output=output, sample=i, why=why, log_mel=x.log_mel_distance, length_change=x.length_diff,
                divergence_s=x.divergence_s, reference_s=ref.size / rate, candidate_s=cand.size / rate,
                front_end=dataclasses.asdict(self.spec.mel), reference_wav=f"sample{i}-reference.wav",
                candidate_wav=f"sample{i}-candidate.wav", spectrogram=f"sample{i}-spectrogram.png"), ref, cand))
        return found

    def failures(self, report, limits):
        limit = limits.get("max_log_mel")
        if limit is None:
            return []
        # In a chained model set the audio a user hears is the whole chain's: the threshold applies to it;
        # each graph's own audio metrics (fed the FP32 upstream) are diagnostics.
        chained = any(o.name.startswith("chain:") for o in report.outputs)
        heard = [o for o in report.outputs if o.audio and (not chained or o.name.startswith("chain:"))]
        # (`not <=`: a NaN, audio that turned to NaN or inf, misses the bound too)
        return [f"output {o.name}: log-mel max {o.audio.log_mel_max:.4f} > {limit}" for o in heard
                if not o.audio.log_mel_max <= limit]


class TokenMetric(Metric):
    """Teacher-forced agreement and KL of the next-token distributions (measured by the family's loop)."""

    key = "tokens"
    needs = "token outputs"
    thresholds = {"min_top1_agreement": "teacher-forced top-1 agreement of the main token head (the text head, where there are two)"}

    def failures(self, report, limits):
        limit = limits.get("min_top1_agreement")
        agreement = (report.tokens or {}).get("teacher_forced_top1_agreement")
        if limit is None or agreement is None or agreement >= limit:
            return []
        return [f"teacher-forced top-1 agreement {agreement:.3f} < {limit}"]


class AsrMetric(Metric):
    """Whether the words survive: WER of both models' speech through an offline ASR engine (`asr.measure_asr`,
    run on the audio metric's waveforms once the evaluation is done; the report's `asr`)."""

    key = "asr"
    needs = "an audio output"
    thresholds = {"max_wer_increase": "the candidate's WER minus the reference's, points"}

    def failures(self, report, limits):
        limit = limits.get("max_wer_increase")
        if limit is None or report.asr is None:
            return []
        a = report.asr
        return [] if a.wer_increase <= limit else \
            [f"WER {a.wer_reference:.1f}% -> {a.wer_candidate:.1f}%: +{a.wer_increase:.1f} points > {limit}"]


BUILT_IN: tuple[type[Metric], ...] = (BlockSQNR, OutputSQNR, AudioMetric, AsrMetric, TokenMetric)


def choose_examples(log_mels: list[float]) -> list[tuple[int, str]]:
    """(sample index, why) of the samples worth hearing: the worst by log-mel distance, and the median one
    (the lower median, so it differs from the worst whenever there are two samples or more)."""
    if not log_mels:
        return []
    order = sorted(range(len(log_mels)), key=lambda i: (log_mels[i], i))
    chosen = [(order[-1], "worst")]
    if len(order) >= 2:
        chosen.append((order[(len(order) - 1) // 2], "typical"))
    return chosen


def heard_output(metrics: list[Metric], outputs: list[str]) -> str:
    """The output the per-sample metrics measure: the one a metric names (a declared audio output), else the
    first. A name the graph lacks is an error naming its outputs."""
    named = next((m.output for m in metrics if m.per_sample and m.output), None)
    if named is not None and named not in outputs:
        raise PipelineError(f"audio output {named!r}: the graph has no such output (its outputs: "
                            f"{', '.join(outputs)})")
    return named or outputs[0]


def metrics_for(family: Family, ms: ModelSet | None) -> list[Metric]:
    """The metrics a ModelSet of `family` has (`ms` None: before an exporter ran; its family still knows)."""
    found: list[Metric] = [BlockSQNR(), OutputSQNR()]
    audio = family.audio(ms)
    if audio is not None:
        found += [AudioMetric(audio), AsrMetric()]
    if family.tokens(ms):
        found.append(TokenMetric())
    return found + list(family.metrics(ms))


def check_limits(spec: BaseModel) -> dict[str, float]:
    """Every threshold a check (or its fallback) sets: its fields named after a built-in metric's threshold,
    then its `thresholds` for plug-in metrics."""
    named = {t: getattr(spec, t, None) for cls in BUILT_IN for t in cls.thresholds}
    return {k: v for k, v in {**named, **getattr(spec, "thresholds", {})}.items() if v is not None}


def require_measurable(limits: dict[str, float], metrics: list[Metric], family: Family, where: str) -> None:
    """A threshold no metric of this ModelSet owns is an error, naming it and what it needs."""
    owned = {t for m in metrics for t in m.thresholds}
    every = {t: cls.needs for cls in _metric_classes(family) for t in cls.thresholds}
    for name in limits:
        if name in owned:
            continue
        need = every.get(name)
        why = (f"it needs {need}, and a {family.name!r} model has none" if need
               else f"no metric measures it (thresholds here: {', '.join(sorted(owned))})")
        lacks = "".join(f"; {line}" for line in getattr(family, "lacks", []))
        raise PipelineError(f"{where}.{name}: nothing to measure: {why}{lacks}")


def _metric_classes(family: Family) -> list[type[Metric]]:
    return list(BUILT_IN) + [type(m) for m in family.metrics(None)]


def failures(report: CheckReport, limits: dict[str, float], metrics: list[Metric]) -> list[str]:
    """Every threshold the report misses, each with its numbers, metric by metric."""
    return [f for m in metrics for f in m.failures(report, limits)]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class HeadMetrics:
    """Teacher-forced agreement and KL of one head, per generated position, plus free-run divergence."""

    def __init__(self) -> None:
        self.agree: list[bool] = []
        self.agree_by_step: dict[int, list[float]] = {}
        self.kl_by_step: dict[int, list[float]] = {}
        self.divergence: list[int | None] = []

    def add(self, ref_logits: np.ndarray, cand_logits: np.ndarray) -> None:
        """Logits [steps, V] (text) or [steps, V, num_vq] (codes: one distribution per codebook)."""
        if ref_logits.ndim == 3:
            ref_logits, cand_logits = ref_logits.transpose(0, 2, 1), cand_logits.transpose(0, 2, 1)
        lr, lc = log_softmax(ref_logits), log_softmax(cand_logits)
        agree = lr.argmax(-1) == lc.argmax(-1)
        self.agree += agree.ravel().tolist()
        kl = (np.exp(lr) * (lr - lc)).sum(-1)
        # Per step, codebooks averaged: where along a continuation the candidate starts to disagree.
        for step, value in enumerate(agree.reshape(len(agree), -1).mean(-1) if len(agree) else []):
            self.agree_by_step.setdefault(step, []).append(float(value))
        for step, value in enumerate(kl.reshape(len(kl), -1).mean(-1) if len(kl) else []):
            self.kl_by_step.setdefault(step, []).append(float(value))

    def diverged(self, reference: list, free: list) -> None:
        self.divergence.append(next((k for k, (a, b) in enumerate(zip(reference, free)) if a != b), None))

    def to_json(self) -> dict[str, Any]:
        kls = [v for vs in self.kl_by_step.values() for v in vs]
        diverged = [d for d in self.divergence if d is not None]
        return {
            "teacher_forced_top1_agreement": float(np.mean(self.agree)) if self.agree else None,
            "teacher_forced_kl_mean": float(np.mean(kls)) if kls else None,
            "teacher_forced_kl_max": float(np.max(kls)) if kls else None,
            "teacher_forced_kl_per_step": [float(np.mean(self.kl_by_step[k])) for k in sorted(self.kl_by_step)],
            "teacher_forced_top1_per_step": [float(np.mean(self.agree_by_step[k]))
                                             for k in sorted(self.agree_by_step)],
            "first_divergence_steps": self.divergence,
            "prompts_diverged": len(diverged),
            "first_divergence_min": min(diverged) if diverged else None,
        }
