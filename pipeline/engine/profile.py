"""`pipeline inspect`'s numbers per block: weight bytes, and FLOPs and kernel time measured on one real input.

FLOPs depend on the input's lengths (a TTS model's frame count depends on the text), so the model runs once in
ONNX Runtime with profiling on: each node event names its node and carries the shapes it ran with
(`args.input_type_shape`, `args.output_type_shape`), from which `node_macs` counts multiply-accumulates. ORT
names a kernel after its graph node, also when it fused it (a Conv+Relu runs as FusedConv `/x/conv/Conv`); a
node it created (a QuantizeLinear it inserted) matches no graph node and lands in no block: the numbers say how
much that is.
"""
from __future__ import annotations

import glob
import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort

from calibration import SourceContext
from pipeline.core.blocks import BlockPartition
from pipeline.core.errors import PipelineError, one_line
from pipeline.core.feeds import Feeds
from pipeline.core.graph_stats import COUNTED_OPS, BlockStats, node_macs
from pipeline.core.onnx_io import ORT_RUN_ERRORS
from pipeline.evaluation.blockwise import block_bytes

KERNEL_SUFFIX = "_kernel_time"  # ORT's node events: `<node name>_kernel_time` (fences have other suffixes)


@dataclass
class NodeEvent:
    """One kernel run from ONNX Runtime's profile."""

    node: str
    op: str
    inputs: list[list[int] | None]
    outputs: list[list[int] | None]
    us: int


@dataclass
class Measured:
    """What one profiled run measured, by block; `stray_*`: kernels that match no graph node (in no block)."""

    feed_file: Path
    macs: Counter = field(default_factory=Counter)
    kernel_us: Counter = field(default_factory=Counter)
    counted_nodes: int = 0  # graph nodes of COUNTED_OPS whose kernel ran and whose MACs the shapes gave
    countable_nodes: int = 0  # graph nodes of COUNTED_OPS
    stray_us: int = 0
    stray_macs: int = 0
    stray_ops: Counter = field(default_factory=Counter)

    @property
    def total_us(self) -> int:
        return sum(self.kernel_us.values()) + self.stray_us


def first_feed(folder: Path, model: onnx.ModelProto) -> tuple[Path, Feeds]:
    """The first `.npz` feed file of `folder` (by name), checked against the model's inputs."""
    from pipeline.families import draw_samples

    if not folder.is_dir():
        raise PipelineError(f"--npz: {folder} is not a folder (give a folder of .npz feed files)")
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise PipelineError(f"--npz: no .npz file in {folder} (each holds one feed dict: input name -> array)")
    feeds, _ = draw_samples("npz", {"folder": str(folder), "pattern": glob.escape(files[0].name)},
                            SourceContext(None), model, "--npz")
    return files[0], feeds[0]


def profile_run(model_path: Path, feeds: Feeds) -> list[NodeEvent]:
    """Run the model once with ORT's profiler on (all optimizations, as it would run); the kernel events. The
    profile file goes into a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="pipeline-profile-") as folder:
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(folder) / "inspect")
        opts.log_severity_level = 3
        try:
            sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
            sess.run(None, feeds)
        except ORT_RUN_ERRORS as e:
            raise PipelineError(f"--npz: ONNX Runtime cannot run {model_path.name} on that feed: "
                                f"{one_line(e, 400)}") from None
        profile = Path(sess.end_profiling())
        events = json.loads(profile.read_text())
    return [NodeEvent(e["name"].removesuffix(KERNEL_SUFFIX), e["args"].get("op_name", ""),
                      _shapes(e["args"].get("input_type_shape", [])), _shapes(e["args"].get("output_type_shape", [])),
                      int(e.get("dur", 0)))
            for e in events if e.get("cat") == "Node" and e.get("name", "").endswith(KERNEL_SUFFIX)]


def _shapes(entries: list[dict[str, list[int]]]) -> list[list[int] | None]:
    """`[{"float": [1, 5, 4]}, ...]` -> `[[1, 5, 4], ...]`."""
    return [next(iter(e.values()), None) if isinstance(e, dict) else None for e in entries]


def measure(model: onnx.ModelProto, partition: BlockPartition, events: list[NodeEvent], feed_file: Path) -> Measured:
    """Sum the kernel events' MACs and time into the blocks of the nodes they ran."""
    nodes = {n.name: n for n in model.graph.node}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    measured = Measured(feed_file)
    counted: set[str] = set()
    for event in events:
        node = nodes.get(event.node)
        inputs = _aligned(node, event.inputs, weights) if node is not None else event.inputs
        macs = node_macs(event.op, inputs, event.outputs, node)
        if node is None:
            measured.stray_us += event.us
            measured.stray_macs += macs or 0
            measured.stray_ops[event.op] += 1
            continue
        block = partition.node_block[node.name]
        measured.kernel_us[block] += event.us
        if macs is not None:
            measured.macs[block] += macs
            counted.add(node.name)
    measured.countable_nodes = sum(n.op_type in COUNTED_OPS for n in model.graph.node)
    measured.counted_nodes = sum(nodes[n].op_type in COUNTED_OPS for n in counted)
    return measured


def _aligned(node: onnx.NodeProto, shapes: list[list[int] | None],
             weights: dict[str, list[int]]) -> list[list[int] | None]:
    """The kernel's input shapes in the node's input order. ORT leaves out of the event the weights it prepacked
    (a MatMul's B): when the event lists fewer shapes than the node has inputs, the first weights are the ones
    missing. A weight's shape is always taken from the graph."""
    names = [i for i in node.input]
    missing = len([n for n in names if n]) - len(shapes)
    given = iter(shapes)
    aligned: list[list[int] | None] = []
    for name in names:
        if name in weights and missing > 0:
            missing -= 1
            aligned.append(weights[name])
        elif name in weights:
            next(given, None)
            aligned.append(weights[name])
        else:
            aligned.append(next(given, None) if name else None)
    return aligned


def block_stats(model: onnx.ModelProto, partition: BlockPartition,
                measured: Measured | None = None) -> dict[str, BlockStats]:
    """Each block's nodes, parameters, op counts and weight bytes, and what a profiled run measured in it."""
    sizes, _ = block_bytes(model, partition)
    stats = {}
    for block_id, block in partition.blocks.items():
        stats[block_id] = BlockStats(len(block.nodes), block.params, sizes.get(block_id, 0), Counter(block.op_types))
        if measured is not None:
            stats[block_id].macs = measured.macs.get(block_id, 0)
            stats[block_id].kernel_us = measured.kernel_us.get(block_id, 0)
    return stats
