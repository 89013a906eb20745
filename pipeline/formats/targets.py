"""Deployment targets: formats beside ONNX, written from the family's PyTorch model into `final/<format>/`.

A recipe's `targets:` list names formats (`gguf`, `torchscript`, `coreml`). After the ONNX steps (and
before the check) the runner asks the model's family for each one: a family declares the formats it can
write as `Target`s, each with a parameter schema, the optional packages it needs, and a writer that loads
the family's PyTorch weights (from the recipe's exporter params) and writes the files. The core knows no
format's content; it plans (is the format the family's? is its package installed?), caches each
folder by what it was made from, builds it atomically, and reports the writer's notes: where the ONNX
steps' precision choices carried over into the format, and where the format cannot express them.

`weight_precision` (`pipeline.core.precision`) reads those choices off an ONNX graph, family-free: the
narrowest weight type its matrix products and convolutions use.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from pydantic import BaseModel

from pipeline.core.errors import PipelineError, few, one_line
from pipeline.core.precision import weight_precision

INSTALL = "pip install 'tts-onnx-pipeline[{extra}]'"
TARGET_MANIFEST = ".target.json"  # in each final/<format>/: its files, sizes, notes and cache key


@dataclass
class TargetJob:
    """What a target's writer gets."""

    params: BaseModel  # the target's own params (its `Params` schema)
    model: BaseModel  # the recipe's exporter params: how the family loads its PyTorch weights
    resolve: Callable[[str], Path]  # a recipe-relative path -> a path
    final: Any  # the ONNX result (ModelSet): the steps' precision choices, where the format carries them
    dest: Path  # final/<format>/, being built (renamed into place when complete)
    notes: list[str] = field(default_factory=list)  # one line each, printed by the run and kept in the manifest


@dataclass
class FormatInputs:
    """What a target's check gets: the files it wrote and the check's own inputs, FP32 reference included."""

    folder: Path  # final/<format>/
    files: list[str]  # the files written there
    model: BaseModel  # the recipe's exporter params
    resolve: Callable[[str], Path]
    reference: Any  # the FP32 base ModelSet (steps/00-base): what the check compares everything with
    feeds: list[Any]  # the check's evaluation inputs of the reference's entry graph
    capture: Callable[[str], list[Any]]  # a reference graph's inputs on those feeds (the family's capture, cached)


@dataclass(frozen=True)
class Target:
    """A format a family writes from its PyTorch model."""

    format: str
    Params: type[BaseModel]
    write: Callable[[TargetJob], None]  # writes files into job.dest; adds notes
    needs: tuple[tuple[str, str], ...] = ()  # (module, extra): optional packages, checked before any work
    description: str = ""
    # Measures the written files against the FP32 ONNX on the check's inputs (a list of
    # results.FormatResult, one per file); None: the format is not checked, and the report says so.
    check: Callable[[FormatInputs], list[Any]] | None = None

    def missing_package(self) -> str | None:
        """A one-line reason when an optional package this format needs is not installed."""
        for module, extra in self.needs:
            why = _not_installed(module, extra, f"format {self.format!r}")
            if why:
                return why
        return None


def require_module(module: str, extra: str, what: str) -> Any:
    """Import an optional package, or stop with the line that says how to install it."""
    why = _not_installed(module, extra, what)
    if why:
        raise PipelineError(why)
    return importlib.import_module(module)


def _not_installed(module: str, extra: str, what: str) -> str | None:
    if importlib.util.find_spec(module) is not None:
        return None
    return f"{what} needs the optional package {module!r}, which is not installed: {INSTALL.format(extra=extra)}"


def files_line(files: dict[str, int], prefix: str = "") -> str:
    """`a.gguf (450.4 MB), b.gguf (239.3 MB)`: a target's files with their sizes (its record's `files`)."""
    return ", ".join(f"{prefix}{name} ({size / 1e6:.1f} MB)" for name, size in files.items())


def folder_size(path: Path) -> int:
    """Bytes under `path` (a file, or a folder such as an .mlpackage)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@dataclass
class PlannedTarget:
    index: int  # position in the recipe's targets list
    target: Target
    params: BaseModel

    @property
    def format(self) -> str:
        return self.target.format


def plan_targets(recipe: Any, family: Any, model_params: BaseModel | None, where: str) -> list[PlannedTarget]:
    """Every target of the recipe, checked before long work starts: the family's format, once, from a
    PyTorch model, with its package installed and its params valid."""
    from pipeline.core.recipe import parse_params

    known = {t.format: t for t in family.targets}
    planned: list[PlannedTarget] = []
    for i, spec in enumerate(recipe.targets):
        at = f"{where}: targets.{i}"
        if spec.format not in known:
            makes = ", ".join(known) or f"no format beside ONNX{': ' + family.no_targets if family.no_targets else ''}"
            raise PipelineError(f"{at}.format: family {family.name!r} cannot make {spec.format!r} (it makes: {makes})")
        if any(p.format == spec.format for p in planned):
            raise PipelineError(f"{at}.format: {spec.format!r} is listed twice: one entry per format, since it "
                                f"writes final/{spec.format}/")
        if model_params is None:
            raise PipelineError(f"{at}: format {spec.format!r} is written from the family's PyTorch model, but this "
                                f"recipe's model is an ONNX file: use the family's exporter (model.exporter)")
        target = known[spec.format]
        missing = target.missing_package()
        if missing:
            raise PipelineError(f"{at}: {missing}")
        params = parse_params(target.Params, spec.params, f"{at}.params")
        planned.append(PlannedTarget(i, target, params))
    return planned


def write_target(planned: PlannedTarget, job: TargetJob) -> None:
    """Run the format's writer; a converter's own exception becomes one line that keeps its message
    (which names the op or tensor that failed: the writers make sure of it)."""
    try:
        planned.target.write(job)
    except PipelineError:
        raise
    except Exception as e:  # a converter library's error: the user's model, not our bug, is what it is about
        message = one_line(e) or type(e).__name__
        raise PipelineError(f"format {planned.format!r}: the converter failed: {message}") from None
    if not any(job.dest.iterdir()):
        raise PipelineError(f"format {planned.format!r}: the writer wrote no file")


def block_precisions(model: onnx.ModelProto) -> dict[str, str]:
    """Every block's (default partition) weight precision."""
    from pipeline.core.blocks import BlockPartition

    by_name = {n.name: n for n in model.graph.node}
    return {block.id: weight_precision(model, [by_name[n] for n in block.nodes])
            for block in BlockPartition(model, None).blocks.values()}


def narrowed_blocks(model: onnx.ModelProto) -> dict[str, str]:
    """Blocks (default partition) whose weights the steps narrowed below FP32, with their precision."""
    return {block: p for block, p in block_precisions(model).items() if p != "fp32"}


def uncarried_note(fmt: str, narrowed: dict[str, str], written: str, carries: Iterable[str] = ()) -> str | None:
    """The note for the steps' precision choices a format does not take over (None when there were none);
    `carries`: the precisions the format as written does express (fp16, when it computes in FP16)."""
    by_precision: dict[str, list[str]] = {}
    for block, precision in narrowed.items():
        if precision not in carries:
            by_precision.setdefault(precision, []).append(block)
    if not by_precision:
        return None
    chosen = "; ".join(f"{p} in {few(blocks, 4)}" for p, blocks in sorted(by_precision.items()))
    return f"the steps' precision ({chosen}) does not carry over to {fmt}: written in {written}; final/*.onnx has it"
