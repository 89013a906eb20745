"""pin: turn intermediate tensors into graph inputs.

Quantizing a Piper voice's duration predictor changes how many frames each
phoneme gets, so the candidate's audio is longer or shorter than the FP32 one
and cannot be compared sample by sample. Pinning the durations (the tensor
after `/Ceil`) makes the candidate take them as an input: fed the FP32 values
(`pipeline.evaluation.pinning.run_pinned`), it speaks with the FP32 timing.
"""
from __future__ import annotations

import onnx
from pydantic import Field

from pipeline.core.graph import pin

from .base import Params, Pass, PassContext, PassResult


class PinParams(Params):
    # Intermediate tensor names, e.g. ["/Ceil_output_0"] for a Piper voice's durations.
    tensors: list[str] = Field(min_length=1, description="Intermediate tensors to make graph inputs, in this order "
                                                         "(e.g. `/Ceil_output_0`, a Piper voice's durations).")


class Pin(Pass):
    """Turn intermediate tensors into graph inputs (e.g. a Piper voice's durations, `/Ceil_output_0`).

    Each pinned tensor becomes a new input after the original ones, with its
    type and shape; nodes that only computed it are dropped. Audio comparisons
    feed the FP32 values, so a candidate whose duration predictor drifted still
    has the reference's length.
    """

    name = "pin"
    Params = PinParams
    scoped = False

    def apply(self, model: onnx.ModelProto, params: PinParams, ctx: PassContext) -> PassResult:
        pinned = pin(model, params.tensors, what=f"pin on graph {ctx.graph_name!r}")
        dropped = len(model.graph.node) - len(pinned.graph.node)
        return PassResult.of(ctx, pinned, changed=True, stats={"pinned": list(params.tensors), "nodes_dropped": dropped})
