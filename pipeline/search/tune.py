"""`pipeline tune`: choose every block's precision from a menu, under a quality target.

The search is measured, not guessed (the plan of NNCF's accuracy control and
ModelOpt's AutoQuantize, on this tool's blocks):

1. **Items**: each menu item (a precision pass and its params) treats every
   searched block at once; one build per item, cached like any run's steps.
2. **Screening**: every (block, item) pair alone: the FP32 graph with that
   block spliced in from the item's graph, run on the tune samples. Its
   end-output effect (log-mel distance, noise ratio, length change) is the
   block's quality cost under that item; its bytes come from the item's graph,
   and its latency from an ONNX Runtime profile of the item's graph,
   attributed to blocks by node name.
3. **Choice**: an additive model (costs and quality terms summed over blocks)
   picks the cheapest combination whose predicted quality meets the target,
   for each objective weighting (size, latency, or both: the Pareto front).
4. **Verification**: the combination is built and run whole. Errors do not
   add exactly (durations flip jointly), so the measurement rescales the
   model's predictions, a length change bans the choice upstream of it that
   costs the most quality, and the choice is made again, until it holds.

Every trial's result is cached by content (the graphs' hashes, the block, the
samples) under `DIR/tune/trials/`, so an interrupted or repeated search
resumes. The result is `DIR/resolved_recipe.yaml` (explicit steps, one per
menu item used, scoped to its blocks), built into `DIR/final/` and checked on
the evaluation inputs like any recipe; `DIR/tune/trials.jsonl` logs every
trial, and the report gets a section with every verified candidate.
"""
from __future__ import annotations

import json
import math
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from calibration import SourceContext

from pipeline.families import draw_samples

from pipeline.core.feeds import Feeds

from pipeline import __version__
from pipeline.core import progress
from pipeline.core.blocks import BlockPartition
from pipeline.core.errors import PipelineError, few
from pipeline.search.derive import derive, write_resolved
from pipeline.core.modelset import ModelSet
from pipeline.core.onnx_io import load_mapped, load_onnx
from pipeline.core.recipe import CalibrationSpec, Recipe, Scope, Step, TuneSpec, parse_params, user_pattern
from pipeline.evaluation.results import TuneCandidate, TuneSummary
from pipeline.engine.plan import Plan, plan_recipe, replan
from pipeline.engine.runfolder import RESOLVED_RECIPE
from pipeline.engine.runner import Runner, RunResult
from pipeline.core.hashing import content_hash, feeds_hash  # the cache keys of steps, for trials alike
from pipeline.search.apart import run_apart
from pipeline.search.trials import TrialSpec, make_executor, release_graphs

TUNE_DIR = "tune"
FP32 = "fp32"  # the choice every block has: no menu item
# Objective weightings (size, latency) the choice is made under; the small weight breaks ties.
WEIGHTINGS = {"size": [(1.0, 1e-3)], "latency": [(1e-3, 1.0)], "both": [(1.0, 1e-3), (1.0, 1.0), (1e-3, 1.0)]}
LATENCY_THREADS = 2  # what latency is measured (and profiled) with, as `pipeline bench` does
SEARCHED_BOUNDS = ("max_log_mel", "min_output_sqnr_db")  # quality bounds a trial measures (quality_terms)
VERIFIED_BOUNDS = ("max_wer_increase",)  # bounds only a verification measures (ASR is too slow for every trial)


def validate_tune(recipe: Recipe, family, where: str) -> None:
    """Everything about a `tune:` section that can be checked before any work."""
    from passes import PASSES, get_pass

    spec = recipe.tune
    # A recipe's own steps run before the search, which starts from their result (a quantized export's
    # `dequantize`); the search writes the rest (into RESOLVED_RECIPE).
    precision = [s.label for s in recipe.steps if get_pass(s.pass_name, f"{where}: steps").changes_precision]
    if precision:
        raise PipelineError(f"{where}: steps: {', '.join(precision)} change precision: with 'tune', the search "
                            f"decides every block's precision (steps before it may prepare the model: "
                            f"dequantize, simplify, ...)")
    if recipe.check is not None and recipe.check.fallback is not None:
        raise PipelineError(f"{where}: check.fallback: use either 'tune' or the fallback, not both")
    if family.autoregressive:
        raise PipelineError(f"{where}: tune: a {family.name!r} model set is an autoregressive loop of graphs; "
                            f"tune searches one-graph models so far (a voice, a vocoder, an ONNX file)")
    names = [m.name for m in spec.menu]
    if len(set(names)) != len(names):
        raise PipelineError(f"{where}: tune.menu: item names must differ ({', '.join(names)})")
    kinds = ", ".join(n for n, cls in PASSES.items() if cls.changes_precision)
    for i, item in enumerate(spec.menu):
        at = f"{where}: tune.menu.{i} ({item.name})"
        if item.name == FP32:
            raise PipelineError(f"{at}: 'fp32' is every block's choice already; name a precision pass's item")
        pass_ = get_pass(item.pass_name, at)
        if not pass_.changes_precision:
            raise PipelineError(f"{at}: pass {item.pass_name!r} does not change precision; a menu takes {kinds}")
        params = parse_params(pass_.Params, item.params, f"{at}.params")
        if pass_.needs_calibration_for(params) and recipe.calibration is None:
            raise PipelineError(f"{at}: pass {item.pass_name!r} needs calibration data, but the recipe has no "
                                f"'calibration' section")
    _check_target(spec, family, where)
    for pattern in (spec.blocks.include or []) + spec.blocks.exclude:
        try:
            user_pattern(pattern)
        except re.error as e:
            raise PipelineError(f"{where}: tune.blocks: {pattern!r} is not a valid regex: {e}") from None
    if spec.source is None and recipe.calibration is None:
        raise PipelineError(f"{where}: tune.source: the tune samples need a source (tune.source or the "
                            f"recipe's calibration)")
    if spec.executor == "ray":
        from pipeline.search.trials import probe_address, require_ray

        require_ray()
        if spec.address not in (None, "auto"):
            probe_address(spec.address)  # a cluster that does not answer fails here, in seconds


def _check_target(spec: TuneSpec, family, where: str) -> None:
    from pipeline.evaluation.metrics import check_limits, metrics_for, require_measurable

    limits = check_limits(spec.target)
    require_measurable(limits, metrics_for(family, None), family, f"{where}: tune.target")
    unsupported = [k for k in limits if k not in SEARCHED_BOUNDS + VERIFIED_BOUNDS]
    if unsupported:
        raise PipelineError(f"{where}: tune.target.{unsupported[0]}: the search measures "
                            f"{', '.join(SEARCHED_BOUNDS)} and max_length_change on a one-graph model, "
                            f"not {unsupported[0]}")
    if spec.target.max_wer_increase is not None:
        from pipeline.evaluation.asr import require_installed

        require_installed(f"{where}: tune.target.max_wer_increase")


@dataclass
class Option:
    """One choice for one block: its changes against FP32 (bytes, seconds) and its quality terms."""

    item: str
    bytes: float = 0.0
    latency_s: float = 0.0
    quality: dict[str, float] = field(default_factory=dict)
    banned: str | None = None


@dataclass
class Verified:
    assignment: dict[str, str]
    key: str
    folder: Path
    size_ratio: float
    latency_ratio: float | None
    result: dict[str, Any]
    met: bool
    misses: list[str]
    predicted: dict[str, float]
    weighting: tuple[float, float]


class Tuner:
    def __init__(self, plan: Plan, out_dir: Path, log: Callable[[str], None] = print):
        self.plan = plan  # the user's recipe, planned once: the base and the chosen model are replanned from it
        self.recipe = recipe = plan.recipe
        self.build_plan: Plan | None = None  # the plan of an item or candidate build (the base file as model)
        self.spec: TuneSpec = recipe.tune
        self.out_dir = out_dir.resolve()  # item and candidate recipes name the base file by absolute path
        self.dir = self.out_dir / TUNE_DIR
        self.log = log
        self.trials_run = 0
        self.latency_scale = 1.0  # measured / profiled latency savings, corrected by verification
        self.log_rows: list[dict[str, Any]] = []
        self.start = time.perf_counter()

    # -- the whole search ----------------------------------------------------

    def run(self) -> RunResult:
        """The search, into `out_dir`, which the caller holds: base, items, screening, candidates, the chosen
        model built by the resolved recipe."""
        where = str(self.recipe.source_path or self.recipe.name)
        base = self._base()
        self.base_path = base.path(base.names()[0])
        from pipeline.families import declare_audio, family_of

        self.family = declare_audio(family_of(base), self.recipe.model.audio)
        validate_tune(self.recipe, self.family, where)
        # The base stays light while every item and candidate is built: its weights mapped from one scratch file,
        # not held by this process beside each build's own (a float Kokoro's search peaked at 2.9 GB holding it).
        scratch = tempfile.TemporaryDirectory(dir=self.dir, prefix=".base-weights-")
        try:
            self.base_model, self.base_weights = load_mapped(self.base_path, Path(scratch.name))
            self.partition = BlockPartition(self.base_model, self.recipe.blocks)
            self.searched = self._searched_blocks(where)
            self.samples, self.samples_desc = self._samples(base, where)
            self.audio = self.family.audio(base)
            self.ref_outputs = self._reference_outputs()
            self.executor = make_executor(self.spec.executor, self.spec.address, self.spec.workers,
                                          self.spec.threads, self.log)
            try:
                items = {m.name: self._item(m) for m in self.spec.menu}
                options = self._screen(items, where)
                verified = self._search(options)
            finally:
                self.executor.close()
        finally:
            release_graphs()
            scratch.cleanup()
        chosen = self._choose(verified)
        (self.dir / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.log_rows))
        resolved = self._resolved(chosen.assignment if chosen else {})
        name = self.recipe.source_path.name if self.recipe.source_path else self.recipe.name
        resolved_path = write_resolved(resolved, self.out_dir, f"`pipeline tune` from {name}")
        if chosen is None:
            best = min(verified, key=lambda v: len(v.misses)) if verified else None
            raise PipelineError(f"tune: no verified candidate meets the target after {self.trials_run} trials"
                                + (f" (closest: {'; '.join(best.misses)})" if best else "")
                                + f"; trials log in {self.dir / 'trials.jsonl'}")
        self.log(f"tune: chosen {self._describe(chosen)}; resolved recipe {resolved_path}")
        # Built and checked in a process of its own: the check does not start on the search's leftovers.
        return run_apart(replan(self.plan, resolved), self.out_dir, self.log,
                         finish=WithSummary(self._summary(verified, chosen), self.out_dir))

    def _without_tune(self, recipe: Recipe, steps: list[Step] | None = None, model: dict | None = None,
                      check: bool = True, targets: bool = False) -> Recipe:
        sections: dict[str, Any] = {"tune": None, "steps": steps or []}
        if not targets:  # formats beside ONNX are for the chosen model only, not for every candidate
            sections["targets"] = []
        if model is not None:
            sections["model"] = model
        if not check:
            sections["check"] = None
        return derive(recipe, **sections)

    def _base(self) -> ModelSet:
        """The base model (exported or copied, then the recipe's own steps), once; items and candidates start
        from its file."""
        prepared = self._without_tune(self.recipe, self.recipe.steps, check=False)
        result = Runner(replan(self.plan, prepared), self.dir / "base", log=lambda m: self.log(f"tune: {m}")).run()
        base = ModelSet.read(self.dir / "base" / "steps" / result.steps[-1].folder)
        if len(base.names()) != 1:
            raise PipelineError(f"tune: searches one-graph models so far; this model set has "
                                f"{len(base.names())} graphs ({', '.join(base.names())})")
        return base

    def _searched_blocks(self, where: str) -> list[str]:
        ids = self.partition.ids()
        include, exclude = self.spec.blocks.include, self.spec.blocks.exclude
        for pattern in (include or []) + exclude:
            if not any(user_pattern(pattern).fullmatch(b) for b in ids):
                raise PipelineError(f"{where}: tune.blocks: {pattern!r} matches no block (blocks: "
                                    f"{few(ids, 12)})")
        return [b for b in ids if (include is None or any(user_pattern(p).fullmatch(b) for p in include))
                and not any(user_pattern(p).fullmatch(b) for p in exclude)]

    def _samples(self, base: ModelSet, where: str) -> tuple[list[Feeds], str]:
        spec: CalibrationSpec = self.spec.source or self.recipe.calibration
        feeds, source = draw_samples(spec.source, spec.params, SourceContext(self.base_path, self.recipe.resolve_path),
                                     self.base_model, f"{where}: tune.source", self.family, base)
        asked = self.spec.samples
        if asked != "all" and asked > len(feeds) and "samples" in self.spec.model_fields_set:
            raise PipelineError(f"{where}: tune.samples: {asked} samples asked, but {source.describe()} holds "
                                f"{len(feeds)}; use samples: all or at most {len(feeds)}")
        n = len(feeds) if asked == "all" else min(asked, len(feeds))  # the default 8 takes at most what there is
        picked = sorted(np.random.default_rng(self.spec.seed).choice(len(feeds), n, replace=False).tolist())
        self.log(f"tune: {n} tune samples of {len(feeds)} from {source.describe()} (seed {self.spec.seed})")
        texts = source.texts()
        if self.spec.target.max_wer_increase is not None and texts is None:
            raise PipelineError(f"{where}: tune.target.max_wer_increase: the tune samples ({source.describe()}) "
                                f"carry no text to score transcripts against")
        self.sample_texts = None if texts is None else [texts[i] for i in picked]
        return [feeds[i] for i in picked], f"{n} of {source.describe()}, seed {self.spec.seed}, samples {picked}"

    def _reference_outputs(self) -> list[np.ndarray]:
        from pipeline.core.onnx_io import session

        sess = session(self.base_model, threads=self.spec.threads, arena=False, weights_dir=self.base_weights)
        name = (self.audio.output if self.audio else None) or sess.get_outputs()[0].name
        return [sess.run([name], f)[0] for f in self.samples]

    # -- items and screening ---------------------------------------------------

    def _model_source(self) -> dict[str, Any]:
        source = {"path": str(self.base_path), "family": self.family.name}
        if self.recipe.model.audio is not None:  # the derived recipes measure the same audio
            source["audio"] = self.recipe.model.audio.model_dump(mode="json", exclude_none=True)
        return source

    def _steps(self, assignment: dict[str, str]) -> list[Step]:
        """One step per menu item used, in menu order, scoped to its blocks (exact ids, in graph order)."""
        steps = []
        for item in self.spec.menu:
            blocks = [b for b in self.partition.ids() if assignment.get(b) == item.name]
            if blocks:
                steps.append(Step.model_validate({"pass": item.pass_name, "name": item.name, "params": item.params,
                                                  "scope": Scope(include=[re.escape(b) for b in blocks])}))
        return steps

    def _build(self, assignment: dict[str, str], folder: Path) -> RunResult:
        recipe = self._without_tune(self.recipe, self._steps(assignment), model=self._model_source(), check=False)
        # Every build runs on the base file: planned once (loaded, its family found), replanned per assignment.
        self.build_plan = replan(self.build_plan, recipe) if self.build_plan else plan_recipe(recipe)
        return Runner(self.build_plan, folder, log=lambda m: None).run()

    def _item(self, item) -> dict[str, Any]:
        """The item applied to every searched block: its graph, the blocks it changed, their bytes."""
        from pipeline.evaluation.blockwise import block_bytes

        self.log(f"tune: item {item.name}: {item.pass_name} on {len(self.searched)} blocks ...")
        result = self._build({b: item.name for b in self.searched}, self.dir / "items" / item.name)
        stats = result.steps[-1].manifest.get("stats", {}) if len(result.steps) > 1 else {}
        changed = set()
        for s in stats.values():
            changed.update(s.get("blocks_changed", {}))
        path = result.final.path(result.final.names()[0])
        model = load_onnx(path)
        sizes, _ = block_bytes(model, BlockPartition(model, self.recipe.blocks))
        return {"path": path, "sha": result.final.graphs[0].sha256,
                "changed": [b for b in self.searched if b in changed], "bytes": sizes}

    def _screen(self, items: dict[str, dict[str, Any]], where: str) -> dict[str, list[Option]]:
        from pipeline.evaluation.blockwise import block_bytes

        base_bytes, _ = block_bytes(self.base_model, self.partition)
        self.base_sha = _sha(self.base_path)
        specs = [self._trial_spec(items[m]["sha"], b) for m in items for b in items[m]["changed"]]
        pairs = [(m, b) for m in items for b in items[m]["changed"]]
        budget = self.spec.budget.trials
        if budget is not None and budget < len(specs) + 1:
            raise PipelineError(f"{where}: tune.budget.trials: {budget} is too small: measuring every block once "
                                f"under each menu item takes {len(specs)} trials, plus at least one verification")
        sources = {self.base_sha: str(self.base_path)} | {items[m]["sha"]: str(items[m]["path"]) for m in items}
        self.item_of = {items[m]["sha"]: m for m in items}
        results = self._trials(specs, sources, "screening")
        latency = self._latencies(items) if self._needs_latency() else {}
        options: dict[str, list[Option]] = {b: [] for b in self.searched}
        for (m, b), spec in zip(pairs, specs):
            r = results[spec.key]
            option = Option(m, bytes=items[m]["bytes"].get(b, 0) - base_bytes.get(b, 0),
                            latency_s=latency.get(m, {}).get(b, 0.0), quality=self._quality_terms(r))
            if r["length_change_max"] > self.spec.target.max_length_change:
                option.banned = f"length changed by {r['length_change_max']:.2%} alone"
            options[b].append(option)
        return options

    def _trial_spec(self, candidate_sha: str, block: str | None) -> TrialSpec:
        declared = self.recipe.model.audio
        key = content_hash({"version": __version__, "reference": self.base_sha, "candidate": candidate_sha, "block": block,
                     "samples": feeds_hash(self.samples), "threads": self.spec.threads,
                     "blocks": self.recipe.blocks.model_dump(mode="json") if self.recipe.blocks else None,
                     # (only when declared: trials cached without it keep their keys)
                     **({"audio": declared.model_dump(mode="json")} if declared else {})})
        return TrialSpec(key, self.base_sha, candidate_sha, block,
                         self.recipe.blocks.model_dump(mode="json") if self.recipe.blocks else None,
                         self.audio.mel if self.audio else None, self.spec.threads,
                         self.audio.output if self.audio else None)

    def _trials(self, specs: list[TrialSpec], sources: dict[str, str], what: str) -> dict[str, dict[str, Any]]:
        """Results by key: cached ones read back, the rest run on the executor (and cached as they finish)."""
        folder = self.dir / "trials"
        folder.mkdir(parents=True, exist_ok=True)
        results, todo = {}, []
        for s in specs:
            try:
                results[s.key] = json.loads((folder / f"{s.key}.json").read_text())
                self._logged(s, results[s.key], cached=True, kind=what)
            except (OSError, json.JSONDecodeError):
                todo.append(s)
        self.trials_run += len(specs) - len(todo)
        done = len(specs) - len(todo)
        if todo:
            self.log(f"tune: {what}: {len(todo)} trials to run ({done} cached)")
        for s, r in self.executor.map(todo, sources, self.samples, self.ref_outputs):
            self._over_budget(what, len(specs) - done)
            tmp = folder / f".{s.key}.tmp"
            tmp.write_text(json.dumps(r))
            tmp.replace(folder / f"{s.key}.json")
            results[s.key] = r
            self._logged(s, r, cached=False, kind=what)
            done += 1
            self.trials_run += 1
            progress.update(f"tune: {what} trials", done - (len(specs) - len(todo)), len(todo))
        return results

    def _over_budget(self, what: str, left: int) -> None:
        limit = self.spec.budget.minutes
        if limit is not None and time.perf_counter() - self.start > limit * 60:
            raise PipelineError(f"tune: budget.minutes ({limit:g}) ran out during {what} with {left} trials left; "
                                f"finished trials are cached: re-run with a larger budget to resume")

    def _budget_spent(self) -> bool:
        """Verification stops here (the best verified candidate is chosen); screening cannot stop short."""
        b = self.spec.budget
        return (b.trials is not None and self.trials_run >= b.trials) or \
            (b.minutes is not None and time.perf_counter() - self.start > b.minutes * 60)

    def _logged(self, spec: TrialSpec, result: dict[str, Any], cached: bool, kind: str) -> None:
        self.log_rows.append({"kind": kind, "key": spec.key, "item": self.item_of.get(spec.candidate),
                              "candidate": spec.candidate, "block": spec.block,
                              "cached": cached, **result})

    def _quality_terms(self, r: dict[str, Any]) -> dict[str, float]:
        return quality_terms(r, self._limits())

    def _limits(self) -> dict[str, float]:
        return term_limits(self.spec.target)

    def _needs_latency(self) -> bool:
        return self.spec.objective != "size" or self.spec.target.max_latency_ratio is not None

    # -- latency by block ----------------------------------------------------

    def _latencies(self, items: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
        """Seconds each block's change saves or costs under each item (negative: faster), from profiles."""
        base = self._profile(self.base_path)
        self.base_latency_s = sum(base.values())
        deltas = {}
        for m, item in items.items():
            prof = self._profile(item["path"])
            changed = item["changed"]
            delta = {b: prof.get(b, 0.0) - base.get(b, 0.0) for b in changed}
            # Time in nodes ONNX Runtime made (layout transposes, fused Q/DQ) goes to the changed blocks,
            # in proportion to their own time under the item.
            extra = prof.get("", 0.0) - base.get("", 0.0)
            weight = sum(prof.get(b, 0.0) for b in changed) or 1.0
            deltas[m] = {b: delta[b] + extra * prof.get(b, 0.0) / weight for b in changed}
        return deltas

    def _profile(self, path: Path) -> dict[str, float]:
        """Seconds per pass over the tune samples, by block ('' for nodes of no block), cached by content."""
        cache = self.dir / "profiles" / f"{_sha(path)}.json"
        try:
            return json.loads(cache.read_text())
        except (OSError, json.JSONDecodeError):
            pass
        times = profile_blocks(path, self.samples, self.partition, threads=LATENCY_THREADS,
                               workdir=self.dir / "profiles")
        cache.write_text(json.dumps(times))
        return times

    # -- choice and verification ---------------------------------------------

    def _search(self, options: dict[str, list[Option]]) -> list[Verified]:
        """Choose, verify, correct the model with what was measured, choose again; per objective weighting."""
        verified: dict[str, Verified] = {}
        limits = self._limits()
        for weighting in WEIGHTINGS[self.spec.objective]:
            scale, margin, seen = {d: 1.0 for d in limits}, 1.0, set()
            for _ in range(self.spec.budget.verify_rounds):
                assignment, predicted = self._solve_within_bounds(options, limits, scale, weighting, margin)
                key = content_hash(sorted(assignment.items()))
                if key in seen:
                    break  # the measurements no longer change the choice
                seen.add(key)
                if key not in verified and self._budget_spent():
                    self.log(f"tune: budget spent; choosing among the {len(verified)} candidates verified")
                    return list(verified.values())
                v = verified.get(key) or self._verify(assignment, key, predicted, weighting)
                verified[key] = v
                measured = quality_terms(v.result, limits)
                slack = all(measured[d] <= 0.7 * limits[d] for d in limits)
                if v.met and not slack:
                    break
                if not self._repair(v, options, scale, predicted, limits):
                    break
                margin = 1.0 if v.met else 0.95  # after a miss, aim a little inside the bound
        return list(verified.values())

    def _solve_within_bounds(self, options, limits, scale, weighting, margin):
        """`solve`, with the weight of size or latency raised while the prediction breaks its bound
        (`max_size_ratio`, `max_latency_ratio`): those bounds are costs, so they steer the objective."""
        t = self.spec.target
        base_bytes, base_lat = self.base_path.stat().st_size, getattr(self, "base_latency_s", 1.0)
        ws, wl = weighting
        for _ in range(8):
            assignment, predicted = solve(options, limits, scale, (ws, wl), base_bytes, base_lat, margin)
            chosen = [o for b, item in assignment.items() for o in options[b] if o.item == item]
            predicted["size_ratio"] = 1 + sum(o.bytes for o in chosen) / base_bytes
            predicted["latency_ratio"] = 1 + self.latency_scale * sum(o.latency_s for o in chosen) / base_lat
            if "log_mel_sq" in predicted:
                predicted["log_mel_max"] = math.sqrt(predicted["log_mel_sq"])
            over_size = t.max_size_ratio is not None and predicted["size_ratio"] > t.max_size_ratio
            over_latency = t.max_latency_ratio is not None and predicted["latency_ratio"] > t.max_latency_ratio
            if not (over_size or over_latency):
                break
            ws, wl = ws * (4 if over_size else 1), wl * (4 if over_latency else 1)
        return assignment, predicted

    def _repair(self, v: Verified, options, scale, predicted, limits) -> bool:
        """Correct the additive model with a verified candidate's measurements; False: nothing to correct."""
        if v.result["length_change_max"] > self.spec.target.max_length_change:
            return self._ban_length_cause(v, options)
        changed, measured_terms = False, quality_terms(v.result, limits)
        bound = self.spec.target.max_latency_ratio
        saved, predicted_saved = 1 - v.latency_ratio, 1 - predicted["latency_ratio"]
        if bound is not None and v.latency_ratio > bound and predicted_saved > 0.01:
            # The profile's per-block savings did not all add up: trust them in proportion.
            new = self.latency_scale * max(saved, 0.0) / predicted_saved
            changed |= abs(new / self.latency_scale - 1) > 0.02
            self.latency_scale = max(new, 0.05)
        for d in limits:
            measured = measured_terms[d]
            if measured <= 0 or predicted.get(d, 0.0) <= 0:
                continue
            new = scale[d] * measured / predicted[d]  # errors added less (or more) than the sum says
            changed |= abs(new / scale[d] - 1) > 0.02
            scale[d] = new
        return changed

    def _ban_length_cause(self, v: Verified, options) -> bool:
        """A joint length change: ban the choice upstream of where shapes first differ that costs the most."""
        lossy = [(b, m) for b, m in v.assignment.items() if m != FP32]
        pool = [p for p in lossy if p[0] in set(v.result.get("upstream", []))] or lossy
        if not pool:
            return False

        def badness(pair):
            opt = next(o for o in options[pair[0]] if o.item == pair[1])
            return sum(opt.quality.values())

        block, item = max(pool, key=badness)
        for o in options[block]:
            if o.item == item:
                o.banned = f"lengths changed jointly in a verified candidate ({v.key[:12]})"
        self.log(f"tune: lengths changed; {block} may no longer take {item}")
        return True

    def _verify(self, assignment: dict[str, str], key: str, predicted: dict[str, float],
                weighting: tuple[float, float]) -> Verified:
        """Build the combination, measure it whole (cached by what builds it), and keep only the numbers."""
        steps = self._steps(assignment)
        trial_key = content_hash({"version": __version__, "base": self.base_sha, "samples": feeds_hash(self.samples),
                           "steps": [s.model_dump(mode="json", by_alias=True) for s in steps],
                           "blocks": self.recipe.blocks.model_dump(mode="json") if self.recipe.blocks else None,
                           "calibration": self.recipe.calibration.model_dump(mode="json")
                           if self.recipe.calibration else None, "threads": self.spec.threads,
                           **({"asr": self.sample_texts} if self._wants_asr() else {})})
        cache = self.dir / "trials" / f"{trial_key}.json"
        try:
            r, cached = json.loads(cache.read_text()), True
        except (OSError, json.JSONDecodeError):
            r, cached = self._measure_whole(assignment, key), False
            cache.write_text(json.dumps(r))
        self.trials_run += 1
        self.log_rows.append({"kind": "verification", "key": trial_key, "assignment": assignment, "cached": cached,
                              **r})
        misses = self._misses(r, r["size_ratio"])
        v = Verified(assignment, key, self.dir / "candidates" / key[:16], r["size_ratio"], r["latency_ratio"], r,
                     not misses, misses, predicted, weighting)
        self.log(f"tune: verified {self._describe(v)}")
        return v

    def _measure_whole(self, assignment: dict[str, str], key: str) -> dict[str, Any]:
        """Quality, size and latency of the built combination; where lengths changed, the blocks upstream of it."""
        self.log(f"tune: verifying {_counts(assignment)} ...")
        with progress.activity(f"tune: verifying candidate {key[:8]}"):
            return self._measure_built(assignment, key)

    def _measure_built(self, assignment: dict[str, str], key: str) -> dict[str, Any]:
        import shutil

        from pipeline.search.trials import run_trial

        folder = self.dir / "candidates" / key[:16]
        result = self._build(assignment, folder)
        path = result.final.path(result.final.names()[0])
        spec = self._trial_spec(result.final.graphs[0].sha256, None)
        # One trial at a time here: it takes the threads the latency is measured with.
        r = run_trial(replace(spec, threads=LATENCY_THREADS), str(self.base_path), str(path), self.samples,
                      self.ref_outputs)
        r["size_ratio"] = result.final.total_bytes() / self.base_path.stat().st_size
        r["latency_ratio"] = self._latency_ratio(path)
        if self._wants_asr():
            r.update(self._asr(path))
        if r["length_change_max"] > self.spec.target.max_length_change:
            from pipeline.evaluation.blockwise import compare_models

            report = compare_models(self.base_model, load_onnx(path), self.samples, self.recipe.blocks,
                                    threads=LATENCY_THREADS, weights_dirs=(self.base_weights, None))
            r["upstream"] = [b.block for b in report.blocks if b.accumulated.samples and not b.accumulated.shape_mismatches]
        shutil.rmtree(folder, ignore_errors=True)  # the numbers are kept; the resolved recipe rebuilds the model
        return r

    def _wants_asr(self) -> bool:
        return self.spec.target.max_wer_increase is not None

    def _asr(self, path: Path) -> dict[str, float]:
        """WER of the FP32 model's and the candidate's speech of the tune samples (the FP32 transcripts come from
        the transcript cache after the first candidate)."""
        from pipeline.core.onnx_io import session
        from pipeline.evaluation.asr import measure_asr

        sess = session(path, threads=LATENCY_THREADS)
        name = (self.audio.output if self.audio else None) or sess.get_outputs()[0].name
        pairs = [(np.asarray(r, np.float32).reshape(-1), np.asarray(sess.run([name], f)[0], np.float32).reshape(-1))
                 for r, f in zip(self.ref_outputs, self.samples)]
        a = measure_asr(pairs, self.sample_texts, self.audio.mel.sample_rate)
        return {"wer_reference": a.wer_reference, "wer_candidate": a.wer_candidate, "wer_increase": a.wer_increase}

    def _latency_ratio(self, path: Path) -> float:
        """Candidate / base latency over the tune samples, 2 threads, the two timed in turns in a process of
        their own (its sessions' memory does not land on the search's)."""
        from pipeline.engine.bench import time_interleaved_apart

        base, candidate = time_interleaved_apart([self.base_path, path], self.samples, LATENCY_THREADS, repeat=5)
        return candidate / base

    def _misses(self, r: dict[str, Any], size: float) -> list[str]:
        t, misses = self.spec.target, []
        if r["length_change_max"] > t.max_length_change:
            misses.append(f"length changed on {r['samples_with_length_change']} samples "
                          f"(max {r['length_change_max']:.2%})")
        if t.max_log_mel is not None and r.get("log_mel_max", 0) > t.max_log_mel:
            misses.append(f"log-mel max {r['log_mel_max']:.4f} > {t.max_log_mel}")
        sqnr = r["sqnr_db"]
        if t.min_output_sqnr_db is not None and sqnr != "inf" and (sqnr is None or float(sqnr) < t.min_output_sqnr_db):
            misses.append(f"output SQNR {sqnr} dB < {t.min_output_sqnr_db}")
        if t.max_size_ratio is not None and size > t.max_size_ratio:
            misses.append(f"size {size:.3f}x > {t.max_size_ratio}")
        if t.max_latency_ratio is not None and r["latency_ratio"] > t.max_latency_ratio:
            misses.append(f"latency {r['latency_ratio']:.2f}x > {t.max_latency_ratio}")
        if t.max_wer_increase is not None and r.get("wer_increase", 0.0) > t.max_wer_increase:
            misses.append(f"WER {r['wer_reference']:.1f}% -> {r['wer_candidate']:.1f}% "
                          f"(+{r['wer_increase']:.1f} points > {t.max_wer_increase})")
        return misses

    def _choose(self, verified: list[Verified]) -> Verified | None:
        met = [v for v in verified if v.met]
        if not met:
            return None
        objective = self.spec.objective
        if objective == "size":
            return min(met, key=lambda v: (round(v.size_ratio, 4), v.latency_ratio or 0, v.key))
        if objective == "latency":
            return min(met, key=lambda v: (round(v.latency_ratio, 3), v.size_ratio, v.key))
        front = pareto(met)
        return min(front, key=lambda v: (v.size_ratio * v.latency_ratio, v.key))

    # -- output ----------------------------------------------------------------

    def _resolved(self, assignment: dict[str, str]) -> Recipe:
        return self._without_tune(self.recipe, [*self.recipe.steps, *self._steps(assignment)], targets=True)

    def _describe(self, v: Verified) -> str:
        lat = f", latency {v.latency_ratio:.2f}x" if v.latency_ratio is not None else ""
        quality = (f"log-mel max {v.result['log_mel_max']:.4f}, " if "log_mel_max" in v.result else "") + \
            f"SQNR {_fmt_db(v.result['sqnr_db'])} dB, length change max {v.result['length_change_max']:.2%}"
        return (f"{_counts(v.assignment)}: size {v.size_ratio:.3f}x{lat}, {quality}"
                + ("" if v.met else f" (misses: {'; '.join(v.misses)})"))

    def _summary(self, verified: list[Verified], chosen: Verified) -> TuneSummary:
        front = {v.key for v in pareto([v for v in verified if v.met])} if chosen else set()
        cands = [TuneCandidate(key=v.key[:16], choices=_counts(v.assignment), size_ratio=v.size_ratio,
                               latency_ratio=v.latency_ratio, log_mel_max=v.result.get("log_mel_max"),
                               sqnr_db=_float_or_none(v.result["sqnr_db"]), length_change_max=v.result["length_change_max"],
                               wer_increase=v.result.get("wer_increase"),
                               predicted=v.predicted, met=v.met, misses=v.misses, pareto=v.key in front,
                               chosen=v is chosen)
                 for v in verified]
        return TuneSummary(objective=self.spec.objective, target=self.spec.target.model_dump(mode="json", exclude_none=True),
                           samples=self.samples_desc, blocks_searched=len(self.searched),
                           menu=[m.name for m in self.spec.menu], trials=self.trials_run,
                           screening_trials=sum(1 for r in self.log_rows if r["kind"] == "screening"),
                           executor=self.spec.executor, wall_s=round(time.perf_counter() - self.start, 1),
                           candidates=cands)


def quality_terms(r: dict[str, Any], limits: dict[str, float]) -> dict[str, float]:
    """A trial's quality as terms that add up over blocks (the keys of `limits`).

    Log-mel distances of independent errors combine like a root sum of squares: six vocoder resblocks
    measured at 0.014-0.050 alone gave 0.068 together, where the root of their squares says 0.071 and
    their plain sum 0.156. So that term is the distance squared. Output noise powers add (SQNR), so that
    term is the noise ratio itself."""
    terms = {}
    if "log_mel_sq" in limits:
        terms["log_mel_sq"] = r.get("log_mel_max", 0.0) ** 2
    if "noise" in limits:
        terms["noise"] = r["noise_ratio"]
    return terms


def term_limits(target) -> dict[str, float]:
    """The bound on each term's sum, from the tune target."""
    limits = {}
    if target.max_log_mel is not None:
        limits["log_mel_sq"] = target.max_log_mel ** 2
    if target.min_output_sqnr_db is not None:
        limits["noise"] = 10 ** (-target.min_output_sqnr_db / 10)
    return limits


def solve(options: dict[str, list[Option]], limits: dict[str, float], scale: dict[str, float],
          weighting: tuple[float, float], base_bytes: float, base_latency: float,
          margin: float = 1.0) -> tuple[dict[str, str], dict[str, float]]:
    """The cheapest assignment whose predicted quality (scaled sum of each term) stays within the limits.

    Greedy on a multiple-choice knapsack: every block starts at its cheapest allowed option; while the
    prediction is over, the move with the most quality gained per cost paid is made; then moves that save
    cost are made while the prediction holds. Returns {block: item} and the prediction per term."""
    ws, wl = weighting
    fp32 = Option(FP32)

    def cost(o: Option) -> float:
        return ws * o.bytes / base_bytes + wl * o.latency_s / max(base_latency, 1e-12)

    def usage(q: dict[str, float]) -> dict[str, float]:
        return {d: scale[d] * q.get(d, 0.0) / (limits[d] * margin) for d in limits}

    def weight(o: Option, over: dict[str, float]) -> float:
        return sum(scale[d] * o.quality.get(d, 0.0) / limits[d] * (1.0 if over[d] > 1 else 0.05) for d in limits)

    choice: dict[str, Option] = {}
    for b, opts in options.items():
        allowed = [fp32] + [o for o in opts if o.banned is None]
        choice[b] = min(allowed, key=lambda o: (cost(o), sum(o.quality.values()), o.item))
    total = {d: sum(o.quality.get(d, 0.0) for o in choice.values()) for d in limits}

    def move(b: str, new: Option) -> None:
        for d in limits:
            total[d] += new.quality.get(d, 0.0) - choice[b].quality.get(d, 0.0)
        choice[b] = new

    while max(usage(total).values(), default=0) > 1:
        over = usage(total)
        best, best_gain = None, 0.0
        for b, opts in options.items():
            for o in [fp32] + [o for o in opts if o.banned is None]:
                gain = weight(choice[b], over) - weight(o, over)
                if gain <= 1e-15:
                    continue
                ratio = gain / max(cost(o) - cost(choice[b]), 1e-12)
                if best is None or ratio > best_gain:
                    best, best_gain = (b, o), ratio
        if best is None:
            break
        move(*best)
    while True:  # cheaper moves the prediction still allows
        best, best_ratio = None, 0.0
        for b, opts in options.items():
            for o in [fp32] + [o for o in opts if o.banned is None]:
                saving = cost(choice[b]) - cost(o)
                if saving <= 1e-12:
                    continue
                trial = {d: total[d] + o.quality.get(d, 0.0) - choice[b].quality.get(d, 0.0) for d in limits}
                if max(usage(trial).values(), default=0) > 1:
                    continue
                extra = max(sum(scale[d] * (trial[d] - total[d]) / limits[d] for d in limits), 1e-12)
                if best is None or saving / extra > best_ratio:
                    best, best_ratio = (b, o), saving / extra
        if best is None:
            break
        move(*best)
    predicted = {d: scale[d] * total[d] for d in limits}
    return {b: o.item for b, o in choice.items() if o.item != FP32}, predicted


def pareto(candidates: list[Verified]) -> list[Verified]:
    """Candidates no other beats on both size and latency."""
    def dominated(v: Verified) -> bool:
        return any(w.size_ratio <= v.size_ratio and (w.latency_ratio or 0) <= (v.latency_ratio or 0)
                   and (w.size_ratio, w.latency_ratio) != (v.size_ratio, v.latency_ratio) for w in candidates)

    return [v for v in candidates if not dominated(v)]


def profile_blocks(path: Path, samples: list[Feeds], partition, threads: int, workdir: Path) -> dict[str, float]:
    """ONNX Runtime's per-node kernel times over one pass of the samples (after a warm-up), summed by block.

    Optimized nodes keep their source node's name with a suffix (`/resblocks.1/convs1.0/Conv_token_5`), so a
    name maps to its block by the node it starts with, else by the block id it starts with; nodes ONNX
    Runtime made from nothing (layout transposes) go under ''."""
    import onnxruntime as ort

    workdir.mkdir(parents=True, exist_ok=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for f in samples:
        sess.run(None, f)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(workdir / "profile")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for f in samples:
        sess.run(None, f)
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    by_prefix = sorted(partition.ids(), key=len, reverse=True)
    times: dict[str, float] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = re.sub(r"(_token_\d+)+$", "", name[: -len("_kernel_time")])
        block = partition.node_block.get(node)
        if block is None:
            block = next((b for b in by_prefix if b != "/" and node.startswith(b + "/")), "")
        times[block] = times.get(block, 0.0) + e["dur"] * 1e-6
    return times


def _counts(assignment: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for item in assignment.values():
        counts[item] = counts.get(item, 0) + 1
    return ", ".join(f"{n} blocks {m}" for m, n in sorted(counts.items())) or "every block FP32"


def _fmt_db(v: Any) -> str:
    return "inf" if v == "inf" else ("-" if v is None else f"{float(v):.1f}")


def _float_or_none(v: Any) -> float | None:
    return None if v is None else float(v)


def _sha(path: Path) -> str:
    from pipeline.core.modelset import file_sha256

    return file_sha256(path)


@dataclass
class WithSummary:
    """What the chosen recipe's run does last (in its own process): the search's summary into its report."""

    summary: TuneSummary
    out_dir: Path

    def __call__(self, result: RunResult) -> None:
        if result.report is not None:
            from pipeline.report.render import write_reports

            result.report.tune = self.summary
            write_reports(result.report, self.out_dir)


def run_tune(plan: Plan, out_dir: Path, log: Callable[[str], None] = print) -> RunResult:
    """The search of `plan`'s recipe (its `tune:` section) into `out_dir`, which the caller holds."""
    return Tuner(plan, out_dir, log).run()
