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

import onnx
from pydantic import BaseModel, ConfigDict

from pipeline.core.blocks import BlockPartition
from pipeline.core.feeds import Feeds


class Params(BaseModel):
    """Base of every pass's parameter schema: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")




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
    # Set when the model is handed over light (a large model, `pipeline.core.onnx_io.LARGE_BYTES`): the folder of the
    # external-data files its weights stay in (read them with `onnx_io.tensor_array(t, ctx.weights_dir)`).
    weights_dir: Path | None = None

    def in_scope(self, node: onnx.NodeProto) -> bool:
        return self.selected is None or node.name in self.selected


@dataclass
class PassResult:
    # The graphs that replace the input graph, by name, in order: the input's own name for a pass that rewrites
    # one graph (`PassResult.of`), new names for one that cuts it into several (split), with `chain` listing the
    # edges between them ({"from": "encoder.z", "to": "decoder.z"}).
    graphs: dict[str, onnx.ModelProto]
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    chain: list[dict[str, str]] = field(default_factory=list)
    # New nodes the pass already named into the right block (fused ops): the runner leaves their names.
    placed: set[str] = field(default_factory=set)
    # Where the external-data files of a light result lie, when not in `ctx.weights_dir` (a tool wrote them).
    weights_dir: Path | None = None

    @classmethod
    def of(cls, ctx: PassContext, model: onnx.ModelProto, changed: bool, **rest: Any) -> PassResult:
        """The result of a pass that rewrote the one graph it was given (it keeps its name)."""
        return cls({ctx.graph_name: model}, changed, **rest)

    @property
    def model(self) -> onnx.ModelProto:
        """The one graph of a one-graph result."""
        if len(self.graphs) != 1:
            raise ValueError(f"the result holds {len(self.graphs)} graphs ({', '.join(self.graphs)}), not one")
        return next(iter(self.graphs.values()))


# ONNX Runtime has no kernel for many ops before opset 7 (Add-6, Relu-1: measured with ORT 1.32), and every step's
# result is loaded in it (`pipeline.core.onnx_io.check_loads`): no pass's output is usable below it.
ORT_MIN_OPSET = 7
# IR 4 (ONNX 1.4) is the first IR where an initializer need not also be a graph input.
IR_INITIALIZERS_APART = 4


class Pass:
    """Subclasses set `name`, `Params`, and implement `apply`; the docstring is the help text."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    # The lowest default-domain opset at which this pass's output is a valid graph (onnx.checker and an ONNX Runtime
    # session), measured for each pass on models of opsets 7 to 21 (tests/test_old_models.py). A pass that writes an
    # op in a form only newer opsets define sets it higher; the runner refuses older models with one line.
    min_opset: ClassVar[int] = ORT_MIN_OPSET
    # Whether the pass takes a model whose weights are graph inputs: IR 3's layout (below IR 4 every initializer
    # must also be an input) and old exporters' keep_initializers_as_inputs. Measured: a pass that adds initializers
    # then writes an invalid graph at IR 3, and one that replaces or cuts weights leaves them inputs without a
    # value, a graph that loads but wants its weights fed (which neither onnx.checker nor ONNX Runtime flags).
    takes_weights_as_inputs: ClassVar[bool] = False
    # Passes whose output may be newer than their input (onnxsim writes IR 4's layout; ONNX Runtime's quantizers
    # convert a model below opset 10 to 11): the steps after one are checked when they run, not at plan time.
    upgrades_model: ClassVar[bool] = False
    # Passes that rewrite the whole graph (simplify) cannot honour a block scope.
    scoped: ClassVar[bool] = True
    # Passes that change the precision of what the graph computes (fp16, quantize, compress_weights). Their
    # stats carry `blocks_changed` ({block id: nodes or tensors changed}), so the automatic fallback
    # (pipeline.search.fallback) can shrink any of them block by block.
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

    def min_opset_for(self, params: Params) -> int:
        """`min_opset` for these parameters (a pass whose output's ops depend on them overrides it)."""
        return self.min_opset

    def opset_problem(self, model: onnx.ModelProto, params: Params, path: str = "model.onnx") -> str | None:
        """Why `model` (the file `path`) is too old for this pass to write a valid graph from, in one line with
        the command that upgrades it, or None when it is not. Reads only the proto's header and names: a light
        (large) model is fine."""
        need = self.min_opset_for(params)
        opset = default_opset(model) or need  # (a graph of contrib ops only has no default opset to be short of)
        layout = not self.takes_weights_as_inputs and weights_are_inputs(model)
        if opset >= need and not layout:
            return None
        short = [f"opset {opset}, needs >= {need}"] if opset < need else []
        if layout:
            short.append(f"IR {model.ir_version} with its weights among the graph inputs, needs IR >= "
                         f"{IR_INITIALIZERS_APART} with them apart")
        return (f"{path} is too old for pass {self.name!r}: {'; '.join(short)} (upgrade it with "
                f"onnx.version_converter: {upgrade_command(path, max(opset, need), layout)})")

    def graphs_after(self, params: Params, graph: str) -> list[str]:
        """Names of the graphs this pass makes of `graph` (itself, unless it cuts graphs), known before it
        runs, so a recipe's later scopes can be checked before any long work starts."""
        return [graph]

    def apply(self, model: onnx.ModelProto, params: Params, ctx: PassContext) -> PassResult:
        raise NotImplementedError


def default_opset(model: onnx.ModelProto) -> int | None:
    """The model's opset of the default (ai.onnx) domain, None when it imports none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def weights_are_inputs(model: onnx.ModelProto) -> bool:
    """True for IR 3's layout: below IR 4 every initializer is also a graph input, and old exporters kept it so."""
    inits = {t.name for t in model.graph.initializer}
    return model.ir_version < IR_INITIALIZERS_APART or any(i.name in inits for i in model.graph.input)


def upgrade_command(path: str, opset: int, drop_weight_inputs: bool) -> str:
    """A shell command that writes `path` converted to `opset`, at an IR that opset needs (at least 4), its weights
    out of the graph inputs when `drop_weight_inputs`, beside it (the version converter leaves the IR as it was)."""
    ir = max(IR_INITIALIZERS_APART, onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)]))
    out = str(Path(path).with_suffix(f".opset{opset}.onnx"))
    drop = ("w = {t.name for t in m.graph.initializer}; x = [i for i in m.graph.input if i.name not in w]; "
            "del m.graph.input[:]; m.graph.input.extend(x); ") if drop_weight_inputs else ""
    return (f'python -c "import onnx; from onnx import version_converter as vc; '
            f"m = vc.convert_version(onnx.load({str(path)!r}), {opset}); m.ir_version = max(m.ir_version, {ir}); "
            f'{drop}onnx.save(m, {out!r})"')


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))
