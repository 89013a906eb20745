"""Glue between models on disk, input sources, the error check and its thresholds."""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from calibration import DATA_DIR, Feeds, SourceContext, checked_feeds, make_source

from .audio import compare_audio
from .check import Pooled, audio_summary, compare_models
from .errors import PipelineError
from .modelset import ModelSet
from .onnx_io import load_onnx
from .recipe import BlockSpec, CheckSpec, Recipe
from .report import as_float
from .sources import sidecars_of


def model_file(path: Path) -> Path:
    """A .onnx file, or the single graph of a ModelSet folder (a run's final/)."""
    if path.is_dir():
        ms = ModelSet.read(path)
        if len(ms.graphs) != 1:
            raise PipelineError(f"{path}: compare takes one-graph models; this model set has {len(ms.graphs)}")
        return ms.path(ms.graphs[0].name)
    return path


def is_piper_voice(path: Path) -> bool:
    return any(s.name.endswith(".onnx.json") for s in sidecars_of(path))


def produces_audio(path: Path, model) -> bool:
    """A Piper voice, or a vocoder: its first output is audio at 22050 Hz, measured with audio metrics."""
    return is_piper_voice(path) or takes_mels(model)


def takes_mels(model) -> bool:
    """A vocoder: one input named `mel` with 80 bands (HiFi-GAN's convention)."""
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1 or inputs[0].name != "mel":
        return False
    dims = inputs[0].type.tensor_type.shape.dim
    return len(dims) == 3 and dims[1].dim_value == 80


def eval_feeds(reference: Path, samples: int, recipe: Recipe | None = None, check: CheckSpec | None = None,
               npz: Path | None = None) -> list[Feeds]:
    """Inputs for a comparison: --npz, the check's source, the recipe's calibration, or Piper eval sentences."""
    model = load_onnx(reference)
    resolve = recipe.resolve_path if recipe else Path
    if npz is not None:
        source = make_source("npz", {"folder": str(npz)}, SourceContext(reference, resolve), where="--npz")
    elif check is not None and check.source is not None:
        source = make_source(check.source.source, check.source.params, SourceContext(reference, resolve),
                             where="check.source")
    elif is_piper_voice(reference):
        source = make_source("piper", {"sentences": str(DATA_DIR / "eval_en.txt")}, SourceContext(reference))
    elif takes_mels(model):
        source = make_source("piper_mels", {"sentences": str(DATA_DIR / "eval_en.txt")}, SourceContext(reference))
    elif recipe is not None and recipe.calibration is not None:
        source = make_source(recipe.calibration.source, recipe.calibration.params, SourceContext(reference, resolve),
                             where="calibration")
    else:
        raise PipelineError(f"{reference}: no inputs to compare on; give --npz DIR, or --recipe with a "
                            f"calibration or check source (a Piper voice, or a vocoder taking 80-band mels, "
                            f"uses the evaluation sentences by default)")
    feeds = checked_feeds(source, model, where="compare inputs")
    return feeds[:samples]


def run_compare(reference: Path, candidate: Path, feeds: list[Feeds], blocks: BlockSpec | None,
                sensitivity: bool = False, progress: Callable[[str], None] = lambda m: None,
                audio: bool | None = None) -> dict[str, Any]:
    """Per-block report of candidate vs reference; `audio` (default: the reference produces audio)
    adds audio metrics on the first output."""
    reference, candidate = model_file(reference), model_file(candidate)
    ref_model, cand_model = load_onnx(reference), load_onnx(candidate)
    audio = produces_audio(reference, ref_model) if audio is None else audio
    result = compare_models(ref_model, cand_model, feeds, blocks, audio=audio,
                            reference_label=_label(reference), candidate_label=_label(candidate),
                            sensitivity=sensitivity, progress=progress)
    return result.to_json()


def run_compare_chain(monolithic: Path, reference: ModelSet, candidate: ModelSet, entry_feeds: list[Feeds],
                      blocks: BlockSpec | None, audio: bool,
                      progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Per-block report of every graph of a chained candidate (a split voice), each graph fed what the
    FP32 chain feeds it, plus the whole chain's output against the monolithic FP32 model.

    Blocks and outputs are named `graph:block`, so one report covers them all."""
    from .chain import ChainRunner, graph_feeds, sink_graphs
    from .onnx_io import session

    sinks = sink_graphs(candidate)
    merged: dict[str, Any] | None = None
    for graph in candidate.names():
        progress(f"{graph}: capturing inputs")
        feeds = graph_feeds(reference, entry_feeds, graph)
        part = run_compare(reference.path(graph), candidate.path(graph), feeds, blocks,
                           audio=audio and graph in sinks, progress=lambda m, g=graph: progress(f"{g}: {m}"))
        for b in part["blocks"]:
            b["block"] = f"{graph}:{b['block']}"
        for o in part["outputs"]:
            o["name"] = f"{graph}:{o['name']}"
        part["notes"] = [f"{graph}: {n}" for n in part["notes"]]
        if merged is None:
            merged = part
        else:
            merged["blocks"] += part["blocks"]
            merged["outputs"] += part["outputs"]
            merged["notes"] += part["notes"]
            merged["peak_rss_mb"] = max(merged["peak_rss_mb"], part["peak_rss_mb"])
            merged["wall_s"] += part["wall_s"]
    assert merged is not None
    progress("whole chain vs the monolithic model")
    mono, chain = session(monolithic, spinning=False), ChainRunner(candidate)
    whole = Pooled()
    audio_cmp = []
    for f in entry_feeds:
        ref = mono.run(None, f)[0]
        out = chain.run(f)[sinks[0]][1]
        cand = next(iter(out.values()))
        if ref.shape == cand.shape:
            whole.update(ref, cand)
        if audio:
            audio_cmp.append(compare_audio(ref, cand))
    entry: dict[str, Any] = {"name": f"chain:{sinks[0]}", **whole.to_json()}
    if audio:
        entry["audio"] = audio_summary(audio_cmp)
    merged["outputs"].append(entry)
    merged["reference"] = f"{monolithic.name} (FP32)"
    merged["candidate"] = f"{candidate.root.name}/ ({' -> '.join(candidate.names())})"
    return merged


def _label(path: Path) -> str:
    return f"{path.parent.parent.name}/{path.parent.name}/{path.name}" if path.parent.name == "final" else path.name


def threshold_failures(report: dict[str, Any], check: CheckSpec) -> list[str]:
    """Every threshold the report misses, each with its numbers."""
    failures = []
    if check.min_sqnr_db is not None:
        for b in report["blocks"]:
            v = as_float(b["isolated"]["sqnr_db"])
            if b["matched"] and not math.isnan(v) and v < check.min_sqnr_db:
                failures.append(f"block {b['block']}: isolated SQNR {v:.1f} dB < {check.min_sqnr_db} dB")
    # In a chained model set the audio a user hears is the whole chain's: audio thresholds apply to it;
    # each graph's own audio metrics (fed the FP32 upstream) are diagnostics.
    chained = any(o["name"].startswith("chain:") for o in report["outputs"])
    for o in report["outputs"]:
        v = as_float(o["sqnr_db"])
        if check.min_output_sqnr_db is not None and v < check.min_output_sqnr_db:
            failures.append(f"output {o['name']}: SQNR {v:.1f} dB < {check.min_output_sqnr_db} dB")
        audio = o.get("audio") if not chained or o["name"].startswith("chain:") else None
        if check.max_log_mel is not None and audio and audio["log_mel_max"] > check.max_log_mel:
            failures.append(f"output {o['name']}: log-mel max {audio['log_mel_max']:.4f} > {check.max_log_mel}")
    return failures

