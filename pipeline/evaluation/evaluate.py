"""The evaluation engine: one entry point for the per-block error and the output metrics of any ModelSet.

`evaluate(reference, candidate, samples, family, ...)` covers the three shapes
a ModelSet takes:
- **one graph**: blocks inside it, isolated and accumulated (`blockwise.compare_models`);
- **a dataflow chain** (a graph cut into encoder -> decoder): every graph's
  blocks, each graph fed what the FP32 chain feeds it (captured through the
  family), named `graph:block`; plus the whole chain's output against the
  uncut FP32 model (`chain:<graph>`), where the output metrics apply;
- **an autoregressive loop** (the family says so): each graph is a block, the
  family's loop runs the teacher-forced chain (`Family.check_loop`).
Output metrics (audio at the family's sample rate, tokens, a family's own)
come from `metrics.metrics_for`; the thresholds are checked by the metrics
that own them. The result is a `results.CheckReport`; its JSON is report.json.
Where the outputs are audio, the report also carries the worst and a typical
sample's waveforms (`CheckReport.audio_examples`), taken from the output a
user hears: the graph's first output, or the whole chain's.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core import progress as progress_display
from pipeline.core.errors import PipelineError
from pipeline.core.feeds import Feeds
from pipeline.core.modelset import ModelSet
from pipeline.core.onnx_io import load_mapped, load_onnx
from pipeline.core.procinfo import release_free_memory
from pipeline.core.recipe import BlockSpec
from pipeline.evaluation.blockwise import Pooled, compare_models
from pipeline.evaluation.metrics import AudioMetric, Metric, metrics_for
from pipeline.evaluation.results import CheckReport, OutputResult

if TYPE_CHECKING:
    from pipeline.families import Family


def evaluate(reference: ModelSet, candidate: ModelSet, samples: list[Feeds], family: Family, *,
             blocks: BlockSpec | None = None, fp32_twin: ModelSet | None = None, sensitivity: bool = False,
             decode_steps: int = 16, asr_texts: list[str] | None = None,
             progress: Callable[[str], None] = lambda m: None) -> CheckReport:
    """Candidate vs reference on `samples` (the entry graph's feeds), as a typed report.

    `fp32_twin` is the FP32 ModelSet with the candidate's graph names (what a split made of the
    reference): a chain's downstream graphs are fed from it. `asr_texts` (what each sample speaks) adds the
    ASR check of the audio a user hears (`report.asr`)."""
    # The metrics of the output a user hears, which the audio examples come from: one graph's first output,
    # or the whole chain's entry (appended last).
    heard: list[Metric] = []
    heard_entry = 0
    if family.autoregressive:
        report = family.check_loop(reference, candidate, samples, decode_steps, progress)
    elif candidate.names() == reference.names() and len(reference.names()) == 1:
        heard = metrics_for(family, reference)
        report = compare_graphs(reference.path(reference.names()[0]), candidate.path(candidate.names()[0]), samples,
                                blocks, heard, sensitivity=sensitivity, durations=declared_durations(family, reference),
                                progress=progress)
    else:
        heard, heard_entry = [m for m in metrics_for(family, reference) if m.per_sample], -1
        report = _chain(reference, fp32_twin or reference, candidate, samples, blocks, family, heard, progress)
    report.family = family.name
    if heard:
        keep_audio_examples(report, heard, report.outputs[heard_entry].name)
    if asr_texts is not None:
        add_asr(report, heard, asr_texts, progress)
    return report


def add_asr(report: CheckReport, metrics: list[Metric], texts: list[str],
            progress: Callable[[str], None] = lambda m: None) -> None:
    """The ASR check (`asr.measure_asr`) of the waveforms the audio metric among `metrics` kept, into
    `report.asr`; a model without audio is an error naming its family."""
    from pipeline.evaluation.asr import measure_asr

    audio = next((m for m in metrics if isinstance(m, AudioMetric) and m.comparisons), None)
    if audio is None:
        raise PipelineError(f"asr: a {report.family or 'this'} model's outputs are not audio: nothing to transcribe")
    report.asr = measure_asr(audio.waveforms, texts, audio.spec.sample_rate, progress=progress)


def keep_audio_examples(report: CheckReport, metrics: list[Metric], output: str) -> None:
    """Add the worst and a typical sample that the audio metric among `metrics` measured on `output` (a report
    entry's name) to `report`, waveforms included; nothing when the outputs are not audio."""
    audio = next((m for m in metrics if isinstance(m, AudioMetric) and m.comparisons), None)
    for example, reference, candidate in audio.examples(output) if audio is not None else []:
        report.add_audio_example(example, reference, candidate)


def declared_durations(family: Family, ms: ModelSet) -> list[str] | None:
    """The durations tensor the family (or the recipe, through it) names; None: let the check find them."""
    audio = family.audio(ms)
    return [audio.durations] if audio is not None and audio.durations else None


def compare_graphs(reference: Path, candidate: Path, samples: list[Feeds], blocks: BlockSpec | None,
                   metrics: list[Metric], sensitivity: bool = False, durations: list[str] | None = None,
                   progress: Callable[[str], None] = lambda m: None) -> CheckReport:
    """Per-block report of one candidate graph file against one reference graph file (`durations`: see
    `blockwise.compare_models`).

    Both are loaded light (`load_mapped`): their sessions map the weights from a data file, so each model's weights
    are in memory once, however many sessions of it the check runs (a model holding its weights itself is written
    out once into a scratch folder for this). Sensitivity splices the two graphs' weights: it loads them whole."""
    if sensitivity:
        ref, cand = load_onnx(reference), load_onnx(candidate)
        return compare_models(ref, cand, samples, blocks, metrics=metrics, reference_label=_label(reference),
                              candidate_label=_label(candidate), sensitivity=True, durations=durations, owned=True,
                              progress=progress)
    release_free_memory()  # what the work before freed (a run's last step, its final/): not under the loading
    with tempfile.TemporaryDirectory(prefix="pipeline-check-") as scratch:
        progress("mapping the weights")
        ref, ref_dir = load_mapped(reference, Path(scratch) / "reference")
        cand, cand_dir = load_mapped(candidate, Path(scratch) / "candidate")
        return compare_models(ref, cand, samples, blocks, metrics=metrics, reference_label=_label(reference),
                              candidate_label=_label(candidate), weights_dirs=(ref_dir, cand_dir),
                              durations=durations, owned=True, progress=progress)


def _chain(monolithic: ModelSet, reference: ModelSet, candidate: ModelSet, entry_feeds: list[Feeds],
           blocks: BlockSpec | None, family: Family, sample_metrics: list[Metric],
           progress: Callable[[str], None]) -> CheckReport:
    """Every graph's blocks fed by the FP32 chain, and the whole chain's output measured by `sample_metrics`."""
    from pipeline.evaluation.chain import ChainRunner, sink_graphs

    sinks = sink_graphs(candidate)
    parts: list[CheckReport] = []
    cache: dict[str, list[Feeds]] = {}
    for graph in progress_display.track(candidate.names(), "check: graphs"):
        progress(f"{graph}: capturing inputs")
        feeds = family.capture(reference, entry_feeds, graph, cache, lambda done, total: None)
        # Each graph's own output metrics are diagnostics (fed the FP32 upstream); the whole chain's count.
        metrics = metrics_for(family, monolithic) if graph in sinks else []
        part = compare_graphs(reference.path(graph), candidate.path(graph), feeds, blocks, metrics,
                              durations=declared_durations(family, monolithic),
                              progress=lambda m, g=graph: progress(f"{g}: {m}"))
        for b in part.blocks:
            b.block = f"{graph}:{b.block}"
        for o in part.outputs:
            o.name = f"{graph}:{o.name}"
        for c in part.length_changes or []:
            c.block = None if c.block is None else f"{graph}:{c.block}"
            c.tensor = f"{graph}:{c.tensor}"
        part.notes = [f"{graph}: {n}" for n in part.notes]
        parts.append(part)
    progress("whole chain vs the reference")
    # The reference is the uncut FP32 model, or, for a ModelSet that was a chain from the start, that chain.
    mono, chain, mono_sink = ChainRunner(monolithic), ChainRunner(candidate), sink_graphs(monolithic)[0]
    whole = Pooled()
    for f in entry_feeds:
        ref = next(iter(mono.run(f)[mono_sink][1].values()))
        cand = next(iter(chain.run(f)[sinks[0]][1].values()))
        if ref.shape == cand.shape:
            whole.update(ref, cand)
        for m in sample_metrics:
            m.update(ref, cand)
    heard = OutputResult.measured(f"chain:{sinks[0]}", whole.stats(), {m.key: m.to_json() for m in sample_metrics})
    names = monolithic.names()
    return CheckReport.new(
        samples=parts[0].samples,
        reference=f"{monolithic.path(names[0]).name if len(names) == 1 else monolithic.root.name} (FP32)",
        candidate=f"{candidate.root.name}/ ({' -> '.join(candidate.names())})",
        notes=[n for p in parts for n in p.notes], peak_rss_mb=max(p.peak_rss_mb for p in parts),
        wall_s=sum(p.wall_s for p in parts), blocks=[b for p in parts for b in p.blocks],
        outputs=[*(o for p in parts for o in p.outputs), heard],
        **({"length_changes": changes} if (changes := [c for p in parts for c in p.length_changes or []]) else {}))


def _label(path: Path) -> str:
    """How a report names a graph file: `run/final/x.onnx`, a step's `01-dequantize/x.onnx` (a check measured
    against a step, `check.reference`), else the file's name (the base, a file given to compare)."""
    if path.parent.name == "final":
        return f"{path.parent.parent.name}/{path.parent.name}/{path.name}"
    if path.parent.parent.name == "steps" and not path.parent.name.startswith("00-"):
        return f"{path.parent.name}/{path.name}"
    return path.name
