"""Typed results of the evaluation engine: what `evaluate` returns and `report.json` holds.

`CheckReport` is the report of one check (single graph, chain or autoregressive
loop); `to_json()` gives the documented JSON (`"schema": "tts-onnx-pipeline/check/1"`)
and `CheckReport.from_json` reads it back, including reports written before
these models existed (no `family`, no audio `sample_rate`). In the typed form
every dB figure is a float (identical tensors: inf; nothing compared: nan);
JSON has no inf or nan, so there they are "inf"/"-inf" and null.

A family adds its own per-output metrics under their key in an output entry
(`OutputResult.extra(key)`), and token metrics under `tokens`.

An audio output's metrics keep every sample's numbers (`AudioSummary.per_sample`),
and the report names two samples to listen to (`audio_examples`: the worst by
log-mel, and the median one). Their waveforms are held in memory by the report
that the check returns (`waveform(name)`) until `report.write_reports` writes
them as WAV files into `<stem>-audio/` beside report.json; a report read back
from JSON has the names only, and the files stay where they were written.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, PrivateAttr, ValidationError

from pipeline.core.errors import PipelineError

SCHEMA = "tts-onnx-pipeline/check/1"


def as_float(v: Any) -> float:
    """A JSON metric back to a float: "inf" -> inf, null -> nan."""
    if v == "inf":
        return math.inf
    if v == "-inf":
        return -math.inf
    return math.nan if v is None else float(v)


def _float_from_json(v: Any) -> Any:
    return as_float(v) if v is None or isinstance(v, (str, int, float)) else v  # anything else: pydantic says why


def json_float(v: float) -> float | str | None:
    """JSON has no inf/nan: identical tensors say "inf", missing data says null."""
    if math.isnan(v):
        return None
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


# A float that may be inf or nan: "inf"/"-inf"/null in JSON.
Db = Annotated[float, BeforeValidator(_float_from_json), PlainSerializer(json_float, when_used="json")]
# The same where null means "does not apply" (None), not "nothing measured".
OptionalDb = Annotated[float | None, BeforeValidator(lambda v: None if v is None else _float_from_json(v)),
                       PlainSerializer(lambda v: None if v is None else json_float(v), when_used="json")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorStats(_Strict):
    """Error of candidate tensors y against reference tensors x, pooled over every sample."""

    sqnr_db: Db = Field(description="10 log10(sum x^2 / sum (x-y)^2), ONNX Runtime's qdq_loss_debug formula")
    cosine: float = Field(description="x.y / (|x| |y|)")
    max_abs: float = Field(description="max |x - y|")
    rel_l2: Db = Field(description="|x - y| / |x|")
    samples: int = Field(description="samples compared")
    shape_mismatches: int = Field(description="samples whose shapes differ: a changed length. They are compared "
                                  "on the reference's durations (the candidate run pinned to them) where the model "
                                  "has a durations tensor, else over the common leading extent; `length_changes` "
                                  "says which samples and by how much")


class AudioSample(_Strict):
    """One evaluation sample's audio metrics."""

    log_mel: float = Field(description="mean |log mel x - log mel y| over the common frames")
    mcd_db: float | None = None
    length_change: float = Field(description="(candidate - reference) / reference, in samples")
    divergence_s: float | None = Field(None, description="lengths differ: where the candidate stops matching the "
                                                         "reference (first run of mismatched frames), seconds")
    log_mel_pinned: float | None = Field(None, description="lengths differ: the log-mel distance with the candidate "
                                                           "run on the reference's durations (the error apart from "
                                                           "the length change)")


class AudioSummary(_Strict):
    """Audio metrics over the samples, at the family's sample rate and mel front end."""

    log_mel_mean: float = Field(description="mean over samples of mean |log mel x - log mel y|")
    log_mel_max: float = Field(description="worst sample's log-mel distance")
    log_mel_pinned_max: float | None = Field(None, description="worst sample's log-mel distance with every sample's "
                                                               "durations pinned to the reference's (where the model "
                                                               "has a durations tensor and a length changed)")
    mcd_db_mean: float | None = Field(None, description="mean mel-cepstral distortion, dB")
    length_diff_max_abs: float = Field(description="largest relative length change")
    samples_with_length_change: int
    sample_rate: int | None = Field(None, description="Hz the metrics ran at (reports before families: 22050)")
    note: str | None = None
    per_sample: list[AudioSample] | None = Field(None, description="each sample's numbers, in sample order")


class MelFrontEnd(_Strict):
    """The mel front end the audio metrics ran with (`pipeline.core.audio.MelSettings`)."""

    sample_rate: int
    n_fft: int
    hop: int
    n_mels: int
    fmin: float
    fmax: float


class AudioExample(_Strict):
    """A sample to listen to: its reference and candidate audio as WAV files in `<report stem>-audio/`."""

    output: str = Field(description="the output it comes from (`chain:<graph>` in a chain: what a user hears)")
    sample: int = Field(description="index of the evaluation sample")
    why: Literal["worst", "typical"] = Field(description="worst: largest log-mel distance; typical: the median")
    log_mel: float
    length_change: float
    divergence_s: float | None = Field(description="lengths differ: where the durations diverge, seconds")
    reference_s: float = Field(description="the reference's duration, seconds")
    candidate_s: float
    front_end: MelFrontEnd = Field(description="the mel front end of the metrics, which the spectrograms use")
    reference_wav: str = Field(description="file name of the reference's 16-bit PCM WAV")
    candidate_wav: str
    spectrogram: str = Field(description="file name of the PNG of both mel spectrograms and their difference")


class AsrSentence(_Strict):
    """One evaluation sentence through the ASR engine: its text, both transcripts, and their errors against it."""

    text: str = Field(description="the sentence the models were asked to speak")
    reference_transcript: str = Field(description="what the ASR engine heard in the reference's audio")
    candidate_transcript: str = Field(description="what it heard in the candidate's audio")
    words: int = Field(description="words of the normalised text")
    chars: int = Field(description="characters of the normalised text")
    word_errors_reference: int = Field(description="substitutions + deletions + insertions, reference transcript")
    word_errors_candidate: int
    char_errors_reference: int
    char_errors_candidate: int

    @property
    def wer_increase(self) -> float:
        """This sentence's WER increase, points."""
        return 100 * (self.word_errors_candidate - self.word_errors_reference) / max(self.words, 1)


class AsrSummary(_Strict):
    """Intelligibility: word and character error rates of both models' speech against the evaluation text,
    through an offline ASR engine (`pipeline.evaluation.asr`), pooled over all sentences' words (percent)."""

    engine: str = Field(description="the ASR engine and its version")
    wer_reference: float = Field(description="WER of the reference's audio, percent, pooled over all words")
    wer_candidate: float = Field(description="WER of the candidate's audio, percent")
    wer_increase: float = Field(description="candidate minus reference, points of WER")
    cer_reference: float = Field(description="CER of the reference's audio, percent")
    cer_candidate: float
    wer_increase_max: float = Field(description="the largest one sentence's WER increase, points")
    cached_references: int = Field(0, description="reference transcripts taken from the transcript cache")
    sentences: list[AsrSentence] = Field(description="each sentence, in sample order")

    @classmethod
    def of(cls, sentences: list[AsrSentence], engine: str, cached_references: int = 0) -> AsrSummary:
        words, chars = max(sum(s.words for s in sentences), 1), max(sum(s.chars for s in sentences), 1)
        wer_ref = 100 * sum(s.word_errors_reference for s in sentences) / words
        wer_cand = 100 * sum(s.word_errors_candidate for s in sentences) / words
        return cls(engine=engine, wer_reference=round(wer_ref, 3), wer_candidate=round(wer_cand, 3),
                   wer_increase=round(wer_cand - wer_ref, 3),
                   cer_reference=round(100 * sum(s.char_errors_reference for s in sentences) / chars, 3),
                   cer_candidate=round(100 * sum(s.char_errors_candidate for s in sentences) / chars, 3),
                   wer_increase_max=round(max((s.wer_increase for s in sentences), default=0.0), 3),
                   cached_references=cached_references, sentences=sentences)

    def line(self) -> str:
        """One line for a terminal: both WERs, the increase, both CERs."""
        return (f"ASR ({self.engine}, {len(self.sentences)} sentences): WER {self.wer_reference:.1f}% -> "
                f"{self.wer_candidate:.1f}% ({self.wer_increase:+.1f} points), CER {self.cer_reference:.1f}% -> "
                f"{self.cer_candidate:.1f}%")


class _EndOutput(_Strict):
    output: str = Field(description="the output measured")


class Sensitivity(ErrorStats, _EndOutput):
    """End-output error with only this block in candidate precision (--sensitivity)."""

    # (ErrorStats is the first base: pydantic puts a later base's fields first, so `output` leads, as it always
    # has in report.json.)
    log_mel_max: float | None = Field(None, description="worst sample's log-mel distance (audio outputs only)")


class LengthChange(_Strict):
    """One sample whose candidate made a different length than the reference: a durations tensor whose values
    changed (what set the length, and in which block), or an output whose shape changed."""

    sample: int = Field(description="index of the evaluation sample")
    tensor: str = Field(description="the durations tensor, or the output, that changed")
    block: str | None = Field(description="the block that computes the durations tensor; null for an output")
    reference: int = Field(description="frames in all (the durations' sum), or the output's length along the "
                                       "first axis that differs, in the reference")
    candidate: int = Field(description="the same in the candidate")
    entries_changed: int | None = Field(None, description="durations that differ (of a durations tensor)")
    isolated: bool | None = Field(None, description="the block changes these durations by itself, fed the "
                                                    "reference's inputs (null for an output)")


class BlockResult(_Strict):
    """One block: its own error (isolated) and the error piled up at its outputs (accumulated)."""

    block: str = Field(description="block id (`graph:block` in a chain; a graph in an autoregressive set)")
    params: int
    bytes_reference: int
    bytes_candidate: int
    precision: dict[str, int] = Field(description="nodes computing in fp32/fp16/int8/other")
    weights: dict[str, int] = Field(description="bytes of weights per stored dtype")
    matched: bool = Field(description="the candidate has the block's boundary tensors")
    unmatched_tensors: list[str]
    outputs: list[str] = Field(description="boundary tensors: made inside the block, read outside it")
    isolated: ErrorStats = Field(description="the block in candidate precision, fed the reference's inputs")
    accumulated: ErrorStats = Field(description="the whole candidate run, at the block's outputs")
    amplification: OptionalDb = Field(description="accumulated / isolated relative L2; null: does not apply")
    sensitivity: Sensitivity | None = Field(None, description="end-output error with only this block in "
                                                              "candidate precision (--sensitivity)")


class OutputResult(ErrorStats):
    """One model output (or `chain:<graph>`, the whole chain's); a family's metrics under their own keys."""

    model_config = ConfigDict(extra="allow")

    name: str
    audio: AudioSummary | None = None

    @classmethod
    def measured(cls, name: str, stats: ErrorStats, metrics: dict[str, Any] | None = None) -> OutputResult:
        """Output `name`'s pooled error, with what each per-sample metric measured on it under the metric's key
        (`audio`: typed; a family's own: `extra(key)`)."""
        return cls(name=name, **dict(stats), **(metrics or {}))

    def extra(self, key: str) -> Any:
        """What a family's own metric wrote under `key` (None when it wrote nothing)."""
        return (self.model_extra or {}).get(key)


class FallbackRound(_Strict):
    round: int
    kept: list[str] = Field(description="blocks moved out of the fallback step so far")
    kept_in: str
    summary: str
    target_met: bool
    output: OutputResult
    size_ratio: float
    moved_next: list[str]


class TuneCandidate(_Strict):
    """One combination `pipeline tune` built and measured whole, on the tune samples."""

    key: str = Field(description="the combination's cache key (its folder under tune/candidates)")
    choices: str = Field(description="how many blocks took each menu item")
    size_ratio: float = Field(description="final bytes / base bytes")
    latency_ratio: float | None = Field(description="latency / base latency, 2 threads, on the tune samples")
    log_mel_max: float | None = Field(description="worst tune sample's log-mel distance (audio families)")
    sqnr_db: float | None = Field(description="first output's pooled SQNR, dB")
    length_change_max: float = Field(description="largest output length change, as a fraction")
    wer_increase: float | None = Field(None, description="WER minus the FP32 model's, points, on the tune samples "
                                                         "(where the target bounds it)")
    predicted: dict[str, float] = Field(description="what the additive model predicted for its quality terms")
    met: bool = Field(description="every target bound holds")
    misses: list[str] = Field(description="the bounds it misses, with numbers")
    pareto: bool = Field(description="on the front of size and latency among candidates that met the target")
    chosen: bool = Field(description="the candidate the resolved recipe builds")


class TuneSummary(_Strict):
    """The per-block precision search behind a tuned model (`pipeline tune`)."""

    objective: str
    target: dict[str, Any] = Field(description="the tune section's target")
    samples: str = Field(description="the tune samples: how many, from which source, which ones")
    blocks_searched: int
    menu: list[str]
    trials: int = Field(description="screening trials plus verification trials, cached ones included")
    screening_trials: int
    executor: str
    wall_s: float = Field(description="the search's wall time in this invocation")
    candidates: list[TuneCandidate]


class FormatResult(_Strict):
    """One file of a format written beside ONNX (a recipe's `targets:`), checked on the check's own inputs against
    the FP32 ONNX model, as the ONNX result is."""

    format: str = Field(description="the target's format (gguf, torchscript, coreml)")
    file: str = Field(description="the file, in final/<format>/")
    compared: str = Field(description="what was compared with the FP32 ONNX model, on which inputs")
    sqnr_db: OptionalDb = Field(None, description="pooled SQNR, dB; for a check per part (decoder layers, "
                                                  "isolated), the lowest part's; null: not run")
    worst: str | None = Field(None, description="the part with the lowest SQNR")
    log_mel_max: float | None = Field(None, description="worst sample's log-mel distance (audio)")
    note: str | None = Field(None, description="what was not checked, and why")


class CheckReport(_Strict):
    """A check's whole result. Blocks are in graph order."""

    # The field order is the JSON's key order.
    schema_: str = Field(SCHEMA, alias="schema")
    samples: int
    reference: str
    candidate: str
    notes: list[str]
    peak_rss_mb: float
    wall_s: float
    blocks: list[BlockResult]
    outputs: list[OutputResult]
    tokens: dict[str, Any] | None = Field(None, description="token metrics (teacher-forced agreement, KL, first "
                                                            "divergence) of a token family")
    family: str | None = None
    key: str | None = Field(None, description="cache key of the check")
    failures: list[str] | None = Field(None, description="thresholds missed, each with its numbers")
    rounds: list[FallbackRound] | None = Field(None, description="automatic fallback rounds")
    tune: TuneSummary | None = Field(None, description="the precision search behind this model (pipeline tune)")
    audio_examples: list[AudioExample] | None = Field(None, description="samples to listen to (audio families)")
    formats: list[FormatResult] | None = Field(None, description="the formats beside ONNX, checked the same way")
    length_changes: list[LengthChange] | None = Field(None, description="samples whose lengths changed: which "
                                                      "durations or outputs, in which block, by how much")
    asr: AsrSummary | None = Field(None, description="intelligibility: WER/CER of both models' speech through an "
                                                     "offline ASR engine (audio families with evaluation text)")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    # The examples' waveforms by WAV file name, while this report is the check's own (not read back from JSON).
    _waveforms: dict[str, np.ndarray] = PrivateAttr(default_factory=dict)

    @classmethod
    def new(cls, *, samples: int, reference: str, candidate: str, notes: list[str], peak_rss_mb: float,
            wall_s: float, blocks: list[BlockResult], outputs: list[OutputResult], **more: Any) -> CheckReport:
        """A fresh check's report, the schema named; `more` (tokens, ...) is set only where given, so that
        report.json holds no key a check did not fill. Peak RSS to 0.1 MB, wall time to the millisecond."""
        return cls(schema=SCHEMA, samples=samples, reference=reference, candidate=candidate, notes=notes,
                   peak_rss_mb=round(peak_rss_mb, 1), wall_s=round(wall_s, 3), blocks=blocks, outputs=outputs,
                   **more)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "report") -> CheckReport:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            path = ".".join(str(p) for p in first["loc"])
            raise PipelineError(f"{where}: not a check report: {path}: {first['msg']}") from None

    @classmethod
    def read(cls, path: Path) -> CheckReport:
        return cls.from_json(json.loads(path.read_text()), where=str(path))

    def to_json(self) -> dict[str, Any]:
        """The documented JSON: keys that were never given are left out, as before."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)

    def add_audio_example(self, example: AudioExample, reference: np.ndarray, candidate: np.ndarray) -> None:
        """Name a sample to listen to, with its waveforms (written when the report is)."""
        self.audio_examples = [*(self.audio_examples or []), example]
        self._waveforms[example.reference_wav] = reference
        self._waveforms[example.candidate_wav] = candidate

    def waveform(self, wav_name: str) -> np.ndarray | None:
        """An example's waveform, when this report holds it (None when it was read back from JSON)."""
        return self._waveforms.get(wav_name)

    def block(self, block_id: str) -> BlockResult:
        for b in self.blocks:
            if b.block == block_id:
                return b
        raise KeyError(block_id)
