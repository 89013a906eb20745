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

from pipeline.core.errors import PipelineError, one_line

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
    # Measured: onnxsim takes IR 3 models at opsets 7 to 21 and writes IR 4, weights no longer graph inputs.
    takes_weights_as_inputs = True
    upgrades_model = True

    def large_model_problem(self, params: SimplifyParams) -> str | None:
        if params.check_n:
            return ("simplify's check_n runs onnxsim's check on the whole model in memory; set check_n: 0 (the "
                    "step's result is still loaded in ONNX Runtime, and the check compares it)")
        return None  # onnxsim simplifies it file to file, weights in external data

    def apply(self, model: onnx.ModelProto, params: SimplifyParams, ctx: PassContext) -> PassResult:
        # Imported here: onnxsim pulls in torch when it is installed, seconds a cached run need not pay.
        from onnxsim import simplify as onnxsim_simplify

        before = len(model.graph.node)
        source, out, extra = model, None, {}
        if ctx.weights_dir is not None:
            # A light model (over 2 GB with its weights) cannot cross into onnxsim as one proto: onnxsim reads
            # it from a file and writes its result to one, weights in external data (its C++ path route).
            from pipeline.core.onnx_io import stage_model

            source = str(stage_model(model, ctx.weights_dir, ctx.workdir, f"{ctx.graph_name}.input.onnx"))
            out = ctx.workdir / f"{ctx.graph_name}.simplified.onnx"
            extra = {"output_path": str(out)}
        try:
            simplified, ok = onnxsim_simplify(
                source, check_n=params.check_n, skip_fuse_bn=params.skip_fuse_bn,
                skip_constant_folding=params.skip_constant_folding, **extra)
            if not ok:
                raise RuntimeError("onnxsim's output check found a mismatch")
        except Exception as e:  # onnxsim raises plain RuntimeErrors from C++
            if params.on_error == "skip":
                ctx.log(f"simplify skipped on {ctx.graph_name}: {e}")
                return PassResult.of(ctx, model, changed=False, stats={"skipped": one_line(e)})
            raise PipelineError(f"simplify failed on graph {ctx.graph_name!r}: {one_line(e, 400)} "
                                f"(set on_error: skip to go on without it)") from None
        after = len(simplified.graph.node)
        stats = {"nodes_before": before, "nodes_after": after, **({"via": "files (model over 2 GB)"} if out else {})}
        # A large result is light: its weights lie in onnxsim's external-data file, in the scratch folder.
        return PassResult.of(ctx, simplified, changed=after != before, stats=stats, weights_dir=out.parent if out else None)
