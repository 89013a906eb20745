"""quantize: INT8 through onnxruntime.quantization: dynamic, static (QDQ), or weight-only MatMulNBits.

`dynamic` quantizes weights ahead of time and activations at run time
(MatMulInteger/ConvInteger). It needs no data but ConvInteger has no fast CPU
kernel: on a Conv-heavy TTS model it is several times slower than FP32.
`static` inserts QuantizeLinear/DequantizeLinear pairs with activation ranges
measured on the recipe's calibration data; ORT then runs integer kernels,
which is where the speed comes from, and where the error comes from too, so
the scope decides which blocks pay it.

`weight_only` stores MatMul weights block-wise in `bits` (8 or 4) for ONNX
Runtime's MatMulNBits kernel, activations staying float (accuracy_level 4
computes in int8 on CPU): for memory-bound transformer decoding it is as fast
as dynamic INT8 and more accurate (ChatTTS layer: 51.5 vs 46.7 dB).

The scope becomes `nodes_to_quantize`; nodes outside it stay in float.
`expect_min_nodes` declares how many nodes must end up quantized, so a scope or
op list that quietly matches nothing fails loudly instead.
"""
from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from pydantic import Field

from pipeline.errors import PipelineError

from .base import Feeds, Params, Pass, PassContext, PassResult, copy_model

_CALIBRATION = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile, "distribution": CalibrationMethod.Distribution}
_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
# Ops that compute on INT8 (or fewer-bit) data: a node counts as quantized when it became one.
INTEGER_OPS = {"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul",
                "MatMulIntegerToFloat", "QAttention", "QGemm", "MatMulNBits"}


class QuantizeParams(Params):
    mode: Literal["dynamic", "static", "weight_only"] = Field(
        description="`dynamic`: weights ahead of time, activations at run time; `static`: QDQ with activation "
                    "ranges from the calibration data (needs it); `weight_only`: MatMul weights for MatMulNBits.")
    format: Literal["qdq", "qoperator"] = Field("qdq", description="`static` only: QuantizeLinear/DequantizeLinear "
                                                "pairs (`qdq`) or integer operators such as QLinearConv (`qoperator`).")
    op_types: list[str] | None = Field(None, description="Op types to quantize; default: every op ONNX Runtime "
                                       "can quantize (`weight_only`: MatMul).")
    per_channel: bool = Field(True, description="One weight scale per output channel instead of one per tensor.")
    reduce_range: bool = Field(False, description="Quantize weights to 7 bits (for CPUs without VNNI, "
                               "where 8-bit products can saturate).")
    weight_type: Literal["int8", "uint8"] = Field("int8", description="Integer type of quantized weights.")
    activation_type: Literal["int8", "uint8"] = Field("uint8", description="`static` only: integer type of "
                                                      "quantized activations.")
    calibration_method: Literal["minmax", "entropy", "percentile", "distribution"] = Field(
        "minmax", description="`static` only: how activation ranges are set from the calibration data; all but "
                              "`minmax` need calibration samples of one shape.")
    symmetric_activations: bool = Field(False, description="`static` only: symmetric activation ranges "
                                        "(ORT's `ActivationSymmetric`, unless `extra_options` sets it).")
    # Passed through to onnxruntime.quantization (e.g. CalibMovingAverage, QuantizeBias).
    extra_options: dict[str, Any] = Field(default_factory=dict, description="Passed through to "
                                          "onnxruntime.quantization (e.g. `CalibMovingAverage`, `QuantizeBias`).")
    expect_min_nodes: int | None = Field(default=None, ge=0, description="Fail the step when fewer nodes than "
                                         "this end up quantized (a scope or op list that matches nothing).")
    # weight_only (MatMulNBits) only:
    bits: Literal[4, 8] = Field(8, description="`weight_only` only: bits per stored weight.")
    block_size: int = Field(default=128, ge=16, description="`weight_only` only: weights per quantization block "
                            "(one scale each) along the input dimension.")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(4, description="`weight_only` only: MatMulNBits' compute "
                                                   "precision (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8).")


class _Reader(CalibrationDataReader):
    def __init__(self, feeds: Iterator[Feeds]):
        self._feeds = feeds

    def get_next(self) -> Feeds | None:
        return next(self._feeds, None)


class Quantize(Pass):
    name = "quantize"
    Params = QuantizeParams
    changes_precision = True

    def needs_calibration_for(self, params: QuantizeParams) -> bool:
        return params.mode == "static"

    def apply(self, model: onnx.ModelProto, params: QuantizeParams, ctx: PassContext) -> PassResult:
        nodes = sorted(ctx.selected) if ctx.selected is not None else None
        if nodes is not None and not nodes:
            raise PipelineError(f"quantize on {ctx.graph_name!r}: the scope selects no node")
        out_path = ctx.workdir / f"{ctx.graph_name}.quantized.onnx"
        common: dict[str, Any] = dict(op_types_to_quantize=params.op_types, per_channel=params.per_channel,
                                      reduce_range=params.reduce_range, weight_type=_TYPES[params.weight_type],
                                      nodes_to_quantize=nodes)
        extra = dict(params.extra_options)
        # ORT's quantizer logs advice through the root logger; our log says what matters.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        # ORT's quantizers may re-save the proto they are given with external data, in place, leaving it
        # pointing at a deleted temp file: they get a copy, and `model` stays usable.
        source = copy_model(model)
        try:
            if params.mode == "weight_only":
                _weight_only(source, out_path, params, nodes)
            elif params.mode == "dynamic":
                quantize_dynamic(source, out_path, extra_options=extra, **common)
            else:
                if ctx.calibration is None:
                    raise PipelineError("quantize mode 'static' needs calibration data (recipe 'calibration')")
                extra.setdefault("ActivationSymmetric", params.symmetric_activations)
                quantize_static(source, out_path, _Reader(ctx.calibration()),
                                quant_format=QuantFormat.QDQ if params.format == "qdq" else QuantFormat.QOperator,
                                activation_type=_TYPES[params.activation_type],
                                calibrate_method=_CALIBRATION[params.calibration_method],
                                extra_options=extra, **common)
            quantized = onnx.load(str(out_path))
        except PipelineError:
            raise
        except Exception as e:
            hint = ""
            if "inhomogeneous" in str(e) and params.calibration_method != "minmax":
                # ORT's histogram calibrators stack samples, so they need one shape for all.
                hint = (f" (calibration_method {params.calibration_method!r} needs calibration samples of one "
                        f"shape; use 'minmax' for variable-length inputs such as sentences)")
            raise PipelineError(f"quantize ({params.mode}) failed on {ctx.graph_name!r}: "
                                f"{' '.join(str(e).split())[:400]}{hint}") from None
        finally:
            root.setLevel(level)
            if out_path.exists():
                os.unlink(out_path)
        per_block = _quantized_per_block(quantized, ctx, params.op_types)
        count = sum(per_block.values())
        if params.expect_min_nodes is not None and count < params.expect_min_nodes:
            raise PipelineError(f"quantize on {ctx.graph_name!r}: expected at least {params.expect_min_nodes} "
                                f"quantized nodes, got {count} (op_types {params.op_types or 'all'}, "
                                f"scope of {len(nodes) if nodes is not None else 'all'} nodes)")
        stats = {"mode": params.mode, "nodes_quantized": count, "quantized_per_block": per_block,
                 "blocks_changed": dict(per_block),
                 "quantize_linear": _count(quantized, "QuantizeLinear"),
                 "dequantize_linear": _count(quantized, "DequantizeLinear")}
        return PassResult(quantized, changed=count > 0, stats=stats)


def _weight_only(model: onnx.ModelProto, out_path, params: QuantizeParams, nodes: list[str] | None) -> None:
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=params.block_size, is_symmetric=True,
                                                accuracy_level=params.accuracy_level, bits=params.bits,
                                                op_types_to_quantize=tuple(params.op_types or ["MatMul"]))
    # ORT quantizes a node that is included *or* of a listed op type: the scope must also exclude the rest.
    inside = None if nodes is None else set(nodes)
    outside = None if inside is None else [n.name for n in model.graph.node if n.name not in inside]
    quantizer = nbits.MatMulNBitsQuantizer(model, nodes_to_include=nodes, nodes_to_exclude=outside,
                                           algo_config=config)
    quantizer.process()
    onnx.save(quantizer.model.model, str(out_path))


def _count(model: onnx.ModelProto, op: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op)


def _quantized_per_block(model: onnx.ModelProto, ctx: PassContext, op_types: list[str] | None) -> dict[str, int]:
    """Original nodes that now compute on INT8 data, by block of the input graph.

    In QDQ form a node (of the requested op types) is quantized when one of its
    inputs comes out of a DequantizeLinear; in operator form it became an integer op.
    """
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    counts: Counter[str] = Counter()
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        qdq = any(i in dq_outputs for i in node.input) and (op_types is None or node.op_type in op_types)
        if node.op_type in INTEGER_OPS or qdq:
            name = re.sub(r"_(quant|QuantizeLinear|Q\d)$", "", node.name)
            counts[ctx.blocks.node_block.get(name, "(new)")] += 1
    return dict(counts)
