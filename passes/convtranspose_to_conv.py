"""convtranspose_to_conv: 1-D ConvTranspose (a vocoder's upsampler) becomes a polyphase Conv, the same numbers.

ONNX Runtime cannot run a ConvTranspose in integers: its quantizers have no
integer form of it (no ConvInteger path for `dynamic`, no QLinearConvTranspose
for `qoperator`), and the QDQ pair `static` puts around one runs dequantized
in FP32 on the CPU. So a vocoder's upsamplers stay float after INT8, however
much of its time they take. A Conv has both forms: once an upsampler is a Conv,
the `quantize` pass turns it into ConvInteger or QLinearConv like any other.

The rewrite is the polyphase form of a strided ConvTranspose (stride s,
kernel K, group g): output sample j = m s + r reads kernel taps r, r + s,
r + 2s, ... against inputs m, m - 1, m - 2, ..., which is an ordinary
correlation per phase r. So ONE Conv with C_out * s output channels and
kernel ceil(K / s) (each output channel's kernel split into its s phases,
flipped and zero-padded to one length) computes all phases at input rate, and
a Reshape/Transpose/Reshape interleaves them along time (1-D depth-to-space:
[N, C_out, s, T'] -> [N, C_out, T' s]); a Slice drops what `pads` crop and
keeps what `output_padding` adds. Each output still costs K/s multiply-adds
per input channel, as in the ConvTranspose (inserting s - 1 zeros between
inputs and running a plain Conv would cost s times more). Group > 1
(depthwise included) keeps its groups: phase channels stay inside their
group. A dilation is written into the kernel as zeros.

It is exact in FP32 up to the order of the float sums (the same products are
added), and the time axis may be symbolic: the Reshapes copy N and infer T',
the Slice counts from both ends, so no shape is computed at run time.

Only in-scope 1-D ConvTransposes with a constant weight (and bias, if any),
explicit or VALID padding and no `output_shape` are rewritten, and only with
a stride of at least `min_stride`; every other one is listed in the stats
with the reason it was left alone. `expect_min_nodes` makes a shortfall fail.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper
from pydantic import Field

from pipeline.core.errors import PipelineError
from pipeline.core.graph import attribute, drop_unused_initializers, unused_name
from pipeline.core.onnx_io import copy_model
from pipeline.core.rewrite import GraphView, Mismatch, Rule, apply_rules

from .base import Params, Pass, PassContext, PassResult, default_opset, op_counts

# Slice's "to the end" (ONNX clamps it to the axis' length).
TO_END = np.iinfo(np.int64).max
# Slice takes starts/ends/axes as inputs from opset 10 on, as attributes before: the pass writes either form.
SLICE_INPUTS_OPSET = 10


class ConvTransposeToConvParams(Params):
    min_stride: int = Field(2, ge=1, description="Rewrite only ConvTransposes with at least this stride (a "
                            "stride-1 ConvTranspose costs what a Conv does: left alone by default).")
    expect_min_nodes: int | None = Field(default=None, ge=0, description="Fail the step when fewer "
                                         "ConvTransposes than this are rewritten (a scope that matches none, or "
                                         "nodes left alone for the reasons the stats give).")


@dataclass
class Upsampler:
    """A ConvTranspose the rule can rewrite, with what the rewrite needs."""

    node: onnx.NodeProto
    weight: np.ndarray  # [C_in, C_out / group, K], the dilation already written into K
    bias: np.ndarray | None  # [C_out]
    stride: int
    pads: tuple[int, int]
    output_padding: int
    group: int


class PolyphaseRule(Rule[Upsampler]):
    pattern = "1-D ConvTranspose"

    def __init__(self, ctx: PassContext, min_stride: int):
        self.ctx, self.min_stride = ctx, min_stride
        self.rewritten: list[dict] = []
        self.placed: set[str] = set()

    def setup(self, view: GraphView) -> None:
        self.rewritten, self.placed = [], set()

    def anchors(self, view: GraphView) -> list[onnx.NodeProto]:
        return [n for n in view.graph.node if n.op_type == "ConvTranspose" and self.ctx.in_scope(n)]

    def match(self, view: GraphView, anchor: onnx.NodeProto) -> Upsampler:
        return match_upsampler(view, anchor)

    def check(self, view: GraphView, match: Upsampler) -> str | None:
        if match.stride < self.min_stride:
            return f"stride {match.stride} is under min_stride {self.min_stride}"
        return None

    def rewrite(self, view: GraphView, match: Upsampler) -> None:
        conv = rewrite_polyphase(view, match, self.placed)
        k = match.weight.shape[2]
        self.rewritten.append({"node": match.node.name, "into": conv.name, "stride": match.stride, "kernel": k,
                               "group": match.group, "phase_kernel": -(-k // match.stride)})


def match_upsampler(view: GraphView, node: onnx.NodeProto) -> Upsampler:
    """The ConvTranspose `node` as an Upsampler, or Mismatch saying what the rewrite does not handle."""
    weight = view.const(node.input[1])
    if weight is None:
        raise Mismatch("its weight is computed in the graph, not a constant")
    if weight.ndim != 3:
        raise Mismatch(f"it is {weight.ndim - 2}-D, not 1-D")
    bias = view.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if len(node.input) > 2 and node.input[2] and bias is None:
        raise Mismatch("its bias is computed in the graph, not a constant")
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise Mismatch(f"auto_pad {auto_pad} (only explicit pads and VALID are rewritten)")
    if attribute(node, "output_shape") is not None:
        raise Mismatch("it sets output_shape (only explicit pads are rewritten)")
    group = attribute(node, "group", 1)
    if weight.shape[0] % group:
        raise Mismatch(f"its weight has {weight.shape[0]} input channels, not a multiple of group {group}")
    (stride,) = attribute(node, "strides", [1])
    (dilation,) = attribute(node, "dilations", [1])
    (output_padding,) = attribute(node, "output_padding", [0])
    pads = (0, 0) if auto_pad == "VALID" else tuple(attribute(node, "pads", [0, 0]))
    if attribute(node, "kernel_shape", [weight.shape[2]]) != [weight.shape[2]]:
        raise Mismatch(f"kernel_shape {attribute(node, 'kernel_shape')} differs from its weight's {weight.shape[2]}")
    if dilation > 1:  # tap k of the kernel sits at k * dilation: the same kernel with zeros between its taps
        dilated = np.zeros((*weight.shape[:2], (weight.shape[2] - 1) * dilation + 1), weight.dtype)
        dilated[:, :, ::dilation] = weight
        weight = dilated
    return Upsampler(node, weight, bias, stride, pads, output_padding, group)


def polyphase_weight(weight: np.ndarray, stride: int, group: int) -> np.ndarray:
    """ConvTranspose weight [C_in, C_out/g, K] -> Conv weight [C_out * s, C_in/g, ceil(K/s)].

    Output channel (c * s + r) is phase r of ConvTranspose channel c: its kernel holds taps r + q s, in
    reverse order (q = Q-1 .. 0), zero where r + q s >= K. A group's channels stay together: c * s + r lies
    in group c // (C_out/g) of the Conv as c does in the ConvTranspose's."""
    c_in, c_out_g, k = weight.shape
    taps = -(-k // stride)
    padded = np.zeros((c_in, c_out_g, taps * stride), weight.dtype)
    padded[:, :, :k] = weight
    phases = padded.reshape(c_in, c_out_g, taps, stride)[:, :, ::-1, :]  # [C_in, C_out/g, q reversed, r]
    grouped = phases.reshape(group, c_in // group, c_out_g, taps, stride)
    return np.ascontiguousarray(grouped.transpose(0, 2, 4, 1, 3)).reshape(group * c_out_g * stride,
                                                                          c_in // group, taps)


def crop(up: Upsampler, taps: int) -> tuple[tuple[int, int], int, int]:
    """(Conv pads, Slice start, samples the Slice drops at the end) for the polyphase form of `up`.

    With Q = `taps`, a Conv padded by Q-1 on both sides yields the ConvTranspose's whole output before any
    cropping, (T + Q - 1) s samples interleaved. A begin pad of whole strides is taken off the Conv's padding
    instead of computed and sliced away; the end pad is what the output needs (output_padding's samples
    are the bias alone, which the zero padding gives too). The Slice then crops what is left, a constant
    from each end, whatever T is."""
    s, k = up.stride, up.weight.shape[2]
    begin, end = up.pads
    skipped = min(taps - 1, begin // s)  # phase steps of the begin pad not computed at all
    last = k + up.output_padding - end  # output samples kept from (T - 1) s on: the last input's reach
    right = max(0, -(-last // s) - 1)
    return (taps - 1 - skipped, right), begin - skipped * s, (right + 1) * s - last


def rewrite_polyphase(view: GraphView, up: Upsampler, placed: set[str]) -> onnx.NodeProto:
    """Replace up.node by Conv -> Reshape -> Transpose -> Reshape -> Slice, named under its name. Returns the Conv."""
    node, s = up.node, up.stride
    base = f"{node.name or 'ConvTranspose'}/polyphase"
    weight = polyphase_weight(up.weight, s, up.group)
    c_out, taps = weight.shape[0] // s, weight.shape[2]
    pads, start, tail = crop(up, taps)

    def const(name: str, value: np.ndarray) -> str:
        tensor = numpy_helper.from_array(value, view.fresh(f"{base}/{name}"))
        view.add_initializer(tensor)
        return tensor.name

    def add(op: str, inputs: list[str], output: str | None = None, **attrs) -> onnx.NodeProto:
        out = output or view.fresh(f"{base}/{op}_output_0")
        new = helper.make_node(op, inputs, [out], name=unused_name(f"{base}/{op}", view.names), **attrs)
        new.metadata_props.extend(p for p in node.metadata_props if p.key == "namespace")  # its block's
        view.names.add(new.name)
        placed.add(new.name)
        view.graph.node.append(new)
        return new

    view.remove([node])  # first: a new node writes its output, and `remove` tells nodes apart by output
    inputs = [node.input[0], const("weight", weight)]
    if up.bias is not None:
        inputs.append(const("bias", np.repeat(up.bias, s)))
    conv = add("Conv", inputs, kernel_shape=[taps], pads=list(pads), strides=[1], dilations=[1], group=up.group)
    split = add("Reshape", [conv.output[0], const("phases_shape", np.array([0, c_out, s, -1], np.int64))])
    interleaved = add("Transpose", [split.output[0]], perm=[0, 1, 3, 2])
    last = node.output[0] if start == 0 and tail == 0 else None  # nothing to crop: the Reshape is the output
    flat = add("Reshape", [interleaved.output[0], const("time_shape", np.array([0, 0, -1], np.int64))], last)
    end = -tail if tail else TO_END
    if last is None and (default_opset(view.model) or SLICE_INPUTS_OPSET) < SLICE_INPUTS_OPSET:
        add("Slice", [flat.output[0]], node.output[0], starts=[start], ends=[end], axes=[2])
    elif last is None:
        add("Slice", [flat.output[0], const("starts", np.array([start], np.int64)),
                      const("ends", np.array([end], np.int64)), const("axes", np.array([2], np.int64))],
            node.output[0])
    return conv


class ConvTransposeToConv(Pass):
    name = "convtranspose_to_conv"
    Params = ConvTransposeToConvParams

    def apply(self, model: onnx.ModelProto, params: ConvTransposeToConvParams, ctx: PassContext) -> PassResult:
        out = copy_model(model)
        rule = PolyphaseRule(ctx, params.min_stride)
        misses = apply_rules(GraphView(out, self.name), [rule])
        if rule.rewritten:
            drop_unused_initializers(out)  # the ConvTransposes' own weights
        else:  # the driver's clean-up would still drop dead nodes, scoped or not: hand back the graph as it was
            out = copy_model(model)
        skipped = [{"node": m.node.name, "reason": m.reason} for m in misses]
        if params.expect_min_nodes is not None and len(rule.rewritten) < params.expect_min_nodes:
            why = "; ".join(str(m) for m in misses[:3]) or "no ConvTranspose in the step's scope"
            raise PipelineError(f"{self.name} on {ctx.graph_name!r}: expected at least {params.expect_min_nodes} "
                                f"rewritten ConvTransposes, got {len(rule.rewritten)} ({why})")
        return PassResult.of(ctx, out, changed=bool(rule.rewritten), placed=rule.placed, stats={
            "rewritten": rule.rewritten, "skipped": skipped,
            "convtranspose_before": op_counts(model).get("ConvTranspose", 0),
            "convtranspose_after": op_counts(out).get("ConvTranspose", 0)})
