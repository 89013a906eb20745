"""Tortoise text tokens for the shipped sentences: writes `calibration/data/tortoise_tokens.json`.

    python -m calibration.make_tortoise_tokens --tokenizer PATH/tokenizer.json

`PATH/tokenizer.json` is Tortoise's text BPE (`tortoise/data/tokenizer.json` in the
tortoise-tts 3.0.0 sdist). This does what Tortoise's `VoiceBpeTokenizer.encode` does
(tortoise/utils/tokenizer.py), without importing tortoise:

    text = english_cleaners(text)         # see `clean` below
    text = text.replace(" ", "[SPACE]")
    ids = tokenizer.encode(text).ids      # tokenizers.Tokenizer.from_file(tokenizer.json)

The ids are raw: no start (255) or stop (0) token; the model adds them.

`english_cleaners` is: unidecode to ASCII, lowercase, expand numbers (inflect),
expand abbreviations ("mr." -> "mister", ...), collapse whitespace (`\\s+` -> " "),
delete double quotes. Only the parts that need no third-party data are implemented
here: lowercase, whitespace collapse and quote removal. A sentence that would need
the others is refused with an error naming it, rather than tokenized differently
from Tortoise:
  - any non-ASCII character (unidecode would transliterate it),
  - any digit (numbers, ordinals, decimals, "$5", "1,000" are spelled out by inflect),
  - any of Tortoise's abbreviations followed by a period ("mr.", "st.", "dr.", ...).
For such a sentence ASCII conversion and the two expansions are identity maps, so
`clean` below is exactly `english_cleaners`. A sentence whose cleaned text holds a
character outside the tokenizer's vocabulary (it would encode as [UNK]) is refused too.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

from pipeline.core.errors import PipelineError

from . import DATA_DIR
from . import read_sentences

FILES = ("tortoise_sentences.txt", "tortoise_eval.txt")
OUT = DATA_DIR / "tortoise_tokens.json"

_whitespace_re = re.compile(r"\s+")  # the same pattern Tortoise's collapse_whitespace uses
_digit_re = re.compile(r"[0-9]")
# The words Tortoise expands when followed by a period (its _abbreviations, matched case-insensitively
# at a word start); only detected here, to refuse them.
_ABBREVIATIONS = ("mrs", "mr", "dr", "st", "co", "jr", "maj", "gen", "drs", "rev", "lt", "hon", "sgt", "capt",
                  "esq", "ltd", "col", "ft")
_abbreviation_re = re.compile(r"\b(%s)\." % "|".join(_ABBREVIATIONS), re.IGNORECASE)
UNK = "[UNK]"


def clean(text: str) -> str:
    """Tortoise's `english_cleaners`, for the sentences it can do exactly; others raise PipelineError."""
    bad = sorted({c for c in text if ord(c) > 127})
    if bad:
        raise PipelineError(f"sentence {text!r} has non-ASCII characters {bad}: Tortoise transliterates them "
                            f"with unidecode, which this script does not implement")
    if _digit_re.search(text):
        raise PipelineError(f"sentence {text!r} has digits: Tortoise spells numbers out with inflect, which this "
                            f"script does not implement; write the number as words")
    m = _abbreviation_re.search(text)
    if m:
        raise PipelineError(f"sentence {text!r} has the abbreviation {m.group(0)!r}, which Tortoise expands; "
                            f"this script does not implement that; write the word out")
    # For ASCII text without digits or abbreviations, english_cleaners is exactly:
    text = text.lower()
    text = _whitespace_re.sub(" ", text)
    return text.replace('"', "")


def encode(tokenizer, text: str) -> list[int]:
    """`VoiceBpeTokenizer.encode`: clean, spaces to [SPACE], BPE ids."""
    cleaned = clean(text)
    ids = tokenizer.encode(cleaned.replace(" ", "[SPACE]")).ids
    unk = tokenizer.token_to_id(UNK)
    if not ids:
        raise PipelineError(f"sentence {text!r} has no tokens after cleaning")
    if unk in ids:
        missing = sorted({c for c in cleaned if c != " " and tokenizer.token_to_id(c) is None})
        raise PipelineError(f"sentence {text!r} encodes to [UNK]: characters {missing} are not in the "
                            f"Tortoise tokenizer's vocabulary")
    return ids


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a missing or malformed file
        raise PipelineError(f"cannot load Tortoise tokenizer {path}: {e}") from None


def build(tokenizer_path: Path, data_dir: Path = DATA_DIR, files: tuple[str, ...] = FILES) -> dict:
    tokenizer = load_tokenizer(tokenizer_path)
    sentences = {}
    for name in files:
        texts = read_sentences(data_dir / name)
        if not texts:
            raise PipelineError(f"{data_dir / name} has no sentences")
        sentences[name] = [encode(tokenizer, t) for t in texts]
    return {"tokenizer_sha256": hashlib.sha256(tokenizer_path.read_bytes()).hexdigest(), "sentences": sentences}


def dumps(doc: dict) -> str:
    """JSON with one sentence's ids per line."""
    parts = []
    for name, seqs in doc["sentences"].items():
        rows = ",\n".join("    " + json.dumps(ids, separators=(",", ":")) for ids in seqs)
        parts.append(f"  {json.dumps(name)}: [\n{rows}\n  ]")
    body = ",\n".join(parts)
    return f'{{"tokenizer_sha256": {json.dumps(doc["tokenizer_sha256"])},\n "sentences": {{\n{body}\n }}}}\n'


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calibration.make_tortoise_tokens", description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, type=Path, help="Tortoise's tortoise/data/tokenizer.json")
    ap.add_argument("--out", type=Path, default=OUT, help=f"output JSON (default {OUT})")
    args = ap.parse_args(argv)
    try:
        doc = build(args.tokenizer)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = dumps(doc)
    assert json.loads(text) == doc
    args.out.write_text(text, encoding="utf-8")
    lengths = [len(ids) for seqs in doc["sentences"].values() for ids in seqs]
    print(f"wrote {args.out}: {len(lengths)} sentences, {min(lengths)}-{max(lengths)} tokens each, "
          f"tokenizer sha256 {doc['tokenizer_sha256'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
