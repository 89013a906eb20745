"""Piper source: real sentences phonemized through the voice's own phoneme map.

Uses piper-tts's phonemizer (it bundles espeak-ng, so it works offline) and the
voice's `.onnx.json`, exactly as `PiperVoice.synthesize` does, so calibration
sees the ids the voice sees in use.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydantic import Field

from pipeline.core.errors import PipelineError

from . import PATH, SentenceSource, SentencesParams

from pipeline.core.feeds import Feeds


class PiperParams(SentencesParams):
    config: str | None = Field(default=None, json_schema_extra=PATH)  # voice .onnx.json; default: its sidecar
    # Piper's `scales` input: noise_scale and noise_w scale standard normal noise (a negative scale is no voice's
    # setting); length_scale stretches the durations, and at 0 or below there are no frames to speak.
    noise_scale: float = Field(default=0.0, ge=0, description="noise of the flow's prior (0: deterministic)")
    length_scale: float = Field(default=1.0, gt=0, description="speaking slowness: durations times this")
    noise_w: float = Field(default=0.0, ge=0, description="noise of the duration predictor (0: deterministic)")


def load_phonemizer(config_path: Path):
    """A PiperVoice without a session: only its phonemize/phonemes_to_ids are used."""
    from piper import PiperVoice
    from piper.config import PiperConfig

    try:
        config = PiperConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError) as e:
        raise PipelineError(f"cannot read Piper voice config {config_path}: {e}") from None
    return PiperVoice(session=None, config=config)


def phoneme_ids(voice, text: str) -> list[int]:
    """All sentences of `text` joined into one id sequence, as one utterance."""
    ids: list[int] = []
    for sentence in voice.phonemize(text):
        if sentence:
            ids.extend(voice.phonemes_to_ids(sentence))
    return ids


def piper_feeds(ids: list[int], noise_scale: float = 0.0, length_scale: float = 1.0, noise_w: float = 0.0) -> Feeds:
    return {
        "input": np.array([ids], dtype=np.int64),
        "input_lengths": np.array([len(ids)], dtype=np.int64),
        "scales": np.array([noise_scale, length_scale, noise_w], dtype=np.float32),
    }


class PiperSentences(SentenceSource):
    """Real English sentences -> phoneme ids -> (input, input_lengths, scales)."""

    name = "piper"
    Params = PiperParams
    default_sentences = "sentences_en.txt"

    def _config_path(self) -> Path:
        if self.params.config:
            return self.ctx.resolve(self.params.config)
        sidecar = self.ctx.model_path.with_name(self.ctx.model_path.name + ".json")
        if not sidecar.is_file():
            raise PipelineError(f"calibration source 'piper' needs the voice config: no {sidecar.name} next to "
                                f"the model; set calibration.params.config")
        return sidecar

    def feeds(self) -> Iterator[Feeds]:
        voice = load_phonemizer(self._config_path())
        p = self.params
        self.spoken = []
        for text in self.sentences():
            ids = phoneme_ids(voice, text)
            if ids:
                self.spoken.append(text)
                yield piper_feeds(ids, p.noise_scale, p.length_scale, p.noise_w)

    def describe(self) -> str:
        return f"piper sentences ({self.params.sentences or 'shipped set'})"
