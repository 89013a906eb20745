"""Graph cutting: turn intermediate tensors into inputs ("pinning") and keep only what outputs need.

Two surgeries share this code:
- `pin` feeds a candidate the reference's value of some tensor (the FP32
  durations of a Piper voice), so an audio comparison is not thrown off by a
  quantized duration predictor that changes the output length;
- `split` cuts a VITS graph where the flow begins: the decoder is the graph
  with the boundary tensors pinned, the encoder the graph cut at them.

`PinnedPair` (and the one-shot `capture`, `run_pinned`) is the comparison side:
run the reference with the pinned tensors exposed as outputs, then feed their
values to the pinned candidate.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .errors import PipelineError
from .onnx_io import as_ort_type, load_onnx, session

Feeds = dict[str, np.ndarray]


def producers(graph: onnx.GraphProto) -> dict[str, int]:
    """Tensor name -> index of the node that writes it."""
    return {out: i for i, node in enumerate(graph.node) for out in node.output if out}


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs plus the outer-scope names its subgraphs (If, Loop, Scan) read."""
    names = [name for name in node.input if name]
    for attr in node.attribute:
        subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in subgraphs:
            names.extend(_outer_names(sub))
    return names


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    local |= {out for node in graph.node for out in node.output}
    used = {name for node in graph.node for name in node_inputs(node)}
    return used - local


def intermediate_names(model: onnx.ModelProto) -> list[str]:
    """Tensors written by a node: the ones that can be pinned."""
    return [out for node in model.graph.node for out in node.output if out]


def require_intermediates(model: onnx.ModelProto, names: Iterable[str], what: str) -> None:
    """A PipelineError, naming close matches, for the first of `names` that no node writes."""
    known = intermediate_names(model)
    known_set = set(known)
    for name in names:
        if name in known_set:
            continue
        graph_io = {v.name for v in model.graph.input} | {t.name for t in model.graph.initializer}
        if name in graph_io:
            raise PipelineError(f"{what}: {name!r} is already a graph input or initializer, not an intermediate tensor")
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f"close matches: {', '.join(close)}" if close else "no close match"
        raise PipelineError(f"{what}: no intermediate tensor named {name!r} ({hint})")


def value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Type and shape of every tensor: what the model declares, completed by shape inference.

    Exporters often declare an intermediate's type without its shape, which a
    graph input or output may not lack (the checker requires one).
    """
    graph = model.graph
    declared = {v.name: v for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    except Exception:  # inference is a help; a tensor it cannot type is reported where it is needed
        return declared
    for info in inferred:
        if info.name not in declared or not _has_shape(declared[info.name]):
            declared[info.name] = info
    return declared


def _has_shape(info: onnx.ValueInfoProto) -> bool:
    return info.type.tensor_type.HasField("shape")


def _io_info(name: str, infos: dict[str, onnx.ValueInfoProto], what: str) -> onnx.ValueInfoProto:
    """A graph input/output entry for `name`, with the inferred `unk__N` dim names dropped.

    Shape inference makes those names up; left in, they would tie axes of
    different inputs together that nobody declared equal.
    """
    info = infos.get(name)
    if info is None or not info.type.tensor_type.elem_type or not _has_shape(info):
        raise PipelineError(f"{what}: cannot tell the type and rank of tensor {name!r} (shape inference gives none)")
    out = onnx.ValueInfoProto()
    out.CopyFrom(info)
    for dim in out.type.tensor_type.shape.dim:
        if dim.dim_param.startswith("unk__"):
            dim.ClearField("dim_param")
    return out


def needed_nodes(graph: onnx.GraphProto, inputs: set[str], outputs: Sequence[str], what: str) -> list[int]:
    """Indices (graph order) of the nodes that compute `outputs` from `inputs` and initializers."""
    made_by = producers(graph)
    known = inputs | {t.name for t in graph.initializer}
    keep: set[int] = set()
    stack = [name for name in outputs if name not in inputs]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen or name in known:
            continue
        seen.add(name)
        if name not in made_by:
            why = "an original input left out" if name in {v.name for v in graph.input} else "written by no node"
            raise PipelineError(f"{what}: tensor {name!r} is needed but not given ({why})")
        keep.add(made_by[name])
        stack.extend(node_inputs(graph.node[made_by[name]]))
    return sorted(keep)


def cut(model: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str], what: str = "cut",
        infos: dict[str, onnx.ValueInfoProto] | None = None) -> onnx.ModelProto:
    """The subgraph that computes `outputs` from `inputs`: nodes keep their names and order.

    `inputs` may name original graph inputs or intermediate tensors; original
    inputs listed here stay inputs even when no kept node reads them, so the
    result takes the same feeds as before.
    """
    graph = model.graph
    infos = infos if infos is not None else value_infos(model)
    nodes = [graph.node[i] for i in needed_nodes(graph, set(inputs), outputs, what)]
    used = {name for node in nodes for name in node_inputs(node)} | set(outputs)
    made = {out for node in nodes for out in node.output}
    io = set(inputs) | set(outputs)
    new_graph = helper.make_graph(
        nodes, graph.name,
        [_io_info(name, infos, what) for name in inputs],
        [_io_info(name, infos, what) for name in outputs],
        [t for t in graph.initializer if t.name in used and t.name not in inputs],
        doc_string=graph.doc_string,
        value_info=[v for v in graph.value_info if v.name in made and v.name not in io],
    )
    new_graph.sparse_initializer.extend(s for s in graph.sparse_initializer if s.values.name in used)
    _unwrite_inputs(new_graph, set(inputs))
    return _model_like(model, new_graph)


def _unwrite_inputs(graph: onnx.GraphProto, inputs: set[str]) -> None:
    """A kept node that also writes an input (a Split whose other outputs are still needed) writes a spare name.

    A tensor may have one writer only, and the input is now it.
    """
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name in inputs:
                node.output[i] = f"{name}__unused_after_cut"


def _model_like(model: onnx.ModelProto, graph: onnx.GraphProto) -> onnx.ModelProto:
    """A model around `graph` with `model`'s opsets, IR version, metadata and functions."""
    result = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name=model.producer_name)
    result.ir_version = model.ir_version
    result.producer_version = model.producer_version
    result.domain = model.domain
    result.model_version = model.model_version
    result.doc_string = model.doc_string
    result.metadata_props.extend(model.metadata_props)
    result.functions.extend(model.functions)
    return result


def pin(model: onnx.ModelProto, tensors: Sequence[str], what: str = "pin") -> onnx.ModelProto:
    """`model` with each of `tensors` taken as a new input after the original ones.

    Nodes that only fed the pinned tensors are dropped; original inputs stay
    (unused ones included), so the same feeds plus the pinned values run it.
    """
    require_intermediates(model, tensors, what)
    originals = [v.name for v in model.graph.input]
    outputs = [v.name for v in model.graph.output]
    pinned_outputs = [name for name in tensors if name in outputs]
    if pinned_outputs:
        raise PipelineError(f"{what}: {pinned_outputs[0]!r} is a graph output; pinning it would leave nothing to run")
    return cut(model, originals + [t for t in dict.fromkeys(tensors)], outputs, what)


def with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` that also returns `tensors` (for capturing reference values)."""
    require_intermediates(model, tensors, "capture")
    infos = value_infos(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {v.name for v in copy.graph.output}
    copy.graph.output.extend(_io_info(name, infos, "capture") for name in tensors if name not in present)
    return copy


class PinnedPair:
    """A reference and a candidate whose `tensors` are pinned to the reference's values.

    Sessions are built once; `run(feeds)` runs the reference (capturing the
    pinned tensors along with its outputs), then the candidate fed those values.
    The candidate may be the unpinned model (pinned here) or one the `pin`
    pass already pinned; values are cast to the dtype its inputs declare
    (an FP16 candidate takes float16 durations).
    """

    def __init__(self, reference: onnx.ModelProto | str | Path, candidate: onnx.ModelProto | str | Path,
                 tensors: Sequence[str], threads: int = 2):
        self.tensors = list(dict.fromkeys(tensors))
        reference = _proto(reference)
        self.reference_outputs = [v.name for v in reference.graph.output]
        self.reference = session(with_outputs(reference, self.tensors), threads=threads, spinning=False)
        candidate = _proto(candidate)
        if not set(self.tensors) <= {v.name for v in candidate.graph.input}:
            candidate = pin(candidate, self.tensors)
        self.candidate = session(candidate, threads=threads, spinning=False)

    def capture(self, feeds: Feeds) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """The reference's outputs and its values of the pinned tensors."""
        names = self.reference_outputs + [t for t in self.tensors if t not in self.reference_outputs]
        values = dict(zip(names, self.reference.run(names, _feeds_for(self.reference, feeds))))
        return [values[n] for n in self.reference_outputs], {t: values[t] for t in self.tensors}

    def run(self, feeds: Feeds) -> PinnedRun:
        reference, pinned = self.capture(feeds)
        candidate = self.candidate.run(None, _feeds_for(self.candidate, {**feeds, **pinned}))
        return PinnedRun(reference, candidate, pinned)


@dataclass
class PinnedRun:
    reference: list[np.ndarray]  # the reference's outputs
    candidate: list[np.ndarray]  # the candidate's outputs, run with the reference's pinned values
    pinned: dict[str, np.ndarray]


def capture(model: onnx.ModelProto | str | Path, feeds: Feeds, tensors: Sequence[str],
            threads: int = 2) -> dict[str, np.ndarray]:
    """The values `model` computes for `tensors` on `feeds` (one-shot; PinnedPair keeps its sessions)."""
    sess = session(with_outputs(_proto(model), tensors), threads=threads)
    return dict(zip(tensors, sess.run(list(tensors), _feeds_for(sess, feeds))))


def run_pinned(reference: onnx.ModelProto | str | Path, candidate: onnx.ModelProto | str | Path,
               feeds: Feeds, tensors: Sequence[str], threads: int = 2) -> PinnedRun:
    """Run `candidate` with `tensors` pinned to the values `reference` computes on `feeds` (one-shot)."""
    return PinnedPair(reference, candidate, tensors, threads).run(feeds)


def _proto(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_onnx(model)


def _feeds_for(sess, feeds: Feeds) -> Feeds:
    """The feeds the session takes (ORT rejects unknown names), cast to the dtype each input declares."""
    inputs = sess.get_inputs()
    missing = [i.name for i in inputs if i.name not in feeds]
    if missing:
        raise PipelineError(f"feeds lack input(s) {', '.join(missing)} (given: {', '.join(feeds)})")
    return {i.name: as_ort_type(np.asarray(feeds[i.name]), i.type) for i in inputs}
