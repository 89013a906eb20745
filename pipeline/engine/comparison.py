"""Glue between models on disk, input sources and the evaluation engine (`pipeline compare`, the check)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from calibration import SourceContext
from pipeline.core.feeds import Feeds

from pipeline.core.errors import PipelineError
from pipeline.core.modelset import ModelSet
from pipeline.core.onnx_io import external_files, load_onnx
from pipeline.core.recipe import BlockSpec, CheckSpec, Recipe
from pipeline.evaluation.results import CheckReport
from pipeline.families import draw_samples

if TYPE_CHECKING:
    from pipeline.families import Family


def model_file(path: Path) -> Path:
    """A .onnx file, or the single graph of a ModelSet folder (a run's final/)."""
    if path.is_dir():
        ms = ModelSet.read(path)
        if len(ms.graphs) != 1:
            raise PipelineError(f"{path}: compare takes one-graph models; this model set has {len(ms.graphs)}")
        return ms.path(ms.graphs[0].name)
    return path


def input_files(path: Path, family: Family | None) -> list[Path]:
    """What a command reads for one model argument, so no report it writes lands on any of it: a folder as a
    whole, or a file with its external-data files and its family's sidecars (a voice's .onnx.json)."""
    if not path.is_file():
        return [path]
    found = [path, *(family.sidecars(path) if family is not None else [])]
    if path.suffix == ".onnx":
        try:
            found += external_files(path)
        except PipelineError:
            pass  # not a readable model: the command says so when it loads it
    return found


def family_of_file(path: Path) -> Family:
    """The family of a .onnx file or of a ModelSet folder (its metadata, else detected from the file)."""
    from pipeline.families import detect_family, family_of

    return family_of(ModelSet.read(path)) if path.is_dir() else detect_family(path)


def as_modelset(path: Path, family: Family) -> ModelSet:
    """The ModelSet a graph file belongs to: its folder's, or a one-graph set around a plain file."""
    from pipeline.core.modelset import GraphFile

    if path.is_dir():
        return ModelSet.read(path)
    if (path.parent / "modelset.json").is_file():
        return ModelSet.read(path.parent)
    return ModelSet(path.parent, [GraphFile("model", path.name)], {p.name: "model" for p in family.sidecars(path)})


@dataclass
class EvalInputs:
    """A comparison's inputs: the feeds, what they are (for the report), and the text each speaks where the
    source knows it (None otherwise), for the ASR check."""

    feeds: list[Feeds]
    description: str
    texts: list[str] | None


def eval_feeds(reference: Path, samples: int | Literal["all"], family: Family, recipe: Recipe | None = None,
               check: CheckSpec | None = None, npz: Path | None = None,
               ms: ModelSet | None = None, strict: bool = False) -> EvalInputs:
    """Inputs for a comparison, checked against `reference` (the entry graph), and what they are: --npz,
    the check's source, the family's evaluation inputs, or the recipe's calibration source.

    `samples`: the first that many, or `all`. A count the user gave (`strict`, or a recipe's `check.samples`)
    larger than the inputs hold is an error naming both numbers; the default (8, not written in the recipe)
    takes at most that many, as always."""
    model = load_onnx(reference)
    resolve = recipe.resolve_path if recipe else Path
    spec = family.eval_source(reference, ms)
    if npz is not None:
        name, params, where = "npz", {"folder": str(npz)}, "--npz"
    elif check is not None and check.source is not None:
        name, params, where = check.source.source, check.source.params, "check.source"
    elif spec is not None:
        (name, params), where = spec, "evaluation inputs"
    elif recipe is not None and recipe.calibration is not None:
        name, params, where = recipe.calibration.source, recipe.calibration.params, "calibration"
    else:
        raise PipelineError(f"{reference}: no inputs to compare on; give --npz DIR, or --recipe with a "
                            f"calibration or check source (a {family.name!r} model has no default inputs)")
    feeds, source = draw_samples(name, params, SourceContext(reference, resolve), model, where, family, ms,
                                 check_where="compare inputs", limit=None if samples == "all" else samples)
    texts = source.texts()
    if samples == "all":
        return EvalInputs(feeds, source.describe(), texts)
    # Only a count the user wrote is held to: the default 8 has always meant "up to 8" (a folder of 6 .npz
    # files checks on 6).
    asked = strict or (check is not None and "samples" in check.model_fields_set and samples == check.samples)
    if asked and samples > len(feeds):
        what = "--samples" if strict else f"{recipe.source_path or recipe.name}: check.samples"
        fix = "ask for" if strict else "use samples: all or"
        raise PipelineError(f"{what}: {samples} samples asked, but the evaluation inputs ({source.describe()}) "
                            f"hold {len(feeds)}; {fix} at most {len(feeds)}")
    return EvalInputs(feeds[:samples], source.describe(), None if texts is None else texts[:samples])


def run_compare(reference: Path, candidate: Path, feeds: list[Feeds], blocks: BlockSpec | None,
                family: Family, sensitivity: bool = False, asr_texts: list[str] | None = None,
                progress: Callable[[str], None] = lambda m: None) -> CheckReport:
    """Per-block report of two one-graph models (files or final/ folders), with the family's output metrics
    (and the ASR check, given the text each sample speaks)."""
    from pipeline.evaluation.evaluate import add_asr, compare_graphs, declared_durations, keep_audio_examples
    from pipeline.evaluation.metrics import metrics_for

    reference, candidate = model_file(reference), model_file(candidate)
    ms = as_modelset(reference, family)
    report = compare_graphs(reference, candidate, feeds, blocks, metrics := metrics_for(family, ms),
                            sensitivity=sensitivity, durations=declared_durations(family, ms), progress=progress)
    report.family = family.name
    keep_audio_examples(report, metrics, report.outputs[0].name)  # the worst and a typical sample, to hear
    if asr_texts is not None:
        add_asr(report, metrics, asr_texts, progress)
    return report


def asr_texts(inputs: EvalInputs, family: Family, asked: bool | None, where: str) -> list[str] | None:
    """The texts to score transcripts against, when the ASR check runs: `asked` True (--asr, check.asr: true,
    a WER threshold) needs the extra, audio and text, and says which is missing; None (unset) runs it where
    all three are there; False never."""
    from pipeline.evaluation.asr import installed

    if asked is False:
        return None
    if asked is None:
        return inputs.texts if installed() and inputs.texts is not None and family.audio(None) is not None \
            else None
    require_transcribable(family, where)
    if inputs.texts is None:
        raise PipelineError(f"{where}: the evaluation inputs ({inputs.description}) carry no text to score the "
                            f"transcripts against (sentences do; an npz folder needs a texts.txt, one line per "
                            f".npz file)")
    return inputs.texts


def require_transcribable(family: Family, where: str) -> None:
    """The ASR check can run on this family's models: the extra is installed and the outputs are audio."""
    from pipeline.evaluation.asr import require_installed

    require_installed(where)
    if family.audio(None) is None:
        raise PipelineError(f"{where}: a {family.name!r} model's outputs are not audio: nothing to transcribe")
