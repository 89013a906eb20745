"""Does it still say the words? Word and character error rates of a model's speech, through an offline ASR model.

Log-mel distance and SQNR say that audio changed, not whether the words survived. This module transcribes the
reference's and the candidate's audio of each evaluation sentence and scores both transcripts against the
sentence's text, so a report can say "WER 2.1% -> 2.3%, +0.2 points" beside the spectra and lengths.

- **The engine** sits behind `AsrEngine` (a name, the rate it listens at, `transcribe`); the built-in one is
  Moonshine base-en from the `moonshine-cpp` wheel (MIT, its weights and its own ONNX Runtime inside: offline).
  It needs the optional extra: `pip install 'tts-onnx-pipeline[asr]'`.
- **Audio** is resampled to the engine's rate with soxr (its wrapper does not resample).
- **Text** on both sides goes through one normaliser (`normalize`: numbers, ordinals, years, money, case,
  punctuation), so formatting never counts as an error.
- **Transcripts are cached** by the audio's content hash (`TranscriptCache`): a re-run, a compare or a tune
  verification does not transcribe the FP32 model's audio again.

WER = (substitutions + deletions + insertions) / reference words, pooled over all sentences' words, in percent;
CER the same over characters of the normalised text. The increase is candidate minus reference, in points.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from pipeline.core.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.evaluation.results import AsrSummary

EXTRA = "pip install 'tts-onnx-pipeline[asr]'"
MIN_SECONDS = 0.1  # shorter than this is not speech an ASR model can be asked about


# -- text: one normaliser for both sides, then edit distance ---------------------------------------------------

_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "ms": "miss", "dr": "doctor", "vs": "versus", "ok": "okay",
                  "etc": "et cetera"}
_CURRENCIES = {"$": "dollars", "£": "pounds", "€": "euros"}


def _words(n: int, to: str = "cardinal") -> str:
    try:
        from num2words import num2words
    except ImportError:  # a report re-drawn without the extra: the transcripts it marks are already words
        return str(n)
    return num2words(n, to=to)


def _number(match: re.Match) -> str:
    """An integer as words: 1100-2099 read as a year ("nineteen ninety"), the way a speaker and an ASR model
    both say a four-digit number in running text; anything else as a cardinal."""
    digits = match.group(0)
    n = int(digits)
    if len(digits) == 4 and 1100 <= n <= 2099 and n % 1000 != 0:
        return f" {_words(n, 'year')} "
    return f" {_words(n)} "


def normalize(text: str) -> str:
    """Lower-case words separated by single spaces: numbers, ordinals, decimals, times and money spelt out, '&'
    and '%' as words, a few abbreviations expanded, hyphens as spaces, other punctuation and apostrophes gone."""
    t = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    t = re.sub(r"(\d),(?=\d{3}\b)", r"\1", t)  # 1,000 -> 1000
    for symbol, unit in _CURRENCIES.items():
        t = re.sub(re.escape(symbol) + r"\s*(\d+(?:\.\d+)?)", rf"\1 {unit}", t)
    t = t.replace("&", " and ").replace("%", " percent ")
    t = re.sub(r"\b(\d+)(st|nd|rd|th)\b", lambda m: f" {_words(int(m.group(1)), 'ordinal')} ", t)
    t = re.sub(r"\b(\d{1,2}):(\d{2})\b", lambda m: f" {_words(int(m.group(1)))} "
               + ("o'clock" if m.group(2) == "00" else f"oh {_words(int(m.group(2)))}" if m.group(2)[0] == "0"
                  else _words(int(m.group(2)))) + " ", t)
    t = re.sub(r"\b(\d+)\.(\d+)\b", lambda m: f" {_words(int(m.group(1)))} point "
               + " ".join(_words(int(d)) for d in m.group(2)) + " ", t)
    t = re.sub(r"\d+", _number, t)
    t = re.sub(r"[-\u2013\u2014/]", " ", t)
    t = t.replace("'", "")
    t = re.sub(r"[^\w\s]", " ", t)
    return " ".join(_ABBREVIATIONS.get(w, w) for w in t.split())


@dataclass
class Alignment:
    """How `hypothesis` differs from `reference`: edit counts and, per hypothesis token, whether it matched."""

    errors: int  # substitutions + deletions + insertions
    reference_length: int
    matched: list[bool]  # one per hypothesis token: False where it is a substitution or an insertion


def align(reference: list[str], hypothesis: list[str]) -> Alignment:
    """Levenshtein alignment of two token lists (unit costs), with the hypothesis tokens that match marked."""
    n, m = len(reference), len(hypothesis)
    d = np.zeros((n + 1, m + 1), dtype=np.int32)
    d[:, 0] = np.arange(n + 1)
    d[0, :] = np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i, j] = min(d[i - 1, j] + 1, d[i, j - 1] + 1, d[i - 1, j - 1] + (reference[i - 1] != hypothesis[j - 1]))
    matched = [False] * m
    i, j = n, m
    # Back through the table. Where paths tie, a match first, then an insertion or deletion before a
    # substitution: a substitution taken early can pair every later word with the wrong one.
    while i > 0 and j > 0:
        if reference[i - 1] == hypothesis[j - 1] and d[i, j] == d[i - 1, j - 1]:
            matched[j - 1] = True
            i, j = i - 1, j - 1
        elif d[i, j] == d[i, j - 1] + 1:
            j -= 1
        elif d[i, j] == d[i - 1, j] + 1:
            i -= 1
        else:
            i, j = i - 1, j - 1
    return Alignment(int(d[n, m]), n, matched)


def word_errors(text: str, transcript: str) -> Alignment:
    return align(normalize(text).split(), normalize(transcript).split())


def char_errors(text: str, transcript: str) -> Alignment:
    return align(list(normalize(text)), list(normalize(transcript)))


# -- engines ---------------------------------------------------------------------------------------------------

class AsrEngine:
    """A speech recogniser: a name (which the cache keys on), the sample rate it listens at, and `transcribe`,
    mono float32 audio at that rate in, text out. A second engine is a subclass added to `ENGINES`."""

    name: ClassVar[str]
    sample_rate: ClassVar[int]

    def transcribe(self, audio: np.ndarray) -> str:
        raise NotImplementedError


class MoonshineEngine(AsrEngine):
    """Moonshine base-en (Useful Sensors, MIT) from the `moonshine-cpp` 0.1.4 wheel: its encoder and decoder
    `.ort` files and its own ONNX Runtime library ship inside, so it runs offline.

    The wheel's `MoonshineModel.transcribe` is broken (it calls `ctypes.c_float_p`, which does not exist), so
    this calls the library's `moonshine_transcribe` with a float32 pointer itself."""

    name = "moonshine-base-en (moonshine-cpp 0.1.4)"
    sample_rate = 16_000

    def __init__(self) -> None:
        try:
            import moonshine_cpp
        except ImportError:
            raise PipelineError(f"asr: the ASR engine is not installed: {EXTRA}") from None
        except OSError as e:  # its shared libraries failed to load
            raise PipelineError(f"asr: moonshine-cpp cannot load its library: {e}") from None
        self._lib = moonshine_cpp.moonshine_lib
        self._model = moonshine_cpp.MoonshineModel()  # base-en, from the wheel's own files

    def transcribe(self, audio: np.ndarray) -> str:
        import ctypes

        audio = np.ascontiguousarray(audio, dtype=np.float32)
        text = ctypes.c_char_p(0)
        error = self._lib.moonshine_transcribe(self._model.model_handle,
                                               audio.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                               audio.size, ctypes.byref(text))
        if error != 0:
            raise PipelineError(f"asr: moonshine_transcribe failed with error {error} on {audio.size} samples")
        try:
            return (text.value or b"").decode("utf-8", errors="replace").strip()
        finally:
            self._lib.moonshine_free_text(text)


ENGINES: dict[str, type[AsrEngine]] = {"moonshine": MoonshineEngine}
DEFAULT_ENGINE = "moonshine"


def installed(engine: str = DEFAULT_ENGINE) -> bool:
    """Whether the engine's package and the extra's other parts (soxr, num2words) can be imported."""
    import importlib.util

    needs = {"moonshine": ["moonshine_cpp", "soxr", "num2words"]}[engine]
    return all(importlib.util.find_spec(m) is not None for m in needs)


def require_installed(where: str = "asr", engine: str = DEFAULT_ENGINE) -> None:
    if not installed(engine):
        raise PipelineError(f"{where}: the ASR extra is not installed: {EXTRA}")


_LOADED: dict[str, AsrEngine] = {}


def load_engine(engine: str = DEFAULT_ENGINE) -> AsrEngine:
    """The engine, loaded once per process (Moonshine takes a second to load its two models)."""
    require_installed(engine=engine)
    if engine not in _LOADED:
        _LOADED[engine] = ENGINES[engine]()
    return _LOADED[engine]


def resample(audio: np.ndarray, rate: int, to: int) -> np.ndarray:
    """`audio` at `rate` Hz, at `to` Hz (soxr, high quality)."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if rate == to:
        return audio
    import soxr

    return soxr.resample(audio, rate, to, quality="HQ").astype(np.float32)


# -- the transcript cache ----------------------------------------------------------------------------------------

def cache_root() -> Path:
    """Where transcripts are kept: `asr/` in the user's cache folder ($TTS_PIPELINE_CACHE, else
    ~/.cache/tts-onnx-pipeline)."""
    from pipeline.core.hashing import cache_home

    return cache_home() / "asr"


class TranscriptCache:
    """Transcripts by (engine, the audio's sample rate and samples), one small text file each. A file appears
    whole (written aside, then renamed); a cache that cannot be written costs time, never the result."""

    def __init__(self, engine: AsrEngine, root: Path | None = None):
        self.engine = engine
        self.root = root or cache_root()

    def key(self, audio: np.ndarray, rate: int) -> str:
        h = hashlib.sha256(f"{self.engine.name}\n{rate}\n".encode())
        h.update(np.ascontiguousarray(audio, dtype=np.float32).tobytes())
        return h.hexdigest()

    def transcribe(self, audio: np.ndarray, rate: int) -> tuple[str, bool]:
        """(transcript, whether it came from the cache)."""
        path = self.root / (key := self.key(audio, rate))[:2] / f"{key}.txt"
        try:
            return path.read_text(encoding="utf-8"), True
        except OSError:
            pass
        text = self.engine.transcribe(resample(audio, rate, self.engine.sample_rate))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            pass
        return text, False


# -- the measurement -----------------------------------------------------------------------------------------

def measure_asr(pairs: list[tuple[np.ndarray, np.ndarray]], texts: list[str], sample_rate: int,
                engine: str = DEFAULT_ENGINE, progress: Callable[[str], None] = lambda m: None) -> AsrSummary:
    """WER and CER of the reference's and the candidate's audio of each sentence, against its text.

    `pairs` are (reference, candidate) waveforms at `sample_rate`, one per text. A reference shorter than
    0.1 s is an error (that output is not speech); a candidate that short is scored as saying nothing."""
    from pipeline.evaluation.results import AsrSentence, AsrSummary

    if len(pairs) != len(texts):
        raise PipelineError(f"asr: {len(pairs)} audio samples but {len(texts)} texts")
    cache = TranscriptCache(load_engine(engine))
    sentences, cached = [], 0
    for i, ((reference, candidate), text) in enumerate(zip(pairs, texts)):
        progress(f"transcribing sentence {i + 1}/{len(texts)}")
        if reference.size < MIN_SECONDS * sample_rate:
            raise PipelineError(f"asr: sample {i}: the reference's audio is {reference.size / sample_rate:.3f} s, "
                                f"shorter than {MIN_SECONDS} s: not speech to transcribe (is the audio output "
                                f"the right one, and its sample rate?)")
        ref_text, hit = cache.transcribe(reference, sample_rate)
        cached += hit
        cand_text = cache.transcribe(candidate, sample_rate)[0] if candidate.size >= MIN_SECONDS * sample_rate \
            else ""
        sentences.append(score_sentence(text, ref_text, cand_text))
    return AsrSummary.of(sentences, engine=cache.engine.name, cached_references=cached)


def score_sentence(text: str, reference: str, candidate: str):
    from pipeline.evaluation.results import AsrSentence

    wr, wc = word_errors(text, reference), word_errors(text, candidate)
    cr, cc = char_errors(text, reference), char_errors(text, candidate)
    return AsrSentence(text=text, reference_transcript=reference, candidate_transcript=candidate,
                       words=wr.reference_length, chars=cr.reference_length,
                       word_errors_reference=wr.errors, word_errors_candidate=wc.errors,
                       char_errors_reference=cr.errors, char_errors_candidate=cc.errors)


def differing_words(reference_transcript: str, candidate_transcript: str) -> list[tuple[str, bool]]:
    """The candidate transcript's words (normalised), each with whether it differs from the reference
    transcript's: what the HTML report marks under the audio players."""
    hypothesis = normalize(candidate_transcript).split()
    a = align(normalize(reference_transcript).split(), hypothesis)
    return [(w, not ok) for w, ok in zip(hypothesis, a.matched)]
