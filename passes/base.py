"""What every pass shares: parameters, context and result.

A pass sees one ONNX graph and a context, nothing else: it never imports the
runner or the CLI, so it can be tested on a model built in a test.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict

from pipeline.blocks import BlockPartition


class Params(BaseModel):
    """Base of every pass's parameter schema: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


Feeds = dict[str, np.ndarray]


@dataclass
class PassContext:
    graph_name: str
    blocks: BlockPartition
    # Node names the step's scope selects; None means the whole graph.
    selected: set[str] | None
    workdir: Path
    # Yields real feed dicts for this graph (calibration); None when the recipe has none.
    calibration: Callable[[], Iterator[Feeds]] | None = None
    log: Callable[[str], None] = lambda msg: None
    # Set when the model is handed over light (a large model, `pipeline.onnx_io.LARGE_BYTES`): the folder of the
    # external-data files its weights stay in (read them with `onnx_io.tensor_array(t, ctx.weights_dir)`).
    weights_dir: Path | None = None

    def in_scope(self, node: onnx.NodeProto) -> bool:
        return self.selected is None or node.name in self.selected


@dataclass
class PassResult:
    model: onnx.ModelProto
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    # A pass that cuts one graph into several (split) names them here; the
    # runner then replaces the input graph with these, in this order, and
    # `model` is ignored. `chain` lists the edges between the new graphs
    # ({"from": "encoder.z", "to": "decoder.z"}).
    graphs: dict[str, onnx.ModelProto] | None = None
    chain: list[dict[str, str]] = field(default_factory=list)
    # New nodes the pass already named into the right block (fused ops): the runner leaves their names.
    placed: set[str] = field(default_factory=set)
    # Where the external-data files of a light result lie, when not in `ctx.weights_dir` (a tool wrote them).
    weights_dir: Path | None = None


class Pass:
    """Subclasses set `name`, `Params`, and implement `apply`; the docstring is the help text."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    # Passes that rewrite the whole graph (simplify) cannot honour a block scope.
    scoped: ClassVar[bool] = True
    # Passes that change the precision of what the graph computes (fp16, quantize, compress_weights). Their
    # stats carry `blocks_changed` ({block id: nodes or tensors changed}), so the automatic fallback
    # (pipeline.fallback) can shrink any of them block by block.
    changes_precision: ClassVar[bool] = False

    def needs_calibration_for(self, params: Params) -> bool:
        """True when the pass cannot run without the recipe's calibration data."""
        return False

    def wants_calibration(self, params: Params) -> bool:
        """True when the pass uses calibration data if the recipe has some."""
        return self.needs_calibration_for(params)

    def large_model_problem(self, params: Params) -> str | None:
        """Why this pass cannot take a large model (weights left in external-data files), or None when it can.

        Passes that edit the proto's weights in memory cannot: protobuf caps a proto at 2 GB."""
        return (f"pass {self.name!r} holds the whole model in memory, and protobuf caps a model at 2 GB: run it "
                f"after a step that brings the model under 2 GB (quantize, fp16, compress_weights)")

    def graphs_after(self, params: Params, graph: str) -> list[str]:
        """Names of the graphs this pass makes of `graph` (itself, unless it cuts graphs), known before it
        runs, so a recipe's later scopes can be checked before any long work starts."""
        return [graph]

    def apply(self, model: onnx.ModelProto, params: Params, ctx: PassContext) -> PassResult:
        raise NotImplementedError


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy: passes that edit in place work on one, so their input stays as it was."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
