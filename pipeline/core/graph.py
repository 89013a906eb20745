"""The graph toolkit: what passes and the error check ask of an ONNX graph, and the cuts they make.

- who writes and who reads a tensor: `producers`, `consumers` (and their `_indices`
  forms), `node_inputs`, `intermediate_names`, `value_infos`;
- an order where every node comes after the nodes it reads from: `toposort`;
- dropping the nodes nothing needs: `cleanup`; the nodes that compute some
  tensors from others: `needed_nodes`;
- cutting a graph at tensors (`cut`) and taking intermediate tensors as inputs
  (`pin`, "pinning"): `split` cuts a VITS graph where the flow begins, the
  decoder being the graph with the boundary tensors pinned, the encoder the
  graph cut at them; `pin` feeds a candidate the reference's value of some
  tensor (`pipeline.evaluation.pinning` runs such pairs);
- returning more tensors: `with_outputs`;
- the tensors that set a length (a model's durations): `length_setters`;
- what a rewrite reads and names: a node's `attribute`, a tensor's `constant_value`, an `unused_name`,
  and `declare_domains` for the ops it wrote.
Placing the nodes a pass added into blocks is `pipeline.core.blocks.adopt_new_nodes`, on these maps.

Protobuf or onnx-graphsurgeon: every graph a pass writes is edited here as
protobuf, node by node, so that what a pass does not touch keeps its bytes.
A round trip through onnx-graphsurgeon (`gs.import_onnx` ... `gs.export_onnx`)
would not: it drops node and model metadata (the `namespace` a recipe's blocks
may be defined by, provenance), writes initializers in the order it meets them
and value_info of its own, and its `toposort` orders nodes by depth. So
onnx-graphsurgeon answers the question it answers best, which nodes the
outputs need (its `Graph.cleanup`, If/Loop/Scan bodies' outer reads included),
on an imported copy, and `cleanup` keeps those nodes in the protobuf graph.
"""
from __future__ import annotations

import difflib
import heapq
import shutil
from collections import defaultdict
from collections.abc import Callable, Container, Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx.compose
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from pipeline.core.errors import PipelineError

# --- who writes and who reads a tensor --------------------------------------------------------------------
# The empty name is an omitted optional input or output, not a tensor: no map has it.


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs plus the outer-scope names its subgraphs (If, Loop, Scan) read; once per read."""
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


def producer_indices(nodes: Sequence[onnx.NodeProto]) -> dict[str, int]:
    """Tensor name -> index of the node that writes it (the last one, if several do), in order of first write."""
    return {out: i for i, node in enumerate(nodes) for out in node.output if out}


def producers(nodes: Sequence[onnx.NodeProto]) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it (`producer_indices`, as nodes)."""
    nodes = list(nodes)
    return {name: nodes[i] for name, i in producer_indices(nodes).items()}


def consumer_indices(nodes: Sequence[onnx.NodeProto]) -> dict[str, list[int]]:
    """Tensor name -> indices of the nodes that read it, once per read (`node_inputs`), in graph order."""
    readers: dict[str, list[int]] = defaultdict(list)
    for i, node in enumerate(nodes):
        for name in node_inputs(node):
            readers[name].append(i)
    return dict(readers)


def consumers(nodes: Sequence[onnx.NodeProto]) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it (`consumer_indices`, as nodes)."""
    nodes = list(nodes)
    return {name: [nodes[i] for i in readers] for name, readers in consumer_indices(nodes).items()}


def intermediate_names(model: onnx.ModelProto) -> list[str]:
    """Tensors written by a node: the ones that can be pinned."""
    return list(producer_indices(model.graph.node))


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


# Ops whose output length a tensor's value sets: where a rounded duration becomes a number of frames.
LENGTH_OPS = frozenset({"Range", "Expand", "CumSum", "ConstantOfShape", "Tile"})
# Ops that make an integer count out of a float prediction: a TTS model's durations come out of one of these.
ROUNDING_OPS = frozenset({"Round", "Ceil"})


def length_setters(model: onnx.ModelProto, reach: int = 12) -> list[str]:
    """Outputs of `Round`/`Ceil` nodes that set a length downstream: a `LENGTH_OPS` node reads them within
    `reach` nodes. They are a TTS model's durations (Piper's `w_ceil`, Kokoro's `pred_dur`): a candidate that
    flips one changes the output's length, so the check pins them to the reference's values to compare."""
    readers = consumers(model.graph.node)
    return [n.output[0] for n in model.graph.node
            if n.op_type in ROUNDING_OPS and _reaches(n.output[0], readers, LENGTH_OPS, reach)]


def _reaches(tensor: str, readers: dict[str, list[onnx.NodeProto]], ops: frozenset[str], reach: int) -> bool:
    """Whether a node of one of `ops` reads `tensor`, or what it feeds, within `reach` nodes (breadth first)."""
    frontier, seen = [tensor], set()
    for _ in range(reach):
        nodes = [r for t in frontier for r in readers.get(t, []) if id(r) not in seen]
        if any(r.op_type in ops for r in nodes):
            return True
        seen.update(id(r) for r in nodes)
        frontier = [o for r in nodes for o in r.output if o]
    return False


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


# --- what a rewrite reads and names ----------------------------------------------------------------------

def attribute(node: onnx.NodeProto, name: str, default=None):
    """The value of a node's attribute (a repeated one as a list), or `default` when the node has none."""
    for attr in node.attribute:
        if attr.name == name:
            value = helper.get_attribute_value(attr)
            return list(value) if isinstance(value, (list, tuple)) else value
    return default


def constant_value(name: str, initializers: dict[str, onnx.TensorProto],
                   producer: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    """The value of a tensor known without running the graph: an initializer, a Constant's value (through
    Identity nodes), else None. (An initializer whose data is external must have been loaded.)"""
    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    node = producer.get(name)
    if node is not None and node.op_type == "Constant":
        attr = node.attribute[0]
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        return np.array(helper.get_attribute_value(attr)) if attr.name.startswith("value_") else None
    if node is not None and node.op_type == "Identity":
        return constant_value(node.input[0], initializers, producer)
    return None


def unused_name(base: str, used: Container[str]) -> str:
    """`base`, else the first of `base_1`, `base_2`, ... that `used` does not hold."""
    name, i = base, 1
    while name in used:
        name, i = f"{base}_{i}", i + 1
    return name


def declare_domains(model: onnx.ModelProto) -> None:
    """Import, at version 1, every op domain a node uses that the model does not import yet (in name order):
    rewrites and ONNX Runtime's fusions write com.microsoft nodes without always declaring the domain."""
    declared = {o.domain for o in model.opset_import}
    for domain in sorted({n.domain for n in model.graph.node if n.domain} - declared):
        model.opset_import.add(domain=domain, version=1)


# --- order and liveness -----------------------------------------------------------------------------------

def toposort(nodes: Iterable[onnx.NodeProto], known: Iterable[str] | None = None,
             what: str = "toposort") -> list[onnx.NodeProto]:
    """The nodes in an order where each comes after the nodes that write what it reads (Kahn's), keeping
    the given order wherever the edges allow it: of the nodes ready, the one given first goes first.

    `known`: the names there before any node runs (graph inputs, initializers); given, a node that reads
    a name neither known nor written by a node is an error. Without it, such names count as given.

    Not onnx-graphsurgeon's `Graph.toposort`: that one orders by depth, moving nodes the edges leave
    free (a pass's graph would change bytes), and recurses once per level, so a chain of about a
    thousand nodes out of order exceeds Python's recursion limit.
    """
    nodes = list(nodes)
    made_by = producer_indices(nodes)
    reads = [node_inputs(node) for node in nodes]
    if known is not None:
        known = set(known)
        stuck = [node.name for node, names in zip(nodes, reads)
                 if any(name not in known and name not in made_by for name in names)]
        if stuck:
            raise PipelineError(f"{what}: nodes {stuck[:3]} have inputs no node produces")
    deps = [{made_by[name] for name in names if name in made_by} for names in reads]
    users: dict[int, list[int]] = defaultdict(list)
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    waiting = [len(d) for d in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in users[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        placed = set(order)
        cycle = [node.name for i, node in enumerate(nodes) if i not in placed]
        raise PipelineError(f"{what}: the graph has a cycle through nodes {cycle[:3]}")
    return [nodes[i] for i in order]


def cleanup(model: onnx.ModelProto, removable: Callable[[onnx.NodeProto], bool] | None = None) -> int:
    """Drop, in place, the nodes no graph output needs (of those `removable` says may go, when given),
    and the value_info of tensors no node writes any more. What stays keeps its order and bytes.
    Returns how many nodes were dropped.

    onnx-graphsurgeon's `Graph.cleanup` decides, on an imported copy (see the module docstring).
    """
    graph = model.graph
    nodes = list(graph.node)
    live = _live_nodes(model, removable)
    keep = [node for i, node in enumerate(nodes) if i in live]
    if len(keep) != len(nodes):
        del graph.node[:]
        graph.node.extend(keep)
    alive = {out for node in keep for out in node.output} | {v.name for v in graph.input}
    infos = [v for v in graph.value_info if v.name in alive]
    if len(infos) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(infos)
    return len(nodes) - len(keep)


def drop_unused_initializers(model: onnx.ModelProto) -> int:
    """Drop, in place, the initializers no node reads (subgraph reads included) and no graph output is.
    What stays keeps its order. Returns how many were dropped."""
    graph = model.graph
    used = {name for node in graph.node for name in node_inputs(node)} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    dropped = len(graph.initializer) - len(keep)
    if dropped:
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return dropped


def _live_nodes(model: onnx.ModelProto, removable: Callable[[onnx.NodeProto], bool] | None) -> set[int]:
    """Indices of the nodes the graph outputs need, and of those `removable` refuses (and what they need)."""
    imported = gs.import_onnx(model)  # a copy for the question only: nothing is exported back
    index = {id(node): i for i, node in enumerate(imported.nodes)}
    staying: list[gs.Node] = []
    if removable is not None:
        staying = [node for node, proto in zip(imported.nodes, model.graph.node) if not removable(proto)]
        # A staying node needs what its outputs need (subgraph reads included), as if they were graph outputs.
        for node in staying:
            imported.outputs.extend([t for t in node.outputs if not t.is_empty()] or list(node.inputs))
    imported.cleanup()
    return {index[id(node)] for node in imported.nodes} | {index[id(node)] for node in staying}


def needed_nodes(graph: onnx.GraphProto, inputs: set[str], outputs: Sequence[str], what: str) -> list[int]:
    """Indices (graph order) of the nodes that compute `outputs` from `inputs` and initializers.

    Its own walk, not `cleanup`'s: it stops at the given tensors (an initializer that a node also writes
    counts as given) and says which needed tensor is missing, which onnx-graphsurgeon does not.
    """
    made_by = producer_indices(graph.node)
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


# --- cut, pin, more outputs -------------------------------------------------------------------------------

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


def with_outputs(model: onnx.ModelProto, tensors: Iterable[str], typed: bool = False,
                 what: str = "outputs", in_place: bool = False) -> onnx.ModelProto:
    """A copy of `model` that also returns `tensors`, after its own outputs (one that already is an
    output, or comes twice, is returned once); `in_place`: `model` itself, edited (no copy of its weights).

    `typed`: each new output declares its type and shape (`value_infos`), and every tensor must be one a
    node writes (`require_intermediates`, errors saying `what`). Untyped, an output only names its tensor,
    which ONNX Runtime accepts: enough for a session that reads intermediates (the check, fp16's guard).
    """
    tensors = list(tensors)
    infos: dict[str, onnx.ValueInfoProto] = {}
    if typed:
        require_intermediates(model, tensors, what)
        infos = value_infos(model)
    copy = model if in_place else onnx.ModelProto()
    if not in_place:
        copy.CopyFrom(model)
    present = {v.name for v in copy.graph.output}
    for name in tensors:
        if name in present:
            continue
        present.add(name)
        if typed:
            copy.graph.output.append(_io_info(name, infos, what))
        else:
            copy.graph.output.add(name=name)
    return copy


def join(parts: Sequence[tuple[str, onnx.ModelProto | Path]], links: dict[str, str], shared: Iterable[str],
         outputs: Sequence[str], dest: Path) -> None:
    """Write to `dest` one model that computes `parts` in order, so a chain of graphs runs as one session.

    Every name of part P becomes `P/name` (onnx.compose.add_prefix), except the graph inputs named in
    `shared`, which all parts read as one input of the joined model. `links` feeds a part's input from an
    earlier part's output (`{"norm/hidden": "layer_19/hidden_out"}`); the other inputs stay inputs
    (`layer_03/past_key`). The joined model's outputs are `outputs`, in prefixed names.

    A part given as a path is loaded when its turn comes, and its weights go to the file before the next
    is loaded: protobuf's wire format appends repeated fields when messages are concatenated, so the
    graph is written as a skeleton (nodes, inputs, outputs) followed by each part's initializers, and
    joining a model set never holds its weights twice. (A given proto is renamed in place.)"""
    shared = set(shared)
    skeleton = onnx.GraphProto(name="+".join(prefix for prefix, _ in parts))
    opsets: dict[str, int] = {}
    declared: set[str] = set()
    known_outputs: dict[str, onnx.ValueInfoProto] = {}
    ir_version = 0
    chunks = dest.with_name(dest.name + ".initializers")
    with open(chunks, "wb") as weights:
        for prefix, part in parts:
            m = onnx.load(str(part)) if isinstance(part, Path) else part
            onnx.compose.add_prefix(m, prefix + "/", inplace=True)
            _append_part(skeleton, m, prefix, links, shared, declared)
            known_outputs.update({o.name: o for o in m.graph.output})
            for o in m.opset_import:
                opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
            ir_version = max(ir_version, m.ir_version)
            weights.write(onnx.GraphProto(initializer=m.graph.initializer).SerializeToString())
            del m
    missing = [name for name in outputs if name not in known_outputs]
    if missing:
        chunks.unlink()
        raise PipelineError(f"join: no part has the outputs {', '.join(missing)}")
    skeleton.output.extend(known_outputs[name] for name in outputs)
    header = helper.make_model(onnx.GraphProto(), opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    header.ir_version = ir_version
    header.ClearField("graph")
    graph_head = skeleton.SerializeToString()
    graph_size = len(graph_head) + chunks.stat().st_size
    with open(dest, "wb") as out, open(chunks, "rb") as weights:
        out.write(header.SerializeToString())
        out.write(_field_header(7, graph_size))  # ModelProto.graph, length-delimited
        out.write(graph_head)
        shutil.copyfileobj(weights, out, 2**24)
    chunks.unlink()


def _append_part(skeleton: onnx.GraphProto, m: onnx.ModelProto, prefix: str, links: dict[str, str],
                 shared: set[str], declared: set[str]) -> None:
    """A renamed part's nodes, value_info and own inputs into the joined graph (not its initializers)."""
    rename = {f"{prefix}/{name}": name for name in shared} | \
        {k: v for k, v in links.items() if k.startswith(prefix + "/")}
    for node in m.graph.node:
        node.input[:] = [rename.get(name, name) for name in node.input]
    for value in m.graph.input:
        name = rename.get(value.name, value.name)
        if value.name in links or name in declared:
            continue
        value.name = name
        skeleton.input.append(value)
        declared.add(name)
    skeleton.node.extend(m.graph.node)
    skeleton.value_info.extend(m.graph.value_info)


def _field_header(number: int, size: int) -> bytes:
    """The tag and length varints of a length-delimited protobuf field."""
    def varint(v: int) -> bytes:
        out = bytearray()
        while True:
            byte, v = v & 0x7F, v >> 7
            out.append(byte | (0x80 if v else 0))
            if not v:
                return bytes(out)
    return varint(number << 3 | 2) + varint(size)
