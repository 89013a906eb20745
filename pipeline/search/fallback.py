"""Automatic precision fallback: quantize, find the worst blocks, keep them in higher precision, repeat.

The fallback step is any step whose pass changes precision (`Pass.changes_precision`: quantize, fp16,
compress_weights); such passes report the blocks they changed as `blocks_changed` in their stats.
Each round runs the recipe (finished steps come from the cache), checks the
result, and if the target misses, moves the `per_round` blocks with the lowest
isolated SQNR (among those the fallback step changed) out of that step's scope:
to FP32 (excluded), or to FP16 (excluded, plus an fp16 step scoped to them).
The recipe of the last round is written as `resolved_recipe.yaml` next to the
output, with every per-block choice explicit, so the result is reproducible
without the search.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path


from pipeline.core.errors import PipelineError
from pipeline.core.recipe import FallbackSpec, Recipe, Scope, Step
from pipeline.report.render import write_reports
from pipeline.evaluation.results import BlockResult, CheckReport, FallbackRound
from pipeline.engine.plan import Plan, fallback_step_index, replan
from pipeline.engine.runner import Runner, RunResult
from pipeline.search.derive import derive, write_resolved


def run_with_fallback(plan: Plan, out_dir: Path, log: Callable[[str], None] = print) -> RunResult:
    """The rounds, each a plan made from `plan` (the user's recipe, planned once), into `out_dir`, which the
    caller holds."""
    recipe = plan.recipe
    spec = recipe.check.fallback
    index = fallback_step_index(recipe)
    current = _without_fallback(recipe, sensitivity=spec.rank_by == "sensitivity")
    moved: list[str] = []
    rounds: list[FallbackRound] = []
    order: list[str] | None = None  # the sensitivity ranking, measured once
    step_left = True
    for round_no in range(spec.max_rounds + 1):
        log(f"fallback round {round_no}: {len(moved)} blocks kept in {spec.move_to}")
        result = Runner(replan(plan, current), out_dir, log=log).run()
        if spec.rank_by == "sensitivity" and order is None:
            order = _sensitivity_order(result.report, spec)
        summary, met = _evaluate(result.report, result, spec)
        rounds.append(FallbackRound(round=round_no, kept=list(moved), kept_in=spec.move_to, summary=summary,
                                    target_met=met, output=result.report.outputs[0], size_ratio=_size_ratio(result),
                                    moved_next=[]))
        log(f"fallback round {round_no}: {summary}")
        over_budget = spec.max_size_ratio is not None and _size_ratio(result) > spec.max_size_ratio
        if met or over_budget or not step_left or round_no == spec.max_rounds:
            break
        candidates = _ranked_candidates(result.report, result, index, moved)
        if order is not None:  # stable: the upstream-of-a-length-change blocks stay first
            upstream = _upstream_of_length_change(result.report)
            candidates = sorted(candidates, key=lambda b: (b not in upstream, order.index(b) if b in order else len(order)))
        choices = candidates[: spec.per_round]
        step_left = len(choices) < len(candidates)
        if not choices or (not step_left and len(recipe.steps) == 1 and spec.move_to == "fp32"):
            break  # nothing left to move, short of the unquantized model itself
        moved += choices
        rounds[-1].moved_next = choices
        current = _with_moved(_without_fallback(recipe), index, moved, spec, drop_step=not step_left)
    result.report.rounds = rounds
    write_reports(result.report, out_dir)
    name = recipe.source_path.name if recipe.source_path else recipe.name
    resolved = write_resolved(derive(current, check=recipe.check.model_copy(update={"fallback": None})), out_dir,
                              f"the automatic fallback of {name}")
    log(f"resolved recipe: {resolved}")
    if not rounds[-1].target_met:
        msg = f"fallback did not reach its target after {len(rounds)} rounds: {rounds[-1].summary}"
        if recipe.check.on_fail == "error":
            raise PipelineError(msg + f" (resolved recipe of the last round: {resolved})")
        log(f"warning: {msg}")
    return result


def _without_fallback(recipe: Recipe, sensitivity: bool = False) -> Recipe:
    """The recipe a round runs: no fallback, and paths made absolute exactly as the
    resolved recipe will have them, so both carry the same recipe hash (the check
    section is not part of that hash)."""
    # A missed threshold is the search's business, not an error mid-way.
    return derive(recipe, check=recipe.check.model_copy(update={
        "fallback": None, "sensitivity": sensitivity or recipe.check.sensitivity, "on_fail": "warn"}))


def _with_moved(recipe: Recipe, index: int, moved: list[str], spec: FallbackSpec, drop_step: bool) -> Recipe:
    """The recipe with `moved` blocks out of step `index` (the whole step when nothing is left in it)."""
    step = recipe.steps[index]
    patterns = [re.escape(b) for b in moved]
    scope = step.scope.model_copy(update={"exclude": list(step.scope.exclude) + patterns})
    steps = list(recipe.steps)
    if drop_step:
        del steps[index]
        index -= 1
    else:
        steps[index] = step.model_copy(update={"scope": scope})
    if spec.move_to == "fp16":
        steps.insert(index + 1, Step.model_validate({
            "pass": "fp16", "name": "fallback-fp16", "params": {"overflow_guard": False},
            "scope": Scope(graphs=step.scope.graphs, include=patterns)}))
    return recipe.model_copy(update={"steps": steps})


def _upstream_of_length_change(report: CheckReport) -> set[str]:
    if not any(o.shape_mismatches for o in report.outputs):
        return {b.block for b in report.blocks}
    return {b.block for b in report.blocks if b.accumulated.shape_mismatches == 0}


def _sensitivity_order(report: CheckReport, spec: FallbackSpec) -> list[str]:
    """Blocks by their effect on the output when quantized alone, worst first."""
    def badness(b: BlockResult) -> float:
        sens = b.sensitivity
        if spec.max_log_mel is not None and sens.log_mel_max is not None:
            return sens.log_mel_max
        return float("inf") if math.isnan(sens.sqnr_db) else -sens.sqnr_db  # nan: lengths changed, the worst

    measured = [b for b in report.blocks if b.sensitivity is not None]
    return [b.block for b in sorted(measured, key=badness, reverse=True)]


def _size_ratio(result: RunResult) -> float:
    base = result.steps[0].manifest["graphs"]
    final = result.final
    return final.total_bytes() / sum(g["bytes"] for g in base.values())


def _evaluate(report: CheckReport, result: RunResult, spec: FallbackSpec) -> tuple[str, bool]:
    out = report.outputs[0]
    parts, met = [], True
    if out.shape_mismatches:
        parts.append(f"output length differs on {out.shape_mismatches} of {report.samples} samples")
        met &= spec.min_output_sqnr_db is None
    else:
        parts.append(f"output SQNR {out.sqnr_db:.1f} dB")
    if spec.min_output_sqnr_db is not None and not out.shape_mismatches:
        met &= out.sqnr_db >= spec.min_output_sqnr_db
    if spec.max_log_mel is not None:
        if out.audio is None:
            raise PipelineError("check.fallback.max_log_mel needs an audio output, and this model has none")
        parts.append(f"log-mel max {out.audio.log_mel_max:.4f}")
        met &= out.audio.log_mel_max <= spec.max_log_mel
    size = _size_ratio(result)
    parts.append(f"size {size:.3f}x")
    if spec.max_size_ratio is not None:
        met &= size <= spec.max_size_ratio
    return ", ".join(parts) + (" (target met)" if met else " (target missed)"), met


def _ranked_candidates(report: CheckReport, result: RunResult, index: int, moved: list[str]) -> list[str]:
    """Blocks the fallback step changed the precision of (its stats' `blocks_changed`), worst isolated SQNR first.

    When the output's length changed (a duration flipped), the cause lies upstream of
    where shapes first differ: blocks whose accumulated outputs still match the
    reference in shape come first, since moving a block downstream cannot undo it.
    """
    step = result.steps[index + 1].manifest  # steps[0] is the base
    touched = set()
    for stats in step.get("stats", {}).values():
        # Every precision pass reports `blocks_changed`; a step cached before it did has only quantize's key.
        touched.update(stats.get("blocks_changed", stats.get("quantized_per_block", {})))
    length_changed = any(o.shape_mismatches for o in report.outputs)
    ranked = sorted(((length_changed and b.accumulated.shape_mismatches > 0), b.isolated.sqnr_db, b.block)
                    for b in report.blocks if b.block in touched and b.block not in moved and b.matched)
    return [b for *_, b in ranked]
