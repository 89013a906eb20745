"""A recipe's plan: everything checked before long work starts, made once per model.

`plan_recipe` loads the model (or names the exporter that makes it), finds its
family, and checks every step's pass and params against the graphs it will
see, the check's thresholds, the targets and the calibration data. A search
(fallback rounds, tune candidates) runs many recipes on the same model:
`replan` plans each from the first plan without loading the model or drawing
the calibration feeds again.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from calibration import SourceContext
from passes import get_pass
from passes.base import Params as PassParams
from passes.base import Pass
from pipeline.core.blocks import BlockPartition
from pipeline.core.errors import PipelineError
from pipeline.core.feeds import Feeds
from pipeline.core.hashing import feeds_hash
from pipeline.core.onnx_io import is_light, load_onnx
from pipeline.core.recipe import Recipe, Scope, Step, parse_params, user_pattern
from pipeline.engine.sources import resolve_model_path
from pipeline.families import (check_declared_audio, declare_audio, detect_family, draw_samples, family_of_exporter,
                               get_family, make_source, path_fields)
from pipeline.formats.targets import PlannedTarget, plan_targets

SectionCheck = Callable[[Recipe, Any, str], None]  # (recipe, family, where): one clear error, or nothing


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
    base: onnx.ModelProto | None = field(default=None, repr=False)  # the loaded model file (None: exported)

    def calibration_hash(self) -> str:
        return feeds_hash(self.calibration or [])


def plan_recipe(recipe: Recipe, check_sections: SectionCheck | None = None) -> Plan:
    """Check everything that can be checked before long work starts: the model and its family, every step's
    pass and params against the graphs it will see, the check's thresholds, the targets, the calibration.

    `check_sections(recipe, family, where)`: a layer above's own sections (a search's `tune:`), checked once
    the family is known and before the steps, as if the engine knew them."""
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
    family = declare_audio(family, recipe.model.audio, f"{where}: model.audio")
    if recipe.model.audio is not None and base is not None:
        check_declared_audio(recipe.model.audio, base, f"{where}: model.audio")
    if check_sections is not None:
        check_sections(recipe, family, where)
    plan = Plan(recipe, model_path, [], exporter=exporter, family=family, base=base)  # replan fills in the rest
    return replan(plan, recipe)


def replan(plan: Plan, recipe: Recipe) -> Plan:
    """The plan of `recipe`, a recipe with the same model as `plan`'s (a search's round or candidate): the model
    is not loaded nor its family found again, and the calibration feeds are reused when the section is the same."""
    if _model_key(recipe) != _model_key(plan.recipe):
        raise ValueError("replan: the recipe names another model; plan it with plan_recipe")
    where = str(recipe.source_path or recipe.name)
    family, base, model_path = plan.family, plan.base, plan.model_path
    if recipe.check is not None:
        _check_thresholds(recipe.check, family, where)
        reference_step(recipe, where)
    steps = [_plan_step(i, step, f"{where}: steps.{i - 1}") for i, step in enumerate(recipe.steps, start=1)]
    if base is not None:
        _check_versions(base, steps, where, model_path)
        _check_scopes(recipe, base, steps, where)
        if is_light(base):
            _check_large(recipe, steps, where)
    elif recipe.check is not None and recipe.check.fallback:
        raise PipelineError(f"{where}: check.fallback: not supported yet for exported model sets")
    if recipe.check is not None and recipe.check.fallback is not None:
        fallback_step_index(recipe)
    model_inputs = [model_path, *family.sidecars(model_path)] if model_path else []
    new = Plan(recipe, model_path, steps, exporter=plan.exporter, family=family, base=base,
               targets=plan_targets(recipe, family, plan.exporter[0] if plan.exporter else None, where),
               inputs=recipe.input_paths() + model_inputs)
    _plan_calibration(new, plan if _calibration_key(recipe) == _calibration_key(plan.recipe) else None, where)
    return new


def reference_step(recipe: Recipe, where: str = "recipe") -> int:
    """The index in `recipe.steps` of the step the check measures against (`check.reference`), -1 for the base."""
    name = recipe.check.reference if recipe.check is not None else None
    if name is None:
        return -1
    labels = [s.label for s in recipe.steps]
    if name not in labels:
        raise PipelineError(f"{where}: check.reference: no step is named {name!r} (steps: "
                            f"{', '.join(labels) or 'none'})")
    return labels.index(name)


def _model_key(recipe: Recipe) -> dict[str, Any]:
    """The model section with its file resolved: a derived recipe spells the same file as an absolute path."""
    model = recipe.model.model_dump(mode="json")
    if model.get("path"):
        model["path"] = str(recipe.resolve_path(model["path"]))
    return model


def _calibration_key(recipe: Recipe) -> dict[str, Any] | None:
    """The calibration section with the files its source reads resolved (`_model_key`'s reason)."""
    if recipe.calibration is None:
        return None
    section = recipe.calibration.model_dump(mode="json")
    for key in path_fields(section["source"]):
        if section["params"].get(key):
            section["params"][key] = str(recipe.resolve_path(section["params"][key]))
    return section


def _plan_step(index: int, step: Step, at: str) -> PlannedStep:
    pass_ = get_pass(step.pass_name, at)
    params = parse_params(pass_.Params, step.params, f"{at}.params")
    scope = step.scope
    if not pass_.scoped and (scope.include is not None or scope.exclude or scope.nodes is not None):
        raise PipelineError(f"{at}: pass {pass_.name!r} rewrites whole graphs: its scope takes only 'graphs'")
    return PlannedStep(index, step, pass_, params)


def _plan_calibration(plan: Plan, same: Plan | None, where: str) -> None:
    """The calibration feeds the steps need: `same`'s where it had them for the same section, else drawn now
    (an exported base's source waits for step 00, when there is a graph to check its feeds against)."""
    recipe, steps = plan.recipe, plan.steps
    needing = [s for s in steps if s.pass_.needs_calibration_for(s.params)]
    if needing and recipe.calibration is None:
        raise PipelineError(f"{where}: steps.{needing[0].index - 1} ({needing[0].pass_.name}) needs calibration "
                            f"data, but the recipe has no 'calibration' section")
    if recipe.calibration is None or not any(s.pass_.wants_calibration(s.params) for s in steps):
        return
    if same is not None and (same.calibration is not None or same.calibration_source is not None):
        plan.calibration, plan.calibration_source = same.calibration, same.calibration_source
        return
    spec, ctx = recipe.calibration, SourceContext(plan.model_path, recipe.resolve_path)
    if plan.base is None:  # its params checked now; its samples drawn by the runner once step 00 made the graph
        plan.calibration_source = make_source(spec.source, spec.params, ctx, where=f"{where}: calibration")
    else:
        plan.calibration, plan.calibration_source = draw_samples(spec.source, spec.params, ctx, plan.base,
                                                                 f"{where}: calibration")


def _check_thresholds(check, family, where: str) -> None:
    """Every threshold of the check, and of its fallback, must have something to measure on this family."""
    from pipeline.evaluation.metrics import check_limits, metrics_for, require_measurable

    metrics = metrics_for(family, None)
    require_measurable(check_limits(check), metrics, family, f"{where}: check")
    if check.max_wer_increase is not None or check.asr:
        from pipeline.evaluation.asr import require_installed

        if check.asr is False:
            raise PipelineError(f"{where}: check.max_wer_increase needs the ASR check, which check.asr: false "
                                f"turns off")
        require_installed(f"{where}: check.asr" if check.asr else f"{where}: check.max_wer_increase")
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
        refuse_large(s, f"{where}: steps.{s.index - 1} ({s.pass_.name}): the model")
        if s.pass_.changes_precision:
            break  # it may leave the model under 2 GB: later steps are checked when they run
    if recipe.check is not None and recipe.check.sensitivity:
        raise PipelineError(f"{where}: check.sensitivity: not supported for a model {TOO_LARGE}; it splices both "
                            f"models' weights into one graph; turn it off")


TOO_LARGE = "too large for one ONNX proto (its weights stay in external-data files, over 2 GB with them)"


def refuse_large(planned: PlannedStep, what: str) -> None:
    """One line when `planned`'s pass cannot take a model whose weights stay in external-data files."""
    problem = planned.pass_.large_model_problem(planned.params)
    if problem:
        raise PipelineError(f"{what} is {TOO_LARGE}; {problem}")


def _check_versions(base: onnx.ModelProto, steps: list[PlannedStep], where: str, path: Path) -> None:
    """A model older than a step's pass can write a valid graph from fails here, before any work, up to the first
    step that may upgrade it (later steps are checked when they run)."""
    for s in steps:
        refuse_old(s, base, path, where)
        if s.pass_.upgrades_model:
            break


def refuse_old(planned: PlannedStep, model: onnx.ModelProto, path: Path, where: str) -> None:
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
