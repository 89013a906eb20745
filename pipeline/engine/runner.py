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

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from calibration import SourceContext
from passes.base import PassContext, op_counts
from pipeline import __version__
from pipeline.core import kv_cache, progress
from pipeline.core.blocks import BlockPartition, adopt_new_nodes
from pipeline.core.errors import PipelineError, during, few
from pipeline.core.feeds import Feeds
from pipeline.core.hashing import content_hash, feeds_hash
from pipeline.core.modelset import ModelSet, graph_sha256
from pipeline.core.onnx_io import (check_loads, external_files, input_caster, is_light, load_light, parse_graph, set_provenance)
from pipeline.core.procinfo import release_free_memory
from pipeline.engine.plan import Plan, PlannedStep, reference_step, refuse_large, refuse_old, selected_graphs
from pipeline.engine.runfolder import require_held
from pipeline.engine.sources import materialize_base
from pipeline.engine.step_cache import STEP_MANIFEST, building, cached, cached_target, scratch_tmpdir, write_json
from pipeline.evaluation.results import CheckReport, FormatResult
from pipeline.families import draw_samples
from pipeline.formats.targets import (TARGET_MANIFEST, FormatInputs, PlannedTarget, TargetJob, files_line, folder_size,
                                     write_target)



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


class Runner:
    def __init__(self, plan: Plan, out_dir: Path, log: Callable[[str], None] = print):
        self.plan = plan
        self.out_dir = out_dir
        self.log = log

    def run(self) -> RunResult:
        """Run the plan into `out_dir`, which its owner holds (`runfolder.hold`): base, steps, final, targets,
        check, manifest."""
        require_held(self.out_dir)
        start = time.perf_counter()
        steps_dir = self.out_dir / "steps"
        steps_dir.mkdir(parents=True, exist_ok=True)
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
            release_free_memory()  # a pass's freed protos stay resident otherwise: 0.8 GB after Kokoro's dequantize
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
                # The base, or the step `check.reference` names (records[0] is the base, records[i + 1] step i).
                reference = records[reference_step(self.plan.recipe) + 1]
                result.report = self._check(ModelSet.read(steps_dir / reference.folder), final, result.targets)
        result.wall_s = time.perf_counter() - start
        with during("writing the manifest"):
            self._write_manifest(result)
        if result.report and result.report.failures and self.plan.recipe.check.on_fail == "error":
            fails = result.report.failures
            raise PipelineError(f"check failed ({len(fails)} thresholds missed; report in "
                                f"{self.out_dir / 'report.md'}): " + few(fails, 5, "; "))
        return result

    def _entry_calibration(self, base: ModelSet) -> None:
        """An exported base's calibration feeds, checked against its entry graph now that it exists."""
        if self.plan.calibration_source is None or self.plan.calibration is not None:
            return
        family, spec = self.plan.family, self.plan.recipe.calibration
        entry = family.entry_graph(base)
        ctx = SourceContext(base.path(entry), self.plan.recipe.resolve_path)
        self.plan.calibration, _ = draw_samples(spec.source, spec.params, ctx, base.load(entry), "calibration",
                                                family, base)

    def _check(self, base: ModelSet, final: ModelSet, targets: list[dict[str, Any]]) -> CheckReport:
        """Per-block error of final vs base and the family's output metrics, then every format beside ONNX
        against the same base on the same inputs; cached by content like a step."""
        from pipeline.engine.comparison import asr_texts, eval_feeds
        from pipeline.evaluation.evaluate import evaluate
        from pipeline.evaluation.metrics import check_limits, failures, metrics_for
        from pipeline.report.render import write_reports

        check, family = self.plan.recipe.check, self.plan.family
        entry = family.entry_graph(base)
        inputs = eval_feeds(base.path(entry), check.samples, family, self.plan.recipe, check, ms=base)
        feeds = inputs.feeds
        texts = asr_texts(inputs, family, True if check.max_wer_increase is not None else check.asr, "check.asr")
        blocks, audio = self.plan.recipe.blocks, self.plan.recipe.model.audio
        # Newer keys only where set (check.reference, model.audio): the key of a recipe without them stays.
        unset = {name for name in ("reference", "asr", "max_wer_increase") if getattr(check, name) is None}
        spec = check.model_dump(mode="json", exclude={"fallback"} | unset)
        key = content_hash({"version": __version__, "base": base.content_hash(), "final": final.content_hash(),
                     "check": spec, "family": family.name,
                     "blocks": blocks.model_dump(mode="json") if blocks else None, "feeds": feeds_hash(feeds),
                     "targets": [t["key"] for t in targets],
                     **({"audio": audio.model_dump(mode="json")} if audio else {}),
                     **({"asr": texts} if texts is not None else {})})
        cached = self._cached_report(key)
        if cached is not None:
            return cached
        self.log(f"check: per-block error on {len(feeds)} samples ...")
        with progress.activity("check"):
            report = evaluate(base, final, feeds, family, blocks=blocks,
                              fp32_twin=self.references[tuple(final.names())], sensitivity=check.sensitivity,
                              decode_steps=check.decode_steps, asr_texts=texts, progress=progress.status("check"))
        report.formats = self._check_formats(base, feeds, targets) or None
        report.key = key
        report.notes.append(f"inputs: {inputs.description}")
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
            key = content_hash({"version": __version__, "exporter": recipe.model.exporter,
                         "source": source_key(params, recipe.resolve_path)})
        else:
            key = content_hash({"version": __version__, "base": graph_sha256(self.plan.model_path),  # with its weights
                         "family": self.plan.family.name})
        done = cached(steps_dir / folder, key)
        if done is not None:
            self.log("step 00 base: cached")
            return StepRecord(folder, True, done)
        t0 = time.perf_counter()
        with building(steps_dir / folder) as tmp:
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
            write_json(tmp / STEP_MANIFEST, manifest)
        self.log(f"step 00 base: {source}")
        return StepRecord(folder, False, manifest)

    def _step(self, planned: PlannedStep, source: ModelSet, steps_dir: Path, applied: list[str]) -> StepRecord:
        uses_calibration = planned.pass_.wants_calibration(planned.params) and self.plan.calibration is not None
        key = content_hash({"version": __version__, "input": source.content_hash(), "step": planned.spec(),
                     "blocks": self.plan.recipe.blocks.model_dump(mode="json") if self.plan.recipe.blocks else None,
                     "calibration": self.plan.calibration_hash() if uses_calibration else None,
                     "recipe": self.plan.recipe.name, "applied": applied})
        target = steps_dir / planned.folder
        done = cached(target, key)
        label = f"step {planned.index:02d} {planned.step.label}"
        if done is not None:
            self.log(f"{label}: cached")
            return StepRecord(planned.folder, True, done)
        self.log(f"{label}: {planned.pass_.name} ...")
        t0 = time.perf_counter()
        stats: dict[str, Any] = {}
        scope = planned.step.scope
        graphs = selected_graphs(scope, source.names(), where=f"{label}.scope.graphs")
        block_scope = scope.model_copy(update={"graphs": None})
        matched: set[str] = set()
        with building(target) as tmp, scratch_tmpdir(self.out_dir / "tmp") as scratch:
            out = source.derive(tmp)
            for graph in source.names():
                if graph not in graphs:
                    out.copy_graph_from(source, graph)
                    continue
                model = source.load(graph)  # light when large: its weights stay in source's files
                recipe = self.plan.recipe  # (what an exporter or an upgrading step made is checked only now)
                refuse_old(planned, model, source.path(graph), str(recipe.source_path or recipe.name))
                weights_dir = source.root if is_light(model) else None
                if weights_dir is not None:
                    refuse_large(planned, f"{label}: graph {graph!r}")
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
                produced = result.graphs
                if list(produced) != [graph]:  # cut into several (split)
                    out.replace_graph(graph, list(produced), result.chain)
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
            write_json(tmp / STEP_MANIFEST, manifest)
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
        key = content_hash({"last": last.content_hash(), "recipe": recipe_hash})
        done = cached(target, key, manifest=".final.json")
        if done is not None:
            return ModelSet.read(target)
        with building(target, ".final.json") as tmp:
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
            write_json(tmp / ".final.json", {"key": key, "output_hash": out.content_hash()})
        return ModelSet.read(target)

    def _target(self, planned: PlannedTarget, final: ModelSet) -> dict[str, Any]:
        """final/<format>/, written by the family from its PyTorch model; cached by what it is made from."""
        params, _, source_key = self.plan.exporter
        recipe = self.plan.recipe
        folder = self.out_dir / "final" / planned.format
        key = content_hash({"version": __version__, "format": planned.format, "params": planned.params.model_dump(mode="json"),
                     "model": source_key(params, recipe.resolve_path), "final": final.content_hash()})
        label = f"target {planned.format}"
        done = cached_target(folder, key)
        if done is not None:
            self.log(f"{label}: cached")
            return done
        self.log(f"{label}: writing ...")
        t0 = time.perf_counter()
        with building(folder, TARGET_MANIFEST) as tmp, progress.activity(label):
            job = TargetJob(planned.params, params, recipe.resolve_path, final, tmp)
            write_target(planned, job)
            record = {"format": planned.format, "key": key, "notes": job.notes,
                      "files": {p.name: folder_size(p) for p in sorted(tmp.iterdir())},
                      "wall_s": round(time.perf_counter() - t0, 3)}
            write_json(tmp / TARGET_MANIFEST, record)
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
        write_json(self.out_dir / "manifest.json", manifest)


def _graph_facts(ms: ModelSet) -> dict[str, Any]:
    facts = {}
    for g in ms.graphs:
        path = ms.root / g.file
        model = load_light(path)  # the graph alone: its weights, checked when written, stay in their files
        facts[g.name] = {"file": g.file, "bytes": path.stat().st_size, "sha256": g.sha256,
                         "nodes": len(model.graph.node), "op_counts": op_counts(model)}
    return facts


