"""Run a ModelSet whose graphs chain by plain dataflow (a split voice: encoder -> decoder).

The chain edges in modelset.json read `{"from": "encoder.z", "to": "decoder.z"}`.
Graphs with no incoming edge are entry graphs: they take the user's feeds
(phoneme ids, lengths, scales) by input name. This lets a step on a
downstream graph be calibrated and checked with inputs captured from the
FP32 upstream graphs on real data, never with random tensors.

ChatTTS's GPT chain is a loop with a KV cache, not dataflow; its captures live
in `pipeline.families.chattts.check`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from pipeline.core.errors import PipelineError
from pipeline.core.modelset import ModelSet
from pipeline.core.onnx_io import parse_graph, session
from pipeline.core.feeds import Feeds



@dataclass(frozen=True)
class Edge:
    src_graph: str
    src_tensor: str
    dst_graph: str
    dst_tensor: str


def dataflow_edges(ms: ModelSet) -> list[Edge]:
    """The model set's graph-to-graph edges."""
    return parse_edges(ms.chain, str(ms.root))


def parse_edges(chain: list[dict[str, str]], where: str) -> list[Edge]:
    """Chain entries as edges; entries that are not plain `graph.tensor` pairs are not dataflow."""
    edges = []
    for entry in chain:
        src, dst = entry.get("from", ""), entry.get("to", "")
        if "." not in src or "." not in dst or "|" in src + dst or "[" in src:
            raise PipelineError(f"{where}: chain entry {entry} is not a dataflow edge (graph.tensor -> graph.tensor)")
        (sg, st), (dg, dt) = src.split(".", 1), dst.split(".", 1)
        edges.append(Edge(sg, st, dg, dt))
    return edges


def is_dataflow(ms: ModelSet) -> bool:
    try:
        dataflow_edges(ms)
    except PipelineError:
        return False
    return True


def entry_graphs(ms: ModelSet) -> list[str]:
    fed = {e.dst_graph for e in dataflow_edges(ms)}
    return [g for g in ms.names() if g not in fed]


def sink_graphs(ms: ModelSet) -> list[str]:
    feeding = {e.src_graph for e in dataflow_edges(ms)}
    return [g for g in ms.names() if g not in feeding]


def _upstream_order(ms: ModelSet, target: str) -> list[str]:
    """Graphs `target` depends on, then `target`, in an order where producers come first."""
    edges = dataflow_edges(ms)
    order: list[str] = []

    def visit(graph: str, path: tuple[str, ...]) -> None:
        if graph in path:
            raise PipelineError(f"{ms.root}: the chain has a cycle through {graph!r}")
        if graph in order:
            return
        for e in edges:
            if e.dst_graph == graph:
                visit(e.src_graph, path + (graph,))
        order.append(graph)

    visit(target, ())
    return order


class ChainRunner:
    """One ORT session per graph, run in dataflow order; returns every graph's inputs and outputs."""

    def __init__(self, ms: ModelSet, threads: int = 2):
        self.ms = ms
        self.edges = dataflow_edges(ms)
        self.sessions: dict[str, ort.InferenceSession] = {}
        self.threads = threads

    def _session(self, graph: str) -> ort.InferenceSession:
        if graph not in self.sessions:
            self.sessions[graph] = session(self.ms.path(graph), threads=self.threads, spinning=False)
        return self.sessions[graph]

    def run(self, feeds: Feeds) -> dict[str, tuple[Feeds, Feeds]]:
        """{graph: (its feeds, its outputs)} for every graph."""
        order: list[str] = []
        for t in self.ms.names():
            order += [g for g in _upstream_order(self.ms, t) if g not in order]
        return self._run_in_order(order, feeds)

    def inputs_for(self, graph: str, feeds: Feeds) -> Feeds:
        """What `graph` is fed on these entry feeds: its upstream graphs run, it does not."""
        seen = self._run_in_order(_upstream_order(self.ms, graph)[:-1], feeds)
        return self._inputs(graph, feeds, seen)

    def _run_in_order(self, order: list[str], feeds: Feeds) -> dict[str, tuple[Feeds, Feeds]]:
        seen: dict[str, tuple[Feeds, Feeds]] = {}
        for graph in order:
            inputs = self._inputs(graph, feeds, seen)
            sess = self._session(graph)
            seen[graph] = (inputs, dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs))))
        return seen

    def _inputs(self, graph: str, feeds: Feeds, seen: dict[str, tuple[Feeds, Feeds]]) -> Feeds:
        return {i.name: self._value_for(graph, i.name, feeds, seen) for i in self._session(graph).get_inputs()}

    def _value_for(self, graph: str, name: str, feeds: Feeds, seen: dict[str, tuple[Feeds, Feeds]]) -> np.ndarray:
        for e in self.edges:
            if e.dst_graph == graph and e.dst_tensor == name:
                return seen[e.src_graph][1][e.src_tensor]
        if name not in feeds:
            raise PipelineError(f"{self.ms.root}: graph {graph!r} input {name!r} is neither fed by the chain nor "
                                f"in the inputs ({', '.join(feeds) or 'none'})")
        return feeds[name]


def graph_feeds(ms: ModelSet, entry_feeds: list[Feeds], graph: str,
                progress: Callable[[int, int], None] = lambda done, total: None) -> list[Feeds]:
    """Inputs of `graph` on each entry feed: given as they are for an entry graph, else captured upstream."""
    if graph in entry_graphs(ms):  # the user's feeds fit it as they are: no session to build
        from calibration import graph_inputs

        names = graph_inputs(parse_graph(ms.path(graph)))
        missing = sorted(set(names) - set(entry_feeds[0])) if entry_feeds else []
        if missing:
            raise PipelineError(f"{ms.root}: graph {graph!r} inputs {', '.join(missing)} are not in the inputs "
                                f"({', '.join(entry_feeds[0])})")
        return [{k: v for k, v in f.items() if k in names} for f in entry_feeds]
    runner = ChainRunner(ms)
    captured = []
    for i, f in enumerate(entry_feeds):
        progress(i, len(entry_feeds))
        captured.append(runner.inputs_for(graph, f))
    progress(len(entry_feeds), len(entry_feeds))
    return captured
