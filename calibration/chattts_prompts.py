"""ChatTTS source: real Chinese and English sentences as text-token prompts.

With the asset's tokenizer (`asset/tokenizer`, a BertTokenizerFast, loaded
offline with transformers) the ids are the real ones. Without it the ids are
sampled: one reproducible sequence per sentence (seeded by the sentence's
hash, about one token per two characters), and `describe()` says so plainly,
since the activations they give are only as real as the weights are.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydantic import Field

from pipeline.core.errors import PipelineError

from . import PATH, SentenceSource, SentencesParams

from pipeline.core.feeds import Feeds


class ChatTTSParams(SentencesParams):  # default sentences: the shipped 51 Chinese and English prompts
    tokenizer: str | None = Field(default=None, json_schema_extra=PATH)  # the asset's tokenizer folder; none: sampled ids
    vocab: int = Field(default=21178, ge=2)  # text vocabulary, for sampled ids


class ChatTTSPrompts(SentenceSource):
    name = "chattts"
    Params = ChatTTSParams
    default_sentences = "chattts_prompts.txt"

    def prompts(self) -> list[list[int]]:
        if self.params.tokenizer:
            return [self._tokenize(s) for s in self.sentences()]
        return [sampled_ids(s, self.params.vocab) for s in self.sentences()]

    def _tokenize(self, text: str) -> list[int]:
        if not hasattr(self, "_tok"):
            self._tok = load_tokenizer(self.ctx.resolve(self.params.tokenizer))
        return list(self._tok.encode(text, add_special_tokens=False))

    def feeds(self) -> Iterator[Feeds]:
        for ids in self.prompts():
            yield {"input_ids": np.array([ids], dtype=np.int64)}

    def describe(self) -> str:
        how = f"tokenizer {self.params.tokenizer}" if self.params.tokenizer else "SAMPLED ids (no tokenizer)"
        return f"chattts prompts ({how})"


def sampled_ids(text: str, vocab: int) -> list[int]:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    n = max(4, len(text) // 2)
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def load_tokenizer(folder: Path):
    """The asset's tokenizer folder (a BertTokenizerFast), loaded offline."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise PipelineError("the ChatTTS tokenizer needs transformers (pip install transformers)") from None
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise PipelineError(f"cannot load the tokenizer in {folder}: {str(e).splitlines()[0]}") from None
