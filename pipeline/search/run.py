"""Running a recipe into its run folder: the one owner of the folder's lock.

`check_recipe` is everything checked before work (`pipeline validate`, and the
start of every run); `run_recipe` holds the run folder once and runs the
recipe the way its sections ask: plain steps (the engine's `Runner`), check
rounds with a fallback, or a tune search. The runners those start inside the
folder take no lock of their own.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.core.recipe import Recipe
from pipeline.engine.plan import Plan, plan_recipe
from pipeline.engine.runfolder import hold
from pipeline.engine.runner import Runner, RunResult
from pipeline.search.fallback import run_with_fallback
from pipeline.search.tune import run_tune, validate_tune


def check_recipe(recipe: Recipe) -> Plan:
    """The recipe's plan, its search sections checked too: one clear line for anything wrong, before work."""
    return plan_recipe(recipe, check_sections=validate_tune if recipe.tune is not None else None)


def run_recipe(plan: Plan, out_dir: Path, log: Callable[[str], None] = print,
               resume_hint: str | None = None) -> RunResult:
    """Run a checked recipe into `out_dir`, holding the folder for the whole run (`runfolder.hold`)."""
    recipe = plan.recipe
    with hold(out_dir, resume_hint=resume_hint, log=log, inputs=plan.inputs, recipe=recipe.source_path,
              writes_resolved=recipe.writes_resolved):
        if recipe.check is not None and recipe.check.fallback is not None:
            return run_with_fallback(plan, out_dir, log=log)
        if recipe.tune is not None:
            return run_tune(plan, out_dir, log=log)
        return Runner(plan, out_dir, log=log).run()
