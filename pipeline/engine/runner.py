"""Run a recipe: base model, then ordered passes, each step cached by content.

Run folder layout (stable; scripts rely on it):

    DIR/steps/00-base/        the base model (a copy; the input is never touched)
    DIR/steps/NN-<step>/      each step's ModelSet + step.json (its manifest)
    DIR/final/                the final ModelSet's files, with sidecars
    DIR/final/<format>/       each of the recipe's targets (gguf, torchscript, coreml), if any
    DIR/manifest.json         the whole run: recipe, steps, final files
    DIR/tmp/                  scratch (ORT calibration files); emptied after a run

A step's cache key hashes (input graphs, step spec, block spec, calibration
feeds, tool version). A step folder appears only complete (built under a
temporary name, then renamed), so an interrupted run resumes at the step it
was in, and a re-run of a finished recipe only re-reads hashes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from pydantic import ValidationError

from calibration import SourceContext, checked_feeds, make_source

from pipeline.core.feeds import Feeds
from passes import get_pass
from passes.base import Params as PassParams
from passes.base import Pass, PassContext, op_counts

from pipeline import __version__
from pipeline.core import kv_cache
from pipeline.core import progress
from pipeline.core.blocks import BlockPartition, adopt_new_nodes
from pipeline.core.errors import PipelineError, during
from pipeline.core.modelset import ModelSet, graph_sha256
from pipeline.core.onnx_io import (check_loads, external_files, input_caster, is_light, load_light, load_onnx, parse_graph,
                      set_provenance)
from pipeline.core.recipe import Recipe, Scope, Step, format_validation_error, user_pattern
from pipeline.evaluation.results import CheckReport, FormatResult
from pipeline.formats.targets import (TARGET_MANIFEST, FormatInputs, PlannedTarget, TargetJob, files_line, folder_size,
                      plan_targets, write_target)
from pipeline.families import detect_family, family_of_exporter, get_family
from pipeline.engine.sources import materialize_base, resolve_model_path

STEP_MANIFEST = "step.json"


@dataclass
class PlannedStep:
    index: int
    step: Step
    pass_: Pass
    params: PassParams

    @property
    def folder(self) -> str:
        return f"{self.index:02d}-{self.step.label}"

    def spec(self) -> dict[str, Any]:
        return {"pass": self.pass_.name, "params": self.params.model_dump(mode="json"),
                "scope": self.step.scope.model_dump(mode="json")}


@dataclass
class Plan:
    recipe: Recipe
    model_path: Path | None  # None when an exporter makes the base ModelSet
    steps: list[PlannedStep]
    calibration: list[Feeds] | None = None  # feeds of the entry graph(s); captured per graph downstream
    exporter: tuple | None = None  # (params, export, key) of the family's exporter
    family: Any = None  # the model's family (pipeline.families.Family)
    # An exported base has no graph to check feeds against until step 00 ran: its source waits here.
    calibration_source: Any = None
    targets: list[PlannedTarget] = field(default_factory=list)  # formats beside ONNX, after the steps
    inputs: list[Path] = field(default_factory=list)  # files and folders the run reads (never inside its folder)

    def calibration_hash(self) -> str:
        return _feeds_hash(self.calibration or [])


@dataclass
class StepRecord:
    folder: str
    cached: bool
    manifest: dict[str, Any]


@dataclass
class RunResult:
    out_dir: Path
    final: ModelSet
    steps: list[StepRecord] = field(default_factory=list)
    wall_s: float = 0.0
    report: CheckReport | None = None
    targets: list[dict[str, Any]] = field(default_factory=list)  # each target folder's record (.target.json)


def plan_recipe(recipe: Recipe) -> Plan:
    """Check everything that can be checked before long work starts."""
    where = str(recipe.source_path or recipe.name)
    exporter = None
    if recipe.model.exporter:
        family, made_by = family_of_exporter(recipe.model.exporter, where=f"{where}: model")
        if recipe.model.family not in (None, family.name):
            raise PipelineError(f"{where}: model.family: exporter {made_by.name!r} makes {family.name!r} models, "
                                f"not {recipe.model.family!r}")
        exporter = (made_by.validate(recipe.model.params, f"{where}: model", recipe.resolve_path), made_by.export,
                    made_by.key)
        model_path, base = None, None  # graphs exist only after the export (step 00)
    else:
        model_path = resolve_model_path(recipe.model, recipe)
        base = load_onnx(model_path)
        family = get_family(recipe.model.family, f"{where}: model.family") if recipe.model.family \
            else detect_family(model_path, base)
    if recipe.check is not None:
        _check_thresholds(recipe.check, family, where)
    if recipe.tune is not None:
        from pipeline.search.tune import validate_tune

        validate_tune(recipe, family, where)
    steps = []
    for i, step in enumerate(recipe.steps, start=1):
        at = f"{where}: steps.{i - 1}"
        pass_ = get_pass(step.pass_name, at)
        try:
            params = pass_.Params.model_validate(step.params)
        except ValidationError as e:
            raise PipelineError(format_validation_error(f"{at}.params", e, pass_.Params)) from None
        scope = step.scope
        if not pass_.scoped and (scope.include is not None or scope.exclude or scope.nodes is not None):
            raise PipelineError(f"{at}: pass {pass_.name!r} rewrites whole graphs: its scope takes only 'graphs'")
        steps.append(PlannedStep(i, step, pass_, params))
    if base is not None:
        _check_versions(base, steps, where, model_path)
        _check_scopes(recipe, base, steps, where)
        if is_light(base):
            _check_large(recipe, steps, where)
    elif recipe.check is not None and recipe.check.fallback:
        raise PipelineError(f"{where}: check.fallback: not supported yet for exported model sets")
    if recipe.check is not None and recipe.check.fallback is not None:
        fallback_step_index(recipe)
    plan = Plan(recipe, model_path, steps, exporter=exporter, family=family,
                targets=plan_targets(recipe, family, exporter[0] if exporter else None, where),
                inputs=recipe.input_paths() + ([model_path, *family.sidecars(model_path)] if model_path else []))
    needing = [s for s in steps if s.pass_.needs_calibration_for(s.params)]
    if needing and recipe.calibration is None:
        raise PipelineError(f"{where}: steps.{needing[0].index - 1} ({needing[0].pass_.name}) needs calibration "
                            f"data, but the recipe has no 'calibration' section")
    if recipe.calibration is not None and any(s.pass_.wants_calibration(s.params) for s in steps):
        source = make_source(recipe.calibration.source, recipe.calibration.params,
                             SourceContext(model_path, recipe.resolve_path), where=f"{where}: calibration")
        if base is None:
            plan.calibration_source = source
        else:
            plan.calibration = checked_feeds(source, base, where=f"{where}: calibration")
    return plan


def _check_thresholds(check, family, where: str) -> None:
    """Every threshold of the check, and of its fallback, must have something to measure on this family."""
    from pipeline.evaluation.metrics import check_limits, metrics_for, require_measurable

    metrics = metrics_for(family, None)
    require_measurable(check_limits(check), metrics, family, f"{where}: check")
    if check.fallback is not None:
        require_measurable(check_limits(check.fallback), metrics, family, f"{where}: check.fallback")


def fallback_step_index(recipe: Recipe) -> int:
    """The step the fallback shrinks, by name or pass: one whose pass changes precision (quantize, fp16,
    compress_weights: `Pass.changes_precision`), which reports the blocks it changed."""
    from passes import PASSES

    spec = recipe.check.fallback
    name = spec.step
    where = f"{recipe.source_path or recipe.name}: check.fallback"

    def eligible(s: Step) -> bool:
        return s.pass_name in PASSES and PASSES[s.pass_name].changes_precision

    for i, s in enumerate(recipe.steps):
        if name in (s.name, s.pass_name) and eligible(s):
            if spec.move_to == "fp16" and s.pass_name == "fp16":
                raise PipelineError(f"{where}.move_to: 'fp16' would keep the blocks of fp16 step {s.label!r} "
                                    f"in the precision it gives them already; use move_to: fp32")
            return i
    quantize = ", ".join(s.label for s in recipe.steps if s.pass_name == "quantize") or "none"
    labels = ", ".join(f"{s.label} ({s.pass_name})" for s in recipe.steps if eligible(s)) or "none"
    kinds = ", ".join(n for n, cls in PASSES.items() if cls.changes_precision)
    raise PipelineError(f"{where}.step: no quantize step named {name!r} (quantize steps: {quantize}) nor another "
                        f"step whose pass changes precision ({kinds}); eligible steps: {labels}")


def _check_large(recipe: Recipe, steps: list[PlannedStep], where: str) -> None:
    """A model too large for one proto (its weights stay in external-data files) fails here, before any work,
    at the first step that cannot take it while it is still that large (a precision step may shrink it)."""
    for s in steps:
        _refuse_large(s, f"{where}: steps.{s.index - 1} ({s.pass_.name}): the model")
        if s.pass_.changes_precision:
            break  # it may leave the model under 2 GB: later steps are checked when they run
    if recipe.check is not None and recipe.check.sensitivity:
        raise PipelineError(f"{where}: check.sensitivity: not supported for a model {TOO_LARGE}; it splices both "
                            f"models' weights into one graph; turn it off")


TOO_LARGE = "too large for one ONNX proto (its weights stay in external-data files, over 2 GB with them)"


def _refuse_large(planned: PlannedStep, what: str) -> None:
    """One line when `planned`'s pass cannot take a model whose weights stay in external-data files."""
    problem = planned.pass_.large_model_problem(planned.params)
    if problem:
        raise PipelineError(f"{what} is {TOO_LARGE}; {problem}")


def _check_versions(base: onnx.ModelProto, steps: list[PlannedStep], where: str, path: Path) -> None:
    """A model older than a step's pass can write a valid graph from fails here, before any work, up to the first
    step that may upgrade it (later steps are checked when they run)."""
    for s in steps:
        _refuse_old(s, base, path, where)
        if s.pass_.upgrades_model:
            break


def _refuse_old(planned: PlannedStep, model: onnx.ModelProto, path: Path, where: str) -> None:
    """One line naming the recipe's step and the file when `model` is too old for the step's pass."""
    problem = planned.pass_.opset_problem(model, planned.params, str(path))
    if problem:
        raise PipelineError(f"{where}: steps.{planned.index - 1} ({planned.pass_.name}): {problem}")


def _check_scopes(recipe: Recipe, base, steps: list[PlannedStep], where: str) -> None:
    """Every step's scope against the graphs it will see (a cut graph's nodes keep their names, so block
    patterns are checked on the base graph)."""
    partition = BlockPartition(base, recipe.blocks)
    names = ["model"]
    for s in steps:
        scope = s.step.scope
        chosen = selected_graphs(scope, names, where=f"{where}: steps.{s.index - 1}.scope.graphs")
        partition.select(scope, where=f"{where}: steps.{s.index - 1}.scope")
        names = [after for g in names for after in (s.pass_.graphs_after(s.params, g) if g in chosen else [g])]


def selected_graphs(scope: Scope, names: list[str], where: str) -> list[str]:
    """Graph names the scope's `graphs` regexes match in full (all when none); each must match one."""
    if scope.graphs is None:
        return list(names)
    chosen = []
    for pattern in scope.graphs:
        try:
            rx = user_pattern(pattern)
        except re.error as e:
            raise PipelineError(f"{where}: {pattern!r} is not a valid regex: {e}") from None
        hits = [n for n in names if rx.fullmatch(n)]
        if not hits:
            raise PipelineError(f"{where}: {pattern!r} matches no graph (graphs: {', '.join(names)})")
        chosen += [h for h in hits if h not in chosen]
    return [n for n in names if n in chosen]


class Runner:
    def __init__(self, plan: Plan, out_dir: Path, log: Callable[[str], None] = print):
        self.plan = plan
        self.out_dir = out_dir
        self.log = log

    def run(self) -> RunResult:
        from pipeline.engine.runfolder import hold

        recipe = self.plan.recipe
        with hold(self.out_dir, log=self.log, inputs=self.plan.inputs, recipe=recipe.source_path,
                  writes_resolved=recipe.writes_resolved):
            return self._run()

    def _run(self) -> RunResult:
        start = time.perf_counter()
        steps_dir = self.out_dir / "steps"
        steps_dir.mkdir(exist_ok=True)
        with during("step 00 base"):  # a disk error names the work it stopped (errors.user_message)
            records = [self._base(steps_dir)]
        current = ModelSet.read(steps_dir / records[0].folder)
        # The FP32 model set for each set of graph names (the base, then what a split made): the
        # upstream that calibration and check inputs of a downstream graph are captured from.
        self.references: dict[tuple[str, ...], ModelSet] = {tuple(current.names()): current}
        self._captured: dict[str, dict[str, list[Feeds]]] = {}  # reference hash -> graph -> feeds
        self._entry_calibration(current)
        applied: list[str] = []
        for planned in self.plan.steps:
            applied.append(planned.step.label)
            with during(f"step {planned.index:02d} {planned.step.label}"):
                record = self._step(planned, current, steps_dir, applied)
            records.append(record)
            current = ModelSet.read(steps_dir / record.folder)
            self.references.setdefault(tuple(current.names()), current)
        with during(f"writing {self.out_dir / 'final'}"):
            final = self._final(current)
        result = RunResult(self.out_dir, final, records, time.perf_counter() - start)
        for planned in self.plan.targets:
            with during(f"target {planned.format}"):
                result.targets.append(self._target(planned, final))
        if self.plan.recipe.check is not None:
            with during("check"):
                result.report = self._check(ModelSet.read(steps_dir / records[0].folder), final, result.targets)
        result.wall_s = time.perf_counter() - start
        with during("writing the manifest"):
            self._write_manifest(result)
        if result.report and result.report.failures and self.plan.recipe.check.on_fail == "error":
            fails = result.report.failures
            raise PipelineError(f"check failed ({len(fails)} thresholds missed; report in "
                                f"{self.out_dir / 'report.md'}): " + "; ".join(fails[:5]))
        return result

    def _entry_calibration(self, base: ModelSet) -> None:
        """An exported base's calibration feeds, checked against its entry graph now that it exists."""
        source = self.plan.calibration_source
        if source is None or self.plan.calibration is not None:
            return
        family = self.plan.family
        entry = family.entry_graph(base)
        family.fit_source(source, base, self.plan.recipe.calibration.params)
        self.plan.calibration = checked_feeds(source, base.load(entry), where="calibration")

    def _check(self, base: ModelSet, final: ModelSet, targets: list[dict[str, Any]]) -> CheckReport:
        """Per-block error of final vs base and the family's output metrics, then every format beside ONNX
        against the same base on the same inputs; cached by content like a step."""
        from pipeline.engine.comparison import eval_feeds
        from pipeline.evaluation.evaluate import evaluate
        from pipeline.evaluation.metrics import check_limits, failures, metrics_for
        from pipeline.report.render import write_reports

        check, family = self.plan.recipe.check, self.plan.family
        entry = family.entry_graph(base)
        feeds, inputs = eval_feeds(base.path(entry), check.samples, family, self.plan.recipe, check, ms=base)
        blocks = self.plan.recipe.blocks
        key = _hash({"version": __version__, "base": base.content_hash(), "final": final.content_hash(),
                     "check": check.model_dump(mode="json", exclude={"fallback"}), "family": family.name,
                     "blocks": blocks.model_dump(mode="json") if blocks else None, "feeds": _feeds_hash(feeds),
                     "targets": [t["key"] for t in targets]})
        cached = self._cached_report(key)
        if cached is not None:
            return cached
        self.log(f"check: per-block error on {len(feeds)} samples ...")
        with progress.activity("check"):
            report = evaluate(base, final, feeds, family, blocks=blocks,
                              fp32_twin=self.references[tuple(final.names())], sensitivity=check.sensitivity,
                              decode_steps=check.decode_steps, progress=progress.status("check"))
        report.formats = self._check_formats(base, feeds, targets) or None
        report.key = key
        report.notes.append(f"inputs: {inputs}")
        report.failures = failures(report, check_limits(check), metrics_for(family, base))
        write_reports(report, self.out_dir)
        return report

    def _check_formats(self, base: ModelSet, feeds: list[Feeds], targets: list[dict[str, Any]]) -> list[FormatResult]:
        """Each target's files against the FP32 base, on the check's inputs (its graphs' captured once)."""
        params = self.plan.exporter[0] if self.plan.exporter else None
        captured: dict[str, list[Feeds]] = {}

        def capture(graph: str) -> list[Feeds]:
            return self.plan.family.capture(base, feeds, graph, captured, progress.counter(f"check: {graph} inputs"))

        results: list[FormatResult] = []
        for planned, record in zip(self.plan.targets, targets):
            files = list(record["files"])
            if planned.target.check is None:
                results += [FormatResult(format=planned.format, file=f, compared="-",
                                         note="this format has no check") for f in files]
                continue
            with progress.activity(f"check: {planned.format}"):
                results += planned.target.check(FormatInputs(self.out_dir / "final" / planned.format, files, params,
                                                             self.plan.recipe.resolve_path, base, feeds, capture))
        return results

    # -- steps -------------------------------------------------------------

    def _base(self, steps_dir: Path) -> StepRecord:
        folder = "00-base"
        recipe = self.plan.recipe
        if self.plan.exporter is not None:
            params, export, source_key = self.plan.exporter
            key = _hash({"version": __version__, "exporter": recipe.model.exporter,
                         "source": source_key(params, recipe.resolve_path)})
        else:
            key = _hash({"version": __version__, "base": graph_sha256(self.plan.model_path),  # with its weights
                         "family": self.plan.family.name})
        cached = _cached(steps_dir / folder, key)
        if cached is not None:
            self.log("step 00 base: cached")
            return StepRecord(folder, True, cached)
        t0 = time.perf_counter()
        with _building(steps_dir / folder) as tmp:
            if self.plan.exporter is not None:
                self.log(f"step 00 base: exporting with {recipe.model.exporter} ...")
                with progress.activity(f"step 00 base: exporting with {recipe.model.exporter}"):
                    ms = export(params, tmp, recipe.resolve_path)
                ms.meta["family"] = self.plan.family.name
                ms.write_manifest()
                source = f"exporter {recipe.model.exporter}"
            else:
                ms = materialize_base(self.plan.model_path, tmp, self.plan.family)
                source = self.plan.model_path.name
            manifest = {"step": folder, "pass": "base", "key": key, "source": source, "meta": ms.meta,
                        "output_hash": ms.content_hash(), "graphs": _graph_facts(ms),
                        "wall_s": round(time.perf_counter() - t0, 3)}
            _write_json(tmp / STEP_MANIFEST, manifest)
        self.log(f"step 00 base: {source}")
        return StepRecord(folder, False, manifest)

    def _step(self, planned: PlannedStep, source: ModelSet, steps_dir: Path, applied: list[str]) -> StepRecord:
        uses_calibration = planned.pass_.wants_calibration(planned.params) and self.plan.calibration is not None
        key = _hash({"version": __version__, "input": source.content_hash(), "step": planned.spec(),
                     "blocks": self.plan.recipe.blocks.model_dump(mode="json") if self.plan.recipe.blocks else None,
                     "calibration": self.plan.calibration_hash() if uses_calibration else None,
                     "recipe": self.plan.recipe.name, "applied": applied})
        target = steps_dir / planned.folder
        cached = _cached(target, key)
        label = f"step {planned.index:02d} {planned.step.label}"
        if cached is not None:
            self.log(f"{label}: cached")
            return StepRecord(planned.folder, True, cached)
        self.log(f"{label}: {planned.pass_.name} ...")
        t0 = time.perf_counter()
        stats: dict[str, Any] = {}
        scope = planned.step.scope
        graphs = selected_graphs(scope, source.names(), where=f"{label}.scope.graphs")
        block_scope = scope.model_copy(update={"graphs": None})
        matched: set[str] = set()
        with _building(target) as tmp, _scratch_tmpdir(self.out_dir / "tmp") as scratch:
            out = source.derive(tmp)
            for graph in source.names():
                if graph not in graphs:
                    out.copy_graph_from(source, graph)
                    continue
                model = source.load(graph)  # light when large: its weights stay in source's files
                recipe = self.plan.recipe  # (what an exporter or an upgrading step made is checked only now)
                _refuse_old(planned, model, source.path(graph), str(recipe.source_path or recipe.name))
                weights_dir = source.root if is_light(model) else None
                if weights_dir is not None:
                    _refuse_large(planned, f"{label}: graph {graph!r}")
                blocks = BlockPartition(model, self.plan.recipe.blocks)
                if block_scope.is_everything:
                    selected = None
                else:
                    selected, hits = blocks.select_lenient(block_scope)
                    matched |= hits
                    if not selected:
                        out.copy_graph_from(source, graph)  # nothing of this graph is in scope
                        continue
                ctx = PassContext(graph, blocks, selected, scratch, log=self.log, weights_dir=weights_dir,
                                  calibration=self._calibration(label, graph, source) if uses_calibration else None)
                before = {n.name for n in model.graph.node}
                with progress.activity(f"{label}: {planned.pass_.name}" + (f" ({graph})" if len(graphs) > 1 else "")):
                    result = planned.pass_.apply(model, planned.params, ctx)
                produced = result.graphs if result.graphs is not None else {graph: result.model}
                if result.graphs is not None:
                    out.replace_graph(graph, list(result.graphs), result.chain)
                for name, made in produced.items():
                    adopt_new_nodes(made, before | result.placed, self.plan.recipe.blocks)
                    set_provenance(made, {"pipeline.recipe": self.plan.recipe.name,
                                          "pipeline.passes": ",".join(applied), "pipeline.version": __version__})
                    # Saved first, then checked from the file: a large result never goes through one proto.
                    out.save_graph(name, made, weights_dir=result.weights_dir or weights_dir)
                    check_loads(out.path(name), f"{label} ({name})")
                stats[graph] = result.stats | {"changed": result.changed}
                del model, result, produced  # what a pass holds of a large model must not outlive its graph
            unmatched = [p for p in (block_scope.include or []) + block_scope.exclude + (block_scope.nodes or [])
                          if not block_scope.is_everything and p not in matched]
            if unmatched:
                raise PipelineError(f"{label}.scope: pattern {unmatched[0]!r} matches nothing in graphs "
                                    f"{', '.join(graphs)}")
            out.share_weights()
            out.copy_sidecars_from(source)
            out.write_manifest()
            manifest = {"step": planned.folder, **planned.spec(), "key": key, "input_hash": source.content_hash(),
                        "output_hash": out.content_hash(), "graphs": _graph_facts(out), "stats": stats,
                        "wall_s": round(time.perf_counter() - t0, 3)}
            _write_json(tmp / STEP_MANIFEST, manifest)
        self.log(f"{label}: done in {manifest['wall_s']:.1f} s")
        return StepRecord(planned.folder, False, manifest)

    def _calibration(self, label: str, graph: str, current: ModelSet) -> Callable[[], Iterator[Feeds]]:
        """Feeds for `graph`: the recipe's own for an entry graph, else captured from the FP32 upstream."""

        def iterate() -> Iterator[Feeds]:
            feeds = self._graph_feeds(graph, current, f"{label}: capturing {graph} inputs")
            # Captured from the FP32 reference, whose layers may keep their KV cache the other way.
            adapt = kv_cache.feed_adapter(current.path(graph))
            cast = input_caster(current.path(graph))  # (an earlier fp16 step may have made its inputs FP16)
            for f in progress.track(feeds, f"{label}: calibrating"):
                yield cast(adapt(f))

        return iterate

    def _graph_feeds(self, graph: str, current: ModelSet, what: str) -> list[Feeds]:
        reference = self.references.get(tuple(current.names()), current)
        captured = self._captured.setdefault(reference.content_hash(), {})
        return self.plan.family.capture(reference, self.plan.calibration or [], graph, captured,
                                        progress.counter(what))

    def _final(self, last: ModelSet) -> ModelSet:
        """Copy the last step's graphs to final/, stamped with the recipe's name and hash."""
        target = self.out_dir / "final"
        recipe_hash = self.plan.recipe.spec_hash()
        key = _hash({"last": last.content_hash(), "recipe": recipe_hash})
        cached = _cached(target, key, manifest=".final.json")
        if cached is not None:
            return ModelSet.read(target)
        with _building(target, ".final.json") as tmp:
            out = last.derive(tmp)
            for graph in last.names():
                weights_dir = None
                if external_files(last.path(graph)):  # its weights stay where they are: stamp the graph only
                    out.copy_graph_from(last, graph)
                    model = parse_graph(out.path(graph))
                    weights_dir = out.root
                else:
                    model = last.load(graph)
                set_provenance(model, {"pipeline.recipe_sha256": recipe_hash})
                out.save_graph(graph, model, weights_dir=weights_dir)
            out.share_weights()
            out.copy_sidecars_from(last)
            out.write_manifest()
            _write_json(tmp / ".final.json", {"key": key, "output_hash": out.content_hash()})
        return ModelSet.read(target)

    def _target(self, planned: PlannedTarget, final: ModelSet) -> dict[str, Any]:
        """final/<format>/, written by the family from its PyTorch model; cached by what it is made from."""
        params, _, source_key = self.plan.exporter
        recipe = self.plan.recipe
        folder = self.out_dir / "final" / planned.format
        key = _hash({"version": __version__, "format": planned.format, "params": planned.params.model_dump(mode="json"),
                     "model": source_key(params, recipe.resolve_path), "final": final.content_hash()})
        label = f"target {planned.format}"
        cached = _cached_target(folder, key)
        if cached is not None:
            self.log(f"{label}: cached")
            return cached
        self.log(f"{label}: writing ...")
        t0 = time.perf_counter()
        with _building(folder, TARGET_MANIFEST) as tmp, progress.activity(label):
            job = TargetJob(planned.params, params, recipe.resolve_path, final, tmp)
            write_target(planned, job)
            record = {"format": planned.format, "key": key, "notes": job.notes,
                      "files": {p.name: folder_size(p) for p in sorted(tmp.iterdir())},
                      "wall_s": round(time.perf_counter() - t0, 3)}
            _write_json(tmp / TARGET_MANIFEST, record)
        for note in job.notes:
            self.log(f"{label}: {note}")
        self.log(f"{label}: wrote {files_line(record['files'], f'{planned.format}/')}")
        return record

    def _cached_report(self, key: str) -> CheckReport | None:
        """The run folder's report.json if it was made with `key` (checks are cached like steps)."""
        try:
            cached = CheckReport.read(self.out_dir / "report.json")
        except (OSError, json.JSONDecodeError, PipelineError):  # missing, or from an older tool: check again
            return None
        if cached.key != key:
            return None
        self.log("check: cached")
        return cached

    def _write_manifest(self, result: RunResult) -> None:
        recipe = self.plan.recipe
        manifest = {
            "recipe": {"name": recipe.name, "path": str(recipe.source_path) if recipe.source_path else None,
                       "sha256": recipe.spec_hash()},
            "version": __version__,
            "model": str(self.plan.model_path) if self.plan.model_path else f"exporter {recipe.model.exporter}",
            "steps": [r.manifest | {"cached": r.cached} for r in result.steps],
            "final": {"folder": "final", "graphs": _graph_facts(result.final), "sidecars": list(result.final.sidecars),
                      "targets": {t["format"]: {k: t[k] for k in ("files", "notes")} for t in result.targets}},
            "check": None if result.report is None else {
                "report": "report.json", "failures": result.report.failures or [],
                "outputs": result.report.to_json()["outputs"]},
            "wall_s": round(result.wall_s, 3),
        }
        _write_json(self.out_dir / "manifest.json", manifest)


def _graph_facts(ms: ModelSet) -> dict[str, Any]:
    facts = {}
    for g in ms.graphs:
        path = ms.root / g.file
        model = load_light(path)  # the graph alone: its weights, checked when written, stay in their files
        facts[g.name] = {"file": g.file, "bytes": path.stat().st_size, "sha256": g.sha256,
                         "nodes": len(model.graph.node), "op_counts": op_counts(model)}
    return facts


def _cached_target(folder: Path, key: str) -> dict[str, Any] | None:
    """A target folder's record if it was made with `key` and its files are all there, at their sizes."""
    data = _record(folder, TARGET_MANIFEST, key)
    if data is None:
        return None
    try:
        intact = all(folder_size(folder / name) == size for name, size in data.get("files", {}).items())
    except OSError:
        return None
    return data if intact else None


def _record(folder: Path, manifest: str, key: str) -> dict[str, Any] | None:
    """A folder's manifest when it says it was built with `key`."""
    try:
        data = json.loads((folder / manifest).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("key") == key else None


def _cached(folder: Path, key: str, manifest: str = STEP_MANIFEST) -> dict[str, Any] | None:
    """The folder's manifest if it was built with `key` and its files are intact."""
    data = _record(folder, manifest, key)
    if data is None:
        return None
    try:
        ms = ModelSet.read(folder)
    except PipelineError:
        return None
    return data if ms.verify() else None


@contextlib.contextmanager
def _building(target: Path, manifest: str = STEP_MANIFEST) -> Iterator[Path]:
    """Build a folder under a temporary name; rename it into place only when complete.

    An existing `target` is replaced only when its `manifest` proves a run built it: what a run did not make
    is never moved or deleted."""
    if target.exists() and not (target / manifest).is_file():
        raise PipelineError(f"{target} was not written by a run (no {manifest} in it), so it is not replaced: "
                            f"move it away, or choose another --out")
    tmp = target.with_name(f".{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _scratch_tmpdir(path: Path) -> Iterator[Path]:
    """Point Python's tempfile (which ORT's quantizer uses) into the run folder."""
    path.mkdir(parents=True, exist_ok=True)
    saved = tempfile.tempdir
    tempfile.tempdir = str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(path, ignore_errors=True)


def _feeds_hash(feeds: list[Feeds]) -> str:
    h = hashlib.sha256()
    for f in feeds:
        for name in sorted(f):
            h.update(name.encode())
            h.update(np.ascontiguousarray(f[name]).tobytes())
    return h.hexdigest()


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
