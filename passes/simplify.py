"""simplify: constant folding and graph cleanup with onnxsim.

Folds shape arithmetic and constants (the Piper voice goes from 2,755 to about
2,613 nodes with the same output), which gives later passes fewer, cleaner
patterns to match. It rewrites the whole graph, so it takes no block scope.
Node names of surviving nodes are kept, so block scopes still resolve after it.
"""
from __future__ import annotations

from typing import Literal

import onnx
from pydantic import Field

from pipeline.errors import PipelineError

from .base import Params, Pass, PassContext, PassResult


class SimplifyParams(Params):
    on_error: Literal["error", "skip"] = Field(
        "error", description="When onnxsim fails: `error` stops the run, `skip` logs it and keeps the graph as it was.")
    # onnxsim's own check runs the model on random inputs; random phoneme ids
    # can index past an embedding, so it is off unless asked for.
    check_n: int = Field(0, description="Random-input runs onnxsim compares before/after (0: none; random token or "
                                        "phoneme ids can index past an embedding).")
    skip_fuse_bn: bool = Field(False, description="Do not fuse BatchNormalization into the Conv before it.")
    skip_constant_folding: bool = Field(False, description="Do not fold constant subgraphs (cleanup only).")


class Simplify(Pass):
    name = "simplify"
    Params = SimplifyParams
    scoped = False

    def apply(self, model: onnx.ModelProto, params: SimplifyParams, ctx: PassContext) -> PassResult:
        # Imported here: onnxsim pulls in torch when it is installed, seconds a cached run need not pay.
        from onnxsim import simplify as onnxsim_simplify

        before = len(model.graph.node)
        try:
            simplified, ok = onnxsim_simplify(
                model, check_n=params.check_n, skip_fuse_bn=params.skip_fuse_bn,
                skip_constant_folding=params.skip_constant_folding)
            if not ok:
                raise RuntimeError("onnxsim's output check found a mismatch")
        except Exception as e:  # onnxsim raises plain RuntimeErrors from C++
            if params.on_error == "skip":
                ctx.log(f"simplify skipped on {ctx.graph_name}: {e}")
                return PassResult(model, changed=False, stats={"skipped": " ".join(str(e).split())[:300]})
            raise PipelineError(f"simplify failed on graph {ctx.graph_name!r}: {' '.join(str(e).split())[:400]} "
                                f"(set on_error: skip to go on without it)") from None
        after = len(simplified.graph.node)
        return PassResult(simplified, changed=after != before,
                          stats={"nodes_before": before, "nodes_after": after})
