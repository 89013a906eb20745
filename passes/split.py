"""split: cut a monolithic VITS/Piper graph into `encoder` and `decoder`.

The same cut Piper's `export_onnx_streaming.py` makes in PyTorch, found here
from the graph: the encoder (text encoder, duration predictor, alignment,
noise) ends at the tensors that enter the flow; the decoder (flow in reverse,
then the HiFi-GAN generator) starts from them. In Piper those are `z` (z_p
after the noise), `y_mask`, and `g` for a multi-speaker voice, and they get
those names here. A streaming runtime runs the encoder once and the decoder
chunk by chunk (`pipeline.families.piper.streaming`), so audio starts early.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import onnx
from pydantic import Field

from pipeline.core.errors import PipelineError
from pipeline.core.graph import consumer_indices, cut, node_inputs, producer_indices, value_infos

from .base import Params, Pass, PassContext, PassResult

# Piper's names for the decoder inputs, in its order.
ROLES = ("z", "y_mask", "g")


class SplitParams(Params):
    # Node-name prefix of the flow: the tensors its nodes read from outside it are the cut.
    flow_scope: str = Field("/flow/", description="Node-name prefix of the flow: the tensors its nodes read from "
                                                  "the encoder side are the cut.")
    # Node-name prefix of the generator, which goes to the decoder with the flow.
    generator_scope: str = Field("/dec/", description="Node-name prefix of the generator, which goes to the "
                                                      "decoder with the flow.")


class Split(Pass):
    """Cut a VITS/Piper graph into `encoder` and `decoder` where the flow begins (Piper's streaming export).

    The encoder maps phoneme ids, lengths and scales to z, y_mask (and g for a
    multi-speaker voice); the decoder runs the flow in reverse and the
    generator. Chained, they give the monolithic output; node names are kept,
    so block scopes such as /flow/flows.N and /dec/ups.N still resolve.
    """

    name = "split"
    Params = SplitParams
    scoped = False

    def graphs_after(self, params: SplitParams, graph: str) -> list[str]:
        return ["encoder", "decoder"]

    def apply(self, model: onnx.ModelProto, params: SplitParams, ctx: PassContext) -> PassResult:
        where = f"split on graph {ctx.graph_name!r}"
        infos = value_infos(model)
        boundary = find_cut(model.graph, params, infos, where)
        graphs = {part: cut_part(model, boundary, part, infos, where) for part in ("encoder", "decoder")}
        chain = [{"from": f"encoder.{name}", "to": f"decoder.{name}"} for t, name in boundary.names.items()
                 if t in boundary.passed]
        stats = {"boundary": dict(boundary.names), "encoder_nodes": len(graphs["encoder"].graph.node),
                 "decoder_nodes": len(graphs["decoder"].graph.node)}
        fed_directly = [t for t in boundary.tensors if t not in boundary.passed]
        if fed_directly:
            stats["decoder_takes_graph_inputs"] = fed_directly
        ctx.log(f"split {ctx.graph_name}: boundary " + ", ".join(f"{t} -> {n}" for t, n in boundary.names.items()))
        return PassResult(graphs, changed=True, stats=stats, chain=chain)


@dataclass
class Boundary:
    tensors: list[str]  # what the decoder reads from outside it, in Piper's order (z, y_mask, g) where known
    passed: list[str]  # those the encoder computes (the rest are graph inputs the decoder takes itself)
    names: dict[str, str]  # boundary tensor -> its name in the two graphs (z, y_mask, g, or its own)
    encoder_outputs: list[str]
    decoder_outputs: list[str]


def find_cut(graph: onnx.GraphProto, params: SplitParams, infos: dict[str, onnx.ValueInfoProto],
             where: str) -> Boundary:
    """The tensors that enter the flow (and generator) from the encoder side, and who outputs what."""
    decoder_side = decoder_nodes(graph, params, where)
    tensors = boundary_tensors(graph, decoder_side)
    originals = [v.name for v in graph.input]
    if not tensors:
        raise PipelineError(f"{where}: the flow and generator read no tensor computed from the graph inputs; "
                            f"nothing to cut")
    if all(t in originals for t in tensors):
        raise PipelineError(f"{where}: the graph already starts at the flow (it reads inputs "
                            f"{', '.join(tensors)} directly); nothing to split off")
    made_by = producer_indices(graph.node)
    outputs = [v.name for v in graph.output]
    decoder_outputs = [o for o in outputs if made_by.get(o) in decoder_side]
    if not decoder_outputs:
        raise PipelineError(f"{where}: no graph output comes from the flow/generator ({params.flow_scope!r}, "
                            f"{params.generator_scope!r}); not a VITS graph that ends in a vocoder")
    roles = role_names(graph, tensors, infos)
    tensors.sort(key=lambda t: ROLES.index(roles[t]) if t in roles else len(ROLES))
    passed = [t for t in tensors if t not in originals]
    return Boundary(tensors, passed, {t: roles.get(t, t) for t in tensors},
                    passed + [o for o in outputs if o not in decoder_outputs], decoder_outputs)


def cut_part(model: onnx.ModelProto, boundary: Boundary, part: str, infos: dict[str, onnx.ValueInfoProto],
             where: str) -> onnx.ModelProto:
    """The encoder (graph inputs -> boundary) or the decoder (boundary -> audio), boundary renamed."""
    if part == "encoder":
        result = cut(model, [v.name for v in model.graph.input], boundary.encoder_outputs, where, infos)
    else:
        result = cut(model, boundary.tensors, boundary.decoder_outputs, where, infos)
    renamed = {t: n for t, n in boundary.names.items() if t != n}
    rename_tensors(result, renamed)
    name_time_axes(result, list(boundary.names.values()))
    result.graph.name = f"{model.graph.name}_{part}"
    return result


def decoder_nodes(graph: onnx.GraphProto, params: SplitParams, where: str) -> set[int]:
    """The flow and generator nodes, and every node downstream of them.

    Downstream matters: the flow's WaveNet gates (TorchScript helpers) are
    exported without a scope, and `z * y_mask` before the generator has none either.
    """
    flow = [i for i, n in enumerate(graph.node) if n.name.startswith(params.flow_scope)]
    if not flow:
        raise PipelineError(
            f"{where}: no node named under {params.flow_scope!r}; split looks for the tensors that enter "
            f"the VITS flow (nodes {params.flow_scope}flows.N/...) to cut encoder | decoder "
            f"(set flow_scope if this graph's flow is named differently)")
    seeds = flow + [i for i, n in enumerate(graph.node) if n.name.startswith(params.generator_scope)]
    return downstream_nodes(graph, seeds)


def downstream_nodes(graph: onnx.GraphProto, seeds: Iterable[int]) -> set[int]:
    readers = consumer_indices(graph.node)
    found, stack = set(), list(seeds)
    while stack:
        index = stack.pop()
        if index in found:
            continue
        found.add(index)
        stack.extend(r for out in graph.node[index].output if out for r in readers.get(out, []))
    return found


def downstream_tensors(graph: onnx.GraphProto, sources: Iterable[str]) -> set[str]:
    """Tensors whose value depends on any of `sources` (graph order makes one sweep enough)."""
    found = set(sources)
    for node in graph.node:
        if any(name in found for name in node_inputs(node)):
            found.update(out for out in node.output if out)
    return found


def boundary_tensors(graph: onnx.GraphProto, decoder_side: set[int]) -> list[str]:
    """Tensors the decoder side reads that the encoder side computes from the graph inputs.

    Constants (and anything computed from constants only) are not part of the
    cut: `cut` copies the nodes that make them into whichever graph needs them.
    """
    from_inputs = downstream_tensors(graph, (v.name for v in graph.input))
    made_by = producer_indices(graph.node)
    found: dict[str, None] = {}
    for index in sorted(decoder_side):
        for name in node_inputs(graph.node[index]):
            if name in from_inputs and made_by.get(name) not in decoder_side:
                found[name] = None
    return list(found)


def role_names(graph: onnx.GraphProto, boundary: list[str], infos: dict[str, onnx.ValueInfoProto]) -> dict[str, str]:
    """Boundary tensor -> Piper's name (z, y_mask, g) when each role is recognised, else {}.

    g (speaker embedding) does not depend on the phonemes (the first input);
    y_mask is [batch, 1, frames]; z is the remaining one.
    """
    from_phonemes = downstream_tensors(graph, [graph.input[0].name]) if graph.input else set()
    g = [t for t in boundary if t not in from_phonemes]
    y_mask = [t for t in boundary if t in from_phonemes and _channels(infos.get(t)) == 1]
    z = [t for t in boundary if t in from_phonemes and t not in y_mask]
    if len(z) != 1 or len(y_mask) != 1 or len(g) > 1:
        return {}
    names = {z[0]: "z", y_mask[0]: "y_mask"} | ({g[0]: "g"} if g else {})
    taken = {out for node in graph.node for out in node.output} | {v.name for v in graph.input}
    if any(new in taken and old != new for old, new in names.items()):
        return {}  # a tensor already has one of these names: renaming would clash
    return names


def _channels(info: onnx.ValueInfoProto | None) -> int | None:
    dims = info.type.tensor_type.shape.dim if info is not None else []
    return dims[1].dim_value if len(dims) == 3 and dims[1].HasField("dim_value") else None


def rename_tensors(model: onnx.ModelProto, names: dict[str, str]) -> None:
    """Rename tensors in place (node inputs and outputs, graph inputs, outputs, value_info)."""
    if not names:
        return
    graph = model.graph
    for node in graph.node:
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                if name in names:
                    field[i] = names[name]
    for info in list(graph.input) + list(graph.output) + list(graph.value_info):
        if info.name in names:
            info.name = names[info.name]


def name_time_axes(model: onnx.ModelProto, tensors: list[str]) -> None:
    """Give the boundary's unnamed batch and time axes Piper's names, so runtimes can read them."""
    for info in list(model.graph.input) + list(model.graph.output):
        dims = info.type.tensor_type.shape.dim
        if info.name not in tensors or len(dims) != 3:
            continue
        for axis, label in ((0, "batch_size"), (2, "frames")):
            if not dims[axis].HasField("dim_value") and not dims[axis].dim_param:
                dims[axis].dim_param = label
