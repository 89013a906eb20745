"""Per-block error attribution: how much error each block adds, and how much has piled up.

For reference x (FP32) and candidate y, pooled over all samples:
SQNR dB = 10*log10(sum x^2 / sum (x-y)^2) (= 20*log10(||x|| / ||x-y||) over the
concatenation, ONNX Runtime's qdq_loss_debug formula), cosine, max abs, relative L2.

Three sessions answer everything, one run each per sample:
- reference, with every block-boundary tensor exposed as an output;
- candidate, the same outputs exposed: the **accumulated** error at each block;
- candidate with every edge between blocks cut and fed from the reference's
  values of that tensor: each block's **isolated** error, all blocks at once.

Only boundary tensors (produced in a block, consumed outside it, or graph
outputs) are captured, one sample at a time, folded into running sums.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto

from calibration import check_feeds

from pipeline.core import progress as progress_display
from pipeline.core.audio import compare_audio
from pipeline.core.blocks import BlockPartition, name_all_nodes
from pipeline.core.errors import PipelineError, few, one_line
from pipeline.core.feeds import Feeds
from pipeline.core.graph import cleanup, intermediate_names, length_setters, producers, toposort, with_outputs
from pipeline.core.onnx_io import (ORT_RUN_ERRORS, SHARED, as_ort_type, copy_model, is_light, session, stored_bytes,
                                   tensor_types)
from pipeline.core.precision import block_compute_mix
from pipeline.core.procinfo import peak_rss_mb, release_free_memory
from pipeline.core.recipe import BlockSpec
from pipeline.evaluation.results import (BlockResult, CheckReport, ErrorStats, LengthChange, OutputResult,
                                        Sensitivity)

from pipeline.evaluation.metrics import heard_output

if TYPE_CHECKING:
    from pipeline.evaluation.metrics import Metric

REF_SUFFIX = "::ref"


@dataclass
class Pooled:
    """Running sums for pooled metrics: memory stays constant whatever the sample count."""

    sxx: float = 0.0
    syy: float = 0.0
    sxy: float = 0.0
    see: float = 0.0
    max_abs: float = 0.0
    elements: int = 0
    samples: int = 0
    shape_mismatches: int = 0

    def update(self, x: np.ndarray, y: np.ndarray, aligned: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Fold one sample in. Where the shapes differ (a changed length) the sample counts as a mismatch and
        `aligned`, the same tensors brought to one shape (pinned durations, or the common extent), is compared
        instead; without it the sample is not compared."""
        if x.shape != y.shape:
            self.shape_mismatches += 1
            if aligned is None or aligned[0].shape != aligned[1].shape:
                return
            x, y = aligned
        x = np.asarray(x, dtype=np.float64).ravel()
        y = np.asarray(y, dtype=np.float64).ravel()
        e = x - y
        self.sxx += float(x @ x)
        self.syy += float(y @ y)
        self.sxy += float(x @ y)
        self.see += float(e @ e)
        if e.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(e))))
        self.elements += x.size
        self.samples += 1

    def merge(self, other: Pooled) -> None:
        for name in ("sxx", "syy", "sxy", "see", "elements", "samples", "shape_mismatches"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.max_abs = max(self.max_abs, other.max_abs)

    @property
    def sqnr_db(self) -> float:
        if self.samples == 0:
            return float("nan")
        if self.see == 0:
            return float("inf")
        if self.sxx == 0:
            return float("-inf")
        return 10 * math.log10(self.sxx / self.see)

    @property
    def rel_l2(self) -> float:
        return math.sqrt(self.see / self.sxx) if self.sxx > 0 else (0.0 if self.see == 0 else float("inf"))

    @property
    def cosine(self) -> float:
        denom = math.sqrt(self.sxx * self.syy)
        return self.sxy / denom if denom > 0 else (1.0 if self.see == 0 else 0.0)

    def stats(self) -> ErrorStats:
        return ErrorStats(sqnr_db=self.sqnr_db, cosine=self.cosine, max_abs=self.max_abs, rel_l2=self.rel_l2,
                          samples=self.samples, shape_mismatches=self.shape_mismatches)


def common_extent(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Both tensors cut to their common leading extent on every axis (None when their ranks differ): how a
    changed length is compared when no durations tensor can pin it. Audio that slid by a few frames compares
    badly this way; that is what it measures."""
    if x.ndim != y.ndim:
        return None
    common = tuple(slice(0, min(a, b)) for a, b in zip(x.shape, y.shape))
    return x[common], y[common]


@dataclass
class BlockIO:
    id: str
    inputs: list[str] = field(default_factory=list)  # consumed here, produced in another block
    outputs: list[str] = field(default_factory=list)  # produced here, consumed elsewhere or graph outputs


def block_boundaries(model: onnx.ModelProto, partition: BlockPartition) -> dict[str, BlockIO]:
    """The tensors that cross each block's edge, in graph order."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    made_by = producers(graph.node)
    constants = {t for t, n in made_by.items() if n.op_type == "Constant"}
    producer_block = {t: partition.node_block[n.name] for t, n in made_by.items()}
    graph_outputs = [o.name for o in graph.output]
    io = {b: BlockIO(b) for b in partition.ids()}
    for n in graph.node:
        here = partition.node_block[n.name]
        for t in n.input:
            if not t or t in initializers or t in constants:
                continue
            src = producer_block.get(t)
            if src is not None and src != here:
                _add(io[here].inputs, t)
                _add(io[src].outputs, t)
    for t in graph_outputs:
        if t in producer_block:
            _add(io[producer_block[t]].outputs, t)
    return io


def _add(items: list[str], value: str) -> None:
    if value not in items:
        items.append(value)


def isolate_blocks(model: onnx.ModelProto, partition: BlockPartition, fed: set[str],
                   types: dict[str, int], pinned: Iterable[str] = ()) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Cut every edge between blocks whose tensor is in `fed`: the consumer reads a new graph
    input `<tensor>::ref` instead. Every reader of a `pinned` tensor (durations) reads it so too, in its own
    block as well: a block that flips a duration would otherwise meet the reference's lengths it is fed with
    lengths of its own (a Concat of 462 and 464 frames). Returns the model and {new input: tensor}."""
    iso = copy_model(model)
    pinned = set(pinned)
    producer_block = {t: partition.node_block[n.name] for t, n in producers(model.graph.node).items()}
    new_inputs: dict[str, str] = {}
    for node in iso.graph.node:
        here = partition.node_block.get(node.name)
        for k, t in enumerate(node.input):
            if t in pinned or (t in fed and producer_block.get(t) not in (None, here)):
                node.input[k] = t + REF_SUFFIX
                new_inputs[t + REF_SUFFIX] = t
    for name, tensor in new_inputs.items():
        elem = types.get(tensor) or TensorProto.FLOAT
        iso.graph.input.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return iso, new_inputs


@dataclass
class BlockReport:
    """One block while a check runs: its facts, and its errors as running sums (`result()`: the typed entry)."""

    id: str
    params: int
    bytes_reference: int
    bytes_candidate: int
    precision: dict[str, int]
    weights: dict[str, int]
    outputs: list[str]
    matched: bool
    unmatched_tensors: list[str]
    isolated: Pooled = field(default_factory=Pooled)
    accumulated: Pooled = field(default_factory=Pooled)
    sensitivity: Sensitivity | None = None

    @property
    def amplification(self) -> float | None:
        iso, acc = self.isolated.rel_l2, self.accumulated.rel_l2
        if not self.matched or self.isolated.samples == 0 or self.accumulated.samples == 0:
            return None
        if iso == 0:
            return None if acc == 0 else float("inf")
        return acc / iso

    def result(self) -> BlockResult:
        block = BlockResult(block=self.id, params=self.params, bytes_reference=self.bytes_reference,
                            bytes_candidate=self.bytes_candidate, precision=self.precision, weights=self.weights,
                            matched=self.matched, unmatched_tensors=self.unmatched_tensors, outputs=self.outputs,
                            isolated=self.isolated.stats(), accumulated=self.accumulated.stats(),
                            amplification=self.amplification)
        if self.sensitivity is not None:  # measured only when asked: report.json has no key otherwise
            block.sensitivity = self.sensitivity
        return block


def block_bytes(model: onnx.ModelProto, partition: BlockPartition) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Initializer bytes each block reads, and by element type."""
    inits = {t.name: t for t in model.graph.initializer}
    seen: set[str] = set()
    total: dict[str, int] = {}
    by_type: dict[str, dict[str, int]] = {}
    for n in model.graph.node:
        b = partition.node_block[n.name]
        for t in n.input:
            if t in inits and t not in seen:
                seen.add(t)
                size = stored_bytes(inits[t])
                total[b] = total.get(b, 0) + size
                kind = TensorProto.DataType.Name(inits[t].data_type).lower()
                by_type.setdefault(b, {})[kind] = by_type.setdefault(b, {}).get(kind, 0) + size
    return total, by_type


def _interface(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits], [o.name for o in model.graph.output]


def compare_models(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: Iterator[Feeds] | list[Feeds],
                   spec: BlockSpec | None = None, *, metrics: Sequence[Metric] = (), reference_label: str = "reference",
                   candidate_label: str = "candidate", threads: int = 2, sensitivity: bool = False,
                   weights_dirs: tuple[Path | None, Path | None] = (None, None), durations: Sequence[str] | None = None,
                   owned: bool = False, progress: Callable[[str], None] = lambda m: None) -> CheckReport:
    """Run both models on the same inputs and attribute the candidate's error to blocks.

    `metrics` that measure per sample (audio, a family's own) get the first output of every sample.
    `weights_dirs`: where the reference's and the candidate's external weights lie, for models loaded with
    them left there (`onnx_io.load_light`).
    `durations`: the tensors that set the output's length (a family's or a recipe's durations tensor; None:
    those `length_setters` finds). The isolated run takes them from the reference; a sample whose candidate
    changes them is compared on the reference's durations as well, and listed in `length_changes`. A sample
    the candidate cannot run is skipped with a note saying why.
    `owned`: the protos are this call's to edit and empty (the caller does not use them after), which saves a
    copy of each and frees the reference's weights once its session holds them."""
    sample_metrics = [m for m in metrics if m.per_sample]
    if sensitivity and any(weights_dirs):  # splicing mixes both models' weights into one graph
        raise PipelineError("compare: sensitivity is not supported for models whose weights stay in external-data "
                            "files (those over 2 GB): it splices both models' weights into one graph; leave "
                            "--sensitivity / check.sensitivity off")
    for proto, folder, label in ((reference, weights_dirs[0], reference_label),
                                 (candidate, weights_dirs[1], candidate_label)):
        if folder is None and is_light(proto):  # (its sessions would look for the weights in the working folder)
            raise PipelineError(f"compare: {label} keeps its weights in external-data files, and no folder for "
                                f"them was given")

    t0 = time.perf_counter()
    release_free_memory()  # what loading the models freed (whole protos, checker copies): not on top of the runs
    ref_in, ref_out = _interface(reference)
    heard = heard_output(sample_metrics, ref_out)
    cand_in, cand_out = _interface(candidate)
    if sorted(ref_in) != sorted(cand_in) or ref_out != cand_out:
        raise PipelineError(f"reference and candidate do not have the same interface: reference inputs "
                            f"{sorted(ref_in)} outputs {ref_out}, candidate inputs {sorted(cand_in)} outputs {cand_out}")
    if not owned:  # (named and edited below)
        reference, candidate = copy_model(reference), copy_model(candidate)
    name_all_nodes(reference)  # the same naming the runner's base step gives, so blocks line up
    name_all_nodes(candidate)
    ref_part, cand_part = BlockPartition(reference, spec), BlockPartition(candidate, spec)
    if spec is not None and set(ref_part.ids()) <= {spec.rest}:
        raise PipelineError(f"block patterns {spec.patterns} match no node of the reference")
    io = block_boundaries(reference, ref_part)
    cand_tensors = {o for n in candidate.graph.node for o in n.output} | set(cand_in)
    captured = [t for b in io.values() for t in b.outputs]
    captured = list(dict.fromkeys(captured))
    present = [t for t in captured if t in cand_tensors]
    cand_types = tensor_types(candidate)
    ref_bytes, _ = block_bytes(reference, ref_part)
    cand_bytes, cand_weights = block_bytes(candidate, cand_part)
    mix = block_compute_mix(candidate, cand_part, cand_types)
    reports = []
    for b in ref_part.blocks.values():
        missing = [t for t in io[b.id].outputs if t not in cand_tensors]
        reports.append(BlockReport(b.id, b.params, ref_bytes.get(b.id, 0), cand_bytes.get(b.id, 0),
                                   mix.get(b.id, {}), cand_weights.get(b.id, {}), io[b.id].outputs,
                                   matched=not missing and b.id in cand_part.blocks, unmatched_tensors=missing))
    durations = _durations(reference, candidate, durations)
    progress("building sessions")
    interface = onnx.ModelProto()  # enough of the reference to check feeds against
    interface.graph.input.extend(i for i in reference.graph.input if i.name in ref_in)
    # One session at a time, each proto dropped as soon as nothing needs it: a float vocoder's protos are
    # hundreds of MB, and each session holds its own weights besides.
    # (Sensitivity splices the protos later: they stay whole, and outputs are added to copies.)
    ref_sess = session(with_outputs(reference, [*captured, *durations], in_place=owned and not sensitivity),
                       threads=threads, arena=SHARED, weights_dir=weights_dirs[0])
    if sensitivity:
        feeds = list(feeds)  # iterated again, once per block
    elif owned:
        del reference.graph.initializer[:]  # the session holds its weights; the caller's proto is spent
    acc_sess, iso_sess, fed = _candidate_sessions(candidate, cand_part, present, cand_types, threads,
                                                  weights_dirs[1], durations)
    lengths = Lengths(candidate, durations, present, cand_part, threads, weights_dirs[1])
    iso_input_types = {i.name: i.type for i in iso_sess.get_inputs()}
    per_tensor_iso = {t: Pooled() for t in present}
    per_tensor_acc = {t: Pooled() for t in present}
    out_stats = {o: Pooled() for o in ref_out}
    n, notes = 0, []
    for i, f in enumerate(feeds):
        check_feeds(f, interface, f"sample {i}")
        progress(f"sample {i + 1}")
        # Counted where the total is known (a list of feeds), for the live display's estimate of the time left.
        progress_display.update("per-block error: samples", i, len(feeds) if isinstance(feeds, list) else None)
        n += 1
        # One candidate run at a time, folded into sums and dropped: memory is the
        # reference's boundary tensors plus one candidate's, for the current sample.
        ref_vals = _run(ref_sess, f)
        acc_vals = _guarded(acc_sess, f, notes, f"sample {i}: not compared: the candidate cannot run it")
        if acc_vals is None:
            continue
        pinned = lengths.pinned_run(i, f, ref_vals, acc_vals, notes)
        for t in present:
            per_tensor_acc[t].update(ref_vals[t], acc_vals[t], _aligned(t, ref_vals, acc_vals, pinned))
        for o in ref_out:
            out_stats[o].update(ref_vals[o], acc_vals[o], _aligned(o, ref_vals, acc_vals, pinned))
        for m in sample_metrics:
            m.update(ref_vals[heard], acc_vals[heard])
            if pinned is not None and heard in pinned:
                m.update_pinned(ref_vals[heard], pinned[heard])
        lengths.record(i, ref_vals, acc_vals, ref_out)
        del acc_vals, pinned  # (before the isolated run: a vocoder's boundary tensors are large)
        iso_feed = dict(f)
        for name, tensor in fed.items():
            iso_feed[name] = as_ort_type(ref_vals[tensor], iso_input_types[name])
        iso_vals = _guarded(iso_sess, iso_feed, notes, f"sample {i}: no isolated error: the candidate's blocks, "
                                                       f"fed the reference's values, cannot run it")
        for t in present if iso_vals is not None else []:
            per_tensor_iso[t].update(ref_vals[t], iso_vals[t], common_extent(ref_vals[t], iso_vals[t]))
        lengths.mark_isolated(i, ref_vals, iso_vals)
        del ref_vals, iso_vals, iso_feed
    progress_display.finish("per-block error: samples")
    if n == 0:
        raise PipelineError("compare: the input source yields no samples")
    for r in reports:
        for t in r.outputs:
            if t in per_tensor_iso and _is_float(cand_types.get(t, TensorProto.FLOAT)):
                r.isolated.merge(per_tensor_iso[t])
                r.accumulated.merge(per_tensor_acc[t])
    # The per-sample metrics measured the heard output: their numbers go with it, and it comes first (what the
    # fallback, tune and the report read as "the output").
    measured = {m.key: m.to_json() for m in sample_metrics}
    outputs = [OutputResult.measured(o, out_stats[o].stats(), measured if o == heard else None)
               for o in [heard, *(o for o in ref_out if o != heard)]]
    if sensitivity:
        del ref_sess, acc_sess, iso_sess
        from pipeline.evaluation.metrics import AudioMetric

        audio = next((m.spec for m in sample_metrics if isinstance(m, AudioMetric)), None)
        _sensitivity(reference, candidate, ref_part, cand_part, reports, feeds, heard, audio, threads, progress)
    unmatched = [r.id for r in reports if not r.matched]
    if unmatched:
        notes.append(f"{len(unmatched)} blocks could not be matched in the candidate (boundary tensors missing "
                     f"or renamed): {few(unmatched, 10)}")
    notes += lengths.notes()
    more = {"length_changes": lengths.changes} if lengths.changes else {}
    return CheckReport.new(samples=n, reference=reference_label, candidate=candidate_label, notes=notes,
                           peak_rss_mb=peak_rss_mb(), wall_s=time.perf_counter() - t0,
                           blocks=[r.result() for r in reports], outputs=outputs, **more)


def splice_block(reference: onnx.ModelProto, candidate: onnx.ModelProto, ref_part: BlockPartition,
                 cand_part: BlockPartition, block: str) -> onnx.ModelProto:
    """The reference graph with one block replaced by the candidate's version of it."""
    spliced = copy_model(reference)
    drop = set(ref_part.blocks[block].nodes)
    keep = [n for n in spliced.graph.node if n.name not in drop]
    incoming = [n for n in candidate.graph.node if cand_part.node_block.get(n.name) == block]
    incoming = _with_missing_producers(incoming, keep, spliced, candidate)
    ref_inits = {t.name: t for t in spliced.graph.initializer}
    cand_inits = {t.name: t for t in candidate.graph.initializer}
    renamed: dict[str, str] = {}
    for n in incoming:
        for t in n.input:
            if t in cand_inits and t not in renamed:
                if t in ref_inits and ref_inits[t] != cand_inits[t]:
                    renamed[t] = f"{t}::candidate"  # same name, other precision (FP16 keeps names)
                elif t not in ref_inits:
                    renamed[t] = t
    for old, new in renamed.items():
        init = TensorProto()
        init.CopyFrom(cand_inits[old])
        init.name = new
        spliced.graph.initializer.append(init)
    added = []
    for n in incoming:
        node = onnx.NodeProto()
        node.CopyFrom(n)
        for k, t in enumerate(node.input):
            node.input[k] = renamed.get(t, t)
        added.append(node)
    added += _casts_at_boundary(added, tensor_types(reference), tensor_types(candidate))
    # A quantizer's bias DequantizeLinear outputs under the float bias's own name: the node wins.
    produced = {o for n in added for o in n.output}
    inits = [t for t in spliced.graph.initializer if t.name not in produced]
    del spliced.graph.initializer[:]
    spliced.graph.initializer.extend(inits)
    known = {i.name for i in spliced.graph.input} | {t.name for t in spliced.graph.initializer}
    ordered = toposort(keep + added, known, what="splice")
    del spliced.graph.node[:]
    spliced.graph.node.extend(ordered)
    del spliced.graph.value_info[:]  # types inside the block changed; ORT infers them again
    cleanup(spliced)  # what only the reference's version of the block read
    return spliced


def _casts_at_boundary(block: list[onnx.NodeProto], ref_types: dict[str, int],
                       cand_types: dict[str, int]) -> list[onnx.NodeProto]:
    """Casts where the candidate's block meets the reference around it in another type (an FP16 block inside an
    FP32 graph): each tensor the block reads arrives in the candidate's type, each it makes leaves in the
    reference's. Edits `block` in place; returns the Casts to add."""
    made = {o for n in block for o in n.output}
    differs = {t for t in set(ref_types) & set(cand_types) if ref_types[t] != cand_types[t]}
    casts: list[onnx.NodeProto] = []
    for t in sorted(made & differs):  # produced inside in the candidate's type: renamed, cast back out
        inner = f"{t}::candidate"
        for n in block:
            n.output[:] = [inner if o == t else o for o in n.output]
            n.input[:] = [inner if i == t else i for i in n.input]
        casts.append(onnx.helper.make_node("Cast", [inner], [t], name=f"{t}::to_reference", to=ref_types[t]))
    for t in sorted({i for n in block for i in n.input} & differs - made):  # read from the reference's side
        inner = f"{t}::as_candidate"
        for n in block:
            n.input[:] = [inner if i == t else i for i in n.input]
        casts.append(onnx.helper.make_node("Cast", [t], [inner], name=f"{t}::to_candidate", to=cand_types[t]))
    return casts


def _with_missing_producers(incoming: list[onnx.NodeProto], keep: list[onnx.NodeProto],
                            reference: onnx.ModelProto, candidate: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Add the candidate nodes that make tensors the block reads but the reference lacks.

    A quantizer puts the QuantizeLinear of a boundary tensor in the producer's block and
    the DequantizeLinear in the consumer's: splicing the consumer needs the Q too.
    """
    available = ({o for n in keep for o in n.output} | {i.name for i in reference.graph.input}
                 | {t.name for t in reference.graph.initializer} | {t.name for t in candidate.graph.initializer}
                 | {o for n in incoming for o in n.output} | {""})
    producer = producers(candidate.graph.node)
    nodes, queue = list(incoming), [t for n in incoming for t in n.input]
    while queue:
        t = queue.pop()
        if t in available or t not in producer:
            continue
        n = producer[t]
        nodes.append(n)
        available.update(n.output)
        queue.extend(n.input)
    return nodes


def _sensitivity(reference, candidate, ref_part, cand_part, reports, feeds, output, audio, threads, progress) -> None:
    """For each block that differs: end-output error with only that block in candidate precision."""
    ref_sess = session(reference, threads=threads, arena=SHARED)
    ref_outs = [ref_sess.run([output], f)[0] for f in feeds]
    del ref_sess
    for r in reports:
        if not r.matched or r.isolated.sqnr_db == float("inf") or r.isolated.samples == 0:
            continue
        progress(f"sensitivity of {r.id}")
        sess = session(splice_block(reference, candidate, ref_part, cand_part, r.id), threads=threads, arena=SHARED)
        stats = Pooled()
        mels = []
        for f, ref_out in zip(feeds, ref_outs):
            out = _run(sess, f)[output]
            stats.update(ref_out, out)
            if audio is not None:
                mels.append(compare_audio(ref_out, out, mel=audio.mel).log_mel_distance)
        r.sensitivity = Sensitivity(output=output, **dict(stats.stats()))
        if audio is not None:  # (set only here: report.json has no log_mel_max for outputs that are not audio)
            r.sensitivity.log_mel_max = float(max(mels))


def _candidate_sessions(candidate, cand_part, present, cand_types, threads, weights_dir, durations):
    """The candidate's sessions: whole (accumulated error), and with every edge between blocks fed the
    reference's values (isolated error)."""
    acc_sess = session(with_outputs(candidate, [*present, *durations]), threads=threads, arena=SHARED,
                       weights_dir=weights_dir)
    iso_model, fed = isolate_blocks(candidate, cand_part, set(present), cand_types, pinned=durations)
    iso_model = with_outputs(iso_model, [*present, *durations])
    iso_sess = session(iso_model, threads=threads, arena=SHARED, weights_dir=weights_dir)
    return acc_sess, iso_sess, fed


def _durations(reference: onnx.ModelProto, candidate: onnx.ModelProto, declared: Sequence[str] | None) -> list[str]:
    """The durations tensors both graphs compute: those declared, else those `length_setters` finds."""
    found = length_setters(reference) if declared is None else list(declared)
    made = set(intermediate_names(reference)) & set(intermediate_names(candidate))
    return [t for t in dict.fromkeys(found) if t in made]


def _guarded(sess, feeds: Feeds, notes: list[str], what: str) -> dict[str, np.ndarray] | None:
    """`_run`, or None with a note saying why where ONNX Runtime cannot run the model on these feeds."""
    try:
        return _run(sess, feeds)
    except ORT_RUN_ERRORS as e:
        notes.append(f"{what}: {one_line(e, 200)}")
        return None


def _aligned(tensor: str, ref_vals: dict[str, np.ndarray], cand_vals: dict[str, np.ndarray],
             pinned: dict[str, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray] | None:
    """What a tensor whose shape changed is compared as: the candidate's value on the reference's durations
    where it was run so, else both cut to their common extent."""
    if ref_vals[tensor].shape == cand_vals[tensor].shape:
        return None
    if pinned is not None and tensor in pinned:
        return ref_vals[tensor], pinned[tensor]
    return common_extent(ref_vals[tensor], cand_vals[tensor])


class Lengths:
    """A check's durations tensors: the candidate run on the reference's durations for a sample whose
    durations changed (its pinned session built on first need), and every change of length, sample by sample."""

    def __init__(self, candidate: onnx.ModelProto, durations: list[str], present: list[str],
                 partition: BlockPartition, threads: int, weights_dir: Path | None):
        self.durations = durations
        self.changes: list[LengthChange] = []
        self.unpinned: list[int] = []  # samples whose pinned run failed
        made_by = producers(candidate.graph.node)
        self.block = {t: partition.node_block.get(made_by[t].name) for t in durations}
        # Held only until the pinned session is built, and only where a durations tensor exists.
        self._candidate = candidate if durations else None
        self._partition, self._types = partition, tensor_types(candidate) if durations else {}
        self._outputs = present
        self._threads, self._weights_dir = threads, weights_dir
        self._session = None

    def changed(self, ref_vals: dict[str, np.ndarray], cand_vals: dict[str, np.ndarray]) -> list[str]:
        return [t for t in self.durations if not np.array_equal(ref_vals[t], cand_vals[t])]

    def pinned_run(self, sample: int, feeds: Feeds, ref_vals: dict[str, np.ndarray],
                   acc_vals: dict[str, np.ndarray], notes: list[str]) -> dict[str, np.ndarray] | None:
        """The candidate's values on the reference's durations, where this sample changed them; else None."""
        if not self.changed(ref_vals, acc_vals):
            return None
        if self._session is None:  # every reader of a durations tensor reads the reference's value instead
            pinned, self._fed = isolate_blocks(self._candidate, self._partition, set(), self._types, self.durations)
            self._session = session(with_outputs(pinned, self._outputs), threads=self._threads, arena=SHARED,
                                    weights_dir=self._weights_dir)
            self._candidate = None
            self._input_types = {i.name: i.type for i in self._session.get_inputs()}
        feeds = {**feeds, **{name: as_ort_type(ref_vals[t], self._input_types[name]) for name, t in self._fed.items()}}
        values = _guarded(self._session, feeds, notes, f"sample {sample}: not compared on the reference's "
                                                      f"durations: the candidate cannot run on them")
        if values is None:
            self.unpinned.append(sample)
        return values

    def record(self, sample: int, ref_vals: dict[str, np.ndarray], acc_vals: dict[str, np.ndarray],
               outputs: list[str]) -> None:
        """This sample's changed durations (by block) and changed output lengths."""
        for t in self.changed(ref_vals, acc_vals):
            ref, cand = ref_vals[t], acc_vals[t]
            self.changes.append(LengthChange(
                sample=sample, tensor=t, block=self.block[t], reference=_frames(ref), candidate=_frames(cand),
                entries_changed=int(np.sum(ref != cand)) if ref.shape == cand.shape else None))
        for o in outputs:
            ref, cand = ref_vals[o], acc_vals[o]
            if ref.shape != cand.shape:
                axis = next((k for k, (a, b) in enumerate(zip(ref.shape, cand.shape)) if a != b), None)
                self.changes.append(LengthChange(
                    sample=sample, tensor=o, block=None,
                    reference=ref.shape[axis] if axis is not None else ref.size,
                    candidate=cand.shape[axis] if axis is not None else cand.size))

    def mark_isolated(self, sample: int, ref_vals: dict[str, np.ndarray],
                      iso_vals: dict[str, np.ndarray] | None) -> None:
        """Whether each block that changed this sample's durations changes them by itself (fed the
        reference's inputs), from the isolated run (None: it could not run)."""
        for c in self.changes:
            if c.sample == sample and c.block is not None and iso_vals is not None:
                c.isolated = not np.array_equal(ref_vals[c.tensor], iso_vals[c.tensor])

    def notes(self) -> list[str]:
        """One line on what changed length, for the report's notes."""
        if not self.changes:
            return []
        samples = sorted({c.sample for c in self.changes})
        line = f"lengths changed on {len(samples)} samples ({few([str(s) for s in samples], 8)})"
        for t in self.durations:
            moved = [f"{c.candidate - c.reference:+d}" for c in self.changes if c.tensor == t]
            if moved:
                line += f"; durations {t} (block {self.block[t]}): {few(moved, 8)} frames"
        pinned = [s for s in samples if s not in self.unpinned] if self.durations else []
        if pinned:
            line += "; compared on the reference's durations"
        elif not self.durations:
            line += "; no durations tensor to pin them: compared over the common length"
        return [line]


def _frames(durations: np.ndarray) -> int:
    """Frames that durations make in all."""
    return int(np.rint(np.sum(np.asarray(durations, dtype=np.float64))))


def _run(sess, feeds: Feeds) -> dict[str, np.ndarray]:
    """Every output; the feeds cast to the session's input types (a candidate whose inputs FP16 conversion
    changed, keep_io_types: false, takes the reference's FP32 inputs as the deployed model would be fed)."""
    types = {i.name: i.type for i in sess.get_inputs()}
    feeds = {k: as_ort_type(v, types[k]) if k in types else v for k, v in feeds.items()}
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _is_float(elem_type: int) -> bool:
    return elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)



