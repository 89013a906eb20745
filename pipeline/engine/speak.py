"""`pipeline say`: speak a text with a model, through its family's text front end, so an engineer can listen to a
result before and after without writing code.

The model is a run folder (its `final/`), a model set folder, or a plain .onnx (with its sidecars beside it). The
family turns the text into one or more batches of feeds (Kokoro splits a text over 510 phonemes); each batch runs
through the whole model set (a chain of graphs in dataflow order) and the batches' audio is joined with a short
pause between them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.modelset import ModelSet

# Silence between two batches of one text: kokoro-onnx pauses about this long after a sentence.
PAUSE_S = 0.25


@dataclass
class Speech:
    audio: np.ndarray  # mono float32 in [-1, 1]
    sample_rate: int
    family: str
    batches: list[str]  # what each pass of the model spoke
    seconds: float  # wall time of the model's runs

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


def model_set(path: Path) -> ModelSet:
    """The model set a `say` argument names: a run folder's final/, a model set folder, or a plain .onnx."""
    from pipeline.engine.comparison import as_modelset, family_of_file

    if not path.exists():
        raise PipelineError(f"{path}: no such model, model set or run folder")
    if path.is_dir() and (path / "final").is_dir():
        path = path / "final"
    if path.is_dir():
        return ModelSet.read(path)
    if path.suffix != ".onnx":
        raise PipelineError(f"{path}: give a .onnx model, a model set folder or a run folder")
    return as_modelset(path, family_of_file(path))


def speak(path: Path, text: str, voice: str | None, threads: int = 2) -> Speech:
    from pipeline.evaluation.chain import ChainRunner, sink_graphs
    from pipeline.families import family_of

    if not text.strip():
        raise PipelineError("the text is empty: nothing to speak")
    ms = model_set(path)
    family = family_of(ms)
    audio = family.audio(ms)
    if audio is None:
        raise PipelineError(f"{path}: a {family.name!r} model's outputs are not audio: nothing to listen to")
    batches = family.speech(ms, text, voice)
    runner = ChainRunner(ms, threads=threads)
    sink = sink_graphs(ms)[-1]
    pieces, t0 = [], time.perf_counter()
    for batch in batches:
        outputs = runner.run(batch.feeds)[sink][1]
        name = audio.output or next(iter(outputs))
        pieces.append(np.asarray(outputs[name], dtype=np.float32).reshape(-1))
    seconds = time.perf_counter() - t0
    pause = np.zeros(int(PAUSE_S * audio.sample_rate), dtype=np.float32)
    joined = [part for piece in pieces for part in (pause, piece)][1:]
    return Speech(np.concatenate(joined), audio.sample_rate, family.name, [b.label for b in batches], seconds)
