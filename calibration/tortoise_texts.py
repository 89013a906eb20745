"""Tortoise source: real English sentences as Tortoise text tokens, with a real voice's conditioning latent.

The shipped sentences' ids (`data/tortoise_tokens.json`) were made by
`calibration/make_tortoise_tokens.py` with Tortoise's own tokenizer and checked
against its `VoiceBpeTokenizer`, so no tokenizer is needed at run time:
`tortoise_sentences.txt` (40, calibration) and `tortoise_eval.txt` (10, held
out: what the check evaluates on). Other sentences: `sentences` plus
`tokenizer` (Tortoise's `tokenizer.json`; needs the `tokenizers` package).

The conditioning latent is the model's own conditioning graph on real speech:
by default two clips of the Piper voice that installs with this package,
log-mel at 22050 Hz as Tortoise's conditioning mels are (n_fft 1024, hop 256,
80 bands to 8 kHz; Tortoise also divides by its mel_norms, which are not
shipped here), or a latent you give (`conditioning`: a .npy [dim] or [1, dim],
e.g. from Tortoise's get_conditioning_latents). The family hands the source
its model set's conditioning graph before any feed is drawn.

Each feed is what the prefill graph takes to generate: `text_ids` [1, T],
`cond_latent` [1, dim], `mel_ids` [[start_mel]].
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from pydantic import Field

from pipeline.core.errors import PipelineError

from . import DATA_DIR, PATH, SentencesParams, SentenceSource

from pipeline.core.feeds import Feeds

TOKENS = DATA_DIR / "tortoise_tokens.json"
# What the default voice says for its two reference clips (as a user records two clips of a voice).
REFERENCE_TEXTS = ("The quick brown fox jumps over the lazy dog near the river bank.",
                   "Every morning she walks to the station and buys a newspaper.")


class TortoiseParams(SentencesParams):  # default sentences: the shipped 40
    tokenizer: str | None = Field(default=None, json_schema_extra=PATH)  # tokenizer.json, for your own sentences
    conditioning: str | None = Field(default=None, json_schema_extra=PATH)  # a .npy latent; default: Piper speech
    held_out: bool = False  # the shipped held-out sentences (tortoise_eval.txt): what the check evaluates on
    start_mel: int = Field(default=8192, ge=0)  # set from the model set by the family


class TortoiseTexts(SentenceSource):
    name = "tortoise"
    Params = TortoiseParams
    default_sentences = "tortoise_sentences.txt"
    conditioning_graph: Callable[[np.ndarray], np.ndarray] | None = None  # mels -> latent, set by the family

    @property
    def shipped(self) -> str:
        return "tortoise_eval.txt" if self.params.held_out else self.default_sentences

    def sentences(self) -> list[str]:
        if self.params.held_out and self.params.sentences:
            raise PipelineError("calibration source 'tortoise': 'held_out' picks the shipped held-out sentences; "
                                "leave it out with your own 'sentences'")
        from . import read_sentences

        if self.params.sentences:
            return super().sentences()
        return self.pick(read_sentences(DATA_DIR / self.shipped), DATA_DIR / self.shipped)

    def token_ids(self) -> list[list[int]]:
        p = self.params
        texts = self.sentences()
        if p.tokenizer:
            from .make_tortoise_tokens import encode, load_tokenizer

            tok = load_tokenizer(self.ctx.resolve(p.tokenizer))
            return [encode(tok, t) for t in texts]
        if p.sentences:
            raise PipelineError("calibration source 'tortoise': your own sentences need 'tokenizer' (Tortoise's "
                                "tokenizer.json); the shipped sentences come with their ids")
        return shipped_ids(self.shipped)[p.skip:][: len(texts)]

    def latent(self) -> np.ndarray:
        p = self.params
        if p.conditioning:
            path = self.ctx.resolve(p.conditioning)
            try:
                latent = np.load(path)
            except (OSError, ValueError) as e:
                raise PipelineError(f"conditioning latent {path}: not a readable .npy: {e}") from None
            return np.asarray(latent, np.float32).reshape(1, -1)
        if self.conditioning_graph is None:
            raise PipelineError("calibration source 'tortoise' needs the model set's conditioning graph (an "
                                "exported Tortoise model set) or a 'conditioning' latent")
        return self.conditioning_graph(reference_mels())

    def feeds(self) -> Iterator[Feeds]:
        latent = self.latent()
        for ids in self.token_ids():
            yield {"text_ids": np.array([ids], np.int64), "cond_latent": latent,
                   "mel_ids": np.array([[self.params.start_mel]], np.int64)}

    def describe(self) -> str:
        voice = self.params.conditioning or "Piper joe voice through the conditioning graph"
        return f"tortoise texts ({self.params.sentences or self.shipped}; latent: {voice})"


def shipped_ids(name: str) -> list[list[int]]:
    data = json.loads(TOKENS.read_text())
    if name not in data["sentences"]:
        raise PipelineError(f"{TOKENS}: no token ids for {name}")
    return data["sentences"][name]


_MELS: list[np.ndarray] = []


def reference_mels(voice: Path | None = None) -> np.ndarray:
    """Two clips of real speech as Tortoise's conditioning input [1, 2, 80, frames] (one length: the shorter)."""
    if not _MELS:
        from .piper_mels import speech_mels

        mels = [f["mel"][0] for _, _, f in speech_mels(list(REFERENCE_TEXTS), voice)]
        frames = min(m.shape[1] for m in mels)
        _MELS.append(np.stack([m[:, :frames] for m in mels])[None].astype(np.float32))
    return _MELS[0]
