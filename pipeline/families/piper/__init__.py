"""Piper/VITS voices: a `.onnx` with its `.onnx.json` beside it, phonemized sentences in, audio out.

What the core learns from here: a voice is recognised by its `.onnx.json`
sidecar (copied along with every result, so the shrunk voice drops into Piper
unchanged); it is calibrated and evaluated on real sentences phonemized with
the voice's own phoneme map (noise at 0, so runs compare sample for sample);
its audio comes out of output 0 at the sample rate its config names; and
`Ceil` over the duration predictor's output is the tensor that pins durations
when a candidate's length changed. The split encoder/decoder chain and the
streaming runtime (`streaming.py`) build on the same voice.
"""
from __future__ import annotations

import json
from pathlib import Path

from calibration import DATA_DIR

from pipeline.core.feeds import Feeds
from calibration.piper_sentences import PiperSentences, load_phonemizer, phoneme_ids, piper_feeds
from calibration import read_sentences

from pipeline.core.audio import SAMPLE_RATE, MelSettings
from pipeline.core.errors import PipelineError
from pipeline.core.modelset import ModelSet
from .. import AudioOutput, Family, SpeechBatch

# Piper's VITS rounds its predicted durations up here (w_ceil): frames per phoneme.
DURATIONS = "/Ceil_output_0"
EVAL_SENTENCES = DATA_DIR / "eval_en.txt"


def voice_config(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + ".json")


def _config_of(ms: ModelSet) -> Path | None:
    """The voice config a model set carries as its sidecar, if it does."""
    return next((ms.root / f for f in ms.sidecars if f.endswith(".onnx.json")), None)


def _sample_rate(config: Path | None) -> int:
    if config is None or not config.is_file():
        return SAMPLE_RATE
    try:
        return int(json.loads(config.read_text(encoding="utf-8"))["audio"]["sample_rate"])
    except (OSError, ValueError, KeyError, TypeError):
        return SAMPLE_RATE


class PiperFamily(Family):
    name = "piper"
    description = "Piper/VITS voices (.onnx + .onnx.json): phonemized sentences in, audio out"
    sources = (PiperSentences,)
    no_targets = "a Piper voice comes as ONNX; its PyTorch form (piper's training checkpoint) is not available here"

    def recognizes(self, model_path: Path, model) -> bool:
        return voice_config(model_path).is_file()

    def missing(self, model_path: Path, model) -> str | None:
        inputs = {i.name for i in model.graph.input}
        if {"input", "input_lengths", "scales"} <= inputs and not voice_config(model_path).is_file():
            return (f"{model_path.name} looks like a Piper voice (inputs input, input_lengths, scales), but "
                    f"{voice_config(model_path).name} is not beside it: Piper's runtime reads it (sample rate, "
                    f"phoneme map); put it there, or describe the audio in the recipe (model.audio)")
        return None

    def sidecars(self, model_path: Path) -> list[Path]:
        return [p for p in [voice_config(model_path)] if p.is_file()]

    def audio(self, ms: ModelSet | None) -> AudioOutput:
        return AudioOutput(mel=MelSettings(sample_rate=_sample_rate(_config_of(ms) if ms is not None else None)),
                           durations=DURATIONS)

    def eval_source(self, model_path, ms):
        return "piper", {"sentences": str(EVAL_SENTENCES)}

    def bench_inputs(self, model_path: Path, count: int, sentences: Path | None) -> tuple[list[str], list[Feeds]]:
        config = voice_config(model_path)
        if not config.is_file():
            raise PipelineError(f"{model_path}: no {config.name} next to it; bench needs a Piper voice config")
        texts = read_sentences(sentences or EVAL_SENTENCES)[:count]
        if not texts:
            raise PipelineError("bench: no evaluation sentences")
        voice = load_phonemizer(config)
        return texts, [piper_feeds(phoneme_ids(voice, t)) for t in texts]

    def speech(self, ms: ModelSet, text: str, voice: str | None) -> list[SpeechBatch]:
        if voice is not None:
            raise PipelineError(f"--voice {voice}: a Piper voice is one speaker, its own model; give another "
                                f"voice's .onnx instead")
        config = _config_of(ms)
        if config is None:
            raise PipelineError(f"{ms.root}: no Piper voice config (.onnx.json) in this model set; pipeline say "
                                f"needs its phoneme map")
        ids = phoneme_ids(load_phonemizer(config), text)
        if not ids:
            raise PipelineError(f"text {text!r} has no phonemes: nothing to speak")
        return [SpeechBatch(f"{len(ids)} phoneme ids", piper_feeds(ids))]
