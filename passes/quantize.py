"""quantize: INT8 (or INT4 weight-only) through onnxruntime.quantization: dynamic, static (QDQ), or MatMulNBits.

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
as dynamic INT8 and more accurate (ChatTTS layer: 51.5 vs 46.7 dB). `method`
chooses how the weights are rounded:

- `rtn` (default): symmetric round to nearest, one scale per block, no data
  (what ONNX Runtime GenAI's builder does). 8 or 4 bits; the choice at 8 bits,
  where rounding error is already small.
- `hqq`: Half-Quadratic Quantization: per block a float scale and zero point
  fitted to the weight itself (a proximal solver), no data. 4 bits only (its
  float zero points have no CPU kernel at 8 bits), and the CPU computes these
  nodes in fp32 whatever accuracy_level says. 1.5-2.5 dB over `rtn` at 4 bits
  on random Gaussian weights: the 4-bit choice without calibration data. (ORT
  runs its solver on CUDA, in fp16, when torch sees a GPU: other weights.)
- `gptq`: GPTQ: a weight's input rows are rounded one at a time and each
  row's error is pushed onto the rows not yet rounded, weighted by the layer's
  input Hessian (X^T X) captured from the float graph on the calibration
  feeds, so the error goes where the layer's real inputs do not look. 4 bits,
  asymmetric, needs calibration data. Worth it when inputs are correlated, as
  transformer hidden states are: +10 dB over `rtn` on a layer fed rank-16
  inputs (tests/test_quantize_nbits.py); on white inputs there is nothing to
  use, and it only fits the Hessian's sampling noise. ORT 1.32's own GPTQ
  never applies that feedback (it reads the zero triangle of its Cholesky
  factor, so it returns plain asymmetric round to nearest): `_gptq` replaces
  it while the pass runs. ORT then re-rounds the result on a fresh min/max
  grid per block, which gives back 0.5-2 dB of the gain.

MatMulNBits pads a weight whose input dimension K is not a multiple of the
block size, silently, and the kernel only takes power-of-two blocks of at
least 16 (ORT's RTN quantizer at most 256; its GPTQ packs zero points across
rows, so it needs an even number of blocks along K). A block size that breaks
one of these fails the step naming the node and the block sizes that fit.

The scope becomes `nodes_to_quantize`; nodes outside it stay in float.
`expect_min_nodes` declares how many nodes must end up quantized, so a scope or
op list that quietly matches nothing fails loudly instead.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal
from unittest import mock

import numpy as np
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

from pipeline.core.blocks import replaced_name
from pipeline.core.errors import PipelineError, one_line
from pipeline.core.precision import INTEGER_OPS

from pipeline.core.onnx_io import EXTERNAL_MIN_BYTES, HEAVY_BYTES, copy_model, inline_bytes, stage_model

from .base import Params, Pass, PassContext, PassResult, op_counts

from pipeline.core.feeds import Feeds

_CALIBRATION = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile, "distribution": CalibrationMethod.Distribution}
_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}


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
        "minmax", description="`static` only: how activation ranges are set from the calibration data "
                              "(the histogram methods take samples of any shape: sentences of any length).")
    symmetric_activations: bool = Field(False, description="`static` only: symmetric activation ranges "
                                        "(ORT's `ActivationSymmetric`, unless `extra_options` sets it).")
    # Passed through to onnxruntime.quantization (e.g. CalibMovingAverage, QuantizeBias).
    extra_options: dict[str, Any] = Field(default_factory=dict, description="Passed through to "
                                          "onnxruntime.quantization (e.g. `CalibMovingAverage`, `QuantizeBias`).")
    expect_min_nodes: int | None = Field(default=None, ge=0, description="Fail the step when fewer nodes than "
                                         "this end up quantized (a scope or op list that matches nothing).")
    # weight_only (MatMulNBits) only:
    bits: Literal[4, 8] = Field(8, description="`weight_only` only: bits per stored weight (`hqq` and `gptq`: 4).")
    block_size: int = Field(default=128, ge=16, description="`weight_only` only: weights per quantization block "
                            "(one scale each) along the input dimension; a power of two >= 16 that divides the "
                            "input dimension of every MatMul quantized (`rtn`: at most 256).")
    method: Literal["rtn", "hqq", "gptq"] = Field("rtn", description="`weight_only` only: how weights are rounded. "
                                                  "`rtn`: symmetric round to nearest, no data (8 or 4 bits); `hqq`: "
                                                  "Half-Quadratic Quantization, scale and zero point fitted to each "
                                                  "block, no data (4 bits); `gptq`: GPTQ, rounding error pushed "
                                                  "where the calibration inputs do not look (4 bits, needs "
                                                  "calibration data).")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(4, description="`weight_only` only: MatMulNBits' compute "
                                                   "precision (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8; the CPU "
                                                   "computes `hqq`'s nodes in fp32 at any level).")


class _Reader(CalibrationDataReader):
    def __init__(self, feeds: Iterator[Feeds]):
        self._feeds = feeds

    def get_next(self) -> Feeds | None:
        return next(self._feeds, None)


class _OneSample(CalibrationDataReader):
    def __init__(self, feeds: Feeds):
        self._feeds: Feeds | None = feeds

    def get_next(self) -> Feeds | None:
        feeds, self._feeds = self._feeds, None
        return feeds


@contextlib.contextmanager
def _histograms_per_sample():
    """ORT's histogram calibrators (entropy, percentile, distribution) run every sample, then stack all their
    activations into one array per tensor: samples of different shapes (sentences of different lengths) fail, and
    every activation of every sample is held at once. Their collector merges histograms from call to call, so
    collecting one sample a call gives the same histogram from samples of any shape, holding one at a time."""
    from onnxruntime.quantization.calibrate import HistogramCalibrater

    whole = HistogramCalibrater.collect_data

    def per_sample(self, data_reader: CalibrationDataReader) -> None:
        while (feeds := data_reader.get_next()) is not None:
            with contextlib.redirect_stdout(io.StringIO()):  # its "Collecting tensor data ..." print, each call
                whole(self, _OneSample(feeds))

    with mock.patch.object(HistogramCalibrater, "collect_data", per_sample):
        yield


class _ListReader(CalibrationDataReader):
    """Feeds held in a list. ORT's GPTQ deep-copies its reader and iterates the copy: a copy is a new reader
    over the same (read-only) arrays, not a second copy of every feed."""

    def __init__(self, feeds: list[Feeds]):
        self._feeds = feeds
        self._next = 0

    def get_next(self) -> Feeds | None:
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def __len__(self) -> int:
        return len(self._feeds)

    def __deepcopy__(self, memo) -> _ListReader:
        return _ListReader(self._feeds)


class Quantize(Pass):
    name = "quantize"
    Params = QuantizeParams
    changes_precision = True
    # ONNX Runtime's quantizers convert a model below opset 10 to opset 11 (onnx.version_converter) before they
    # write QuantizeLinear/DequantizeLinear or integer ops, and MatMulNBits is a contrib op: every mode works from
    # opset 7 (measured), but for `min_opset_for`'s one exception.
    upgrades_model = True

    def min_opset_for(self, params: QuantizeParams) -> int:
        # Per-channel QDQ writes DequantizeLinear with an `axis`, which opset 13 brought (measured: invalid at 12).
        if params.mode == "static" and params.format == "qdq" and params.per_channel:
            return 13
        return self.min_opset

    def needs_calibration_for(self, params: QuantizeParams) -> bool:
        return params.mode == "static" or (params.mode == "weight_only" and params.method == "gptq")

    def large_model_problem(self, params: QuantizeParams) -> str | None:
        if params.mode == "weight_only" and params.method == "gptq":
            return ("quantize method 'gptq' runs ONNX Runtime's GPTQ, which holds the model in memory; use method "
                    "'rtn' or 'hqq' on a model this large")
        return None  # ORT's quantizers run on the light model (passes.ort_light)

    def apply(self, model: onnx.ModelProto, params: QuantizeParams, ctx: PassContext) -> PassResult:
        nodes = sorted(ctx.selected) if ctx.selected is not None else None
        if nodes is not None and not nodes:
            raise PipelineError(f"quantize on {ctx.graph_name!r}: the scope selects no node")
        if params.method != "rtn" and params.mode != "weight_only":
            raise PipelineError(f"quantize method {params.method!r} is for mode 'weight_only' (MatMulNBits), "
                                f"not {params.mode!r}")
        if params.mode == "weight_only":
            _check_weight_only(model, params, ctx)
        out_path = ctx.workdir / f"{ctx.graph_name}.quantized.onnx"
        common: dict[str, Any] = dict(op_types_to_quantize=params.op_types, per_channel=params.per_channel,
                                      reduce_range=params.reduce_range, weight_type=_TYPES[params.weight_type],
                                      nodes_to_quantize=nodes)
        extra = dict(params.extra_options)
        # ORT's quantizer logs advice through the root logger; our log says what matters.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        large = ctx.weights_dir is not None  # a light model: ORT reads its weights from their files (ort_light)
        staged = (not large and params.mode != "weight_only"
                  and inline_bytes(model, EXTERNAL_MIN_BYTES) >= HEAVY_BYTES)  # see `_source`
        try:
            with _source(model, ctx, staged) as source:
                if params.mode == "weight_only":
                    _weight_only(onnx.load(source, load_external_data=False) if large else source, out_path,
                                 params, nodes, ctx)
                elif params.mode == "dynamic":
                    quantize_dynamic(source, out_path, extra_options=extra, **common)
                else:
                    if ctx.calibration is None:
                        raise PipelineError("quantize mode 'static' needs calibration data (recipe 'calibration')")
                    extra.setdefault("ActivationSymmetric", params.symmetric_activations)
                    with _histograms_per_sample():
                        quantize_static(source, out_path, _Reader(ctx.calibration()),
                                        quant_format=QuantFormat.QDQ if params.format == "qdq"
                                        else QuantFormat.QOperator,
                                        activation_type=_TYPES[params.activation_type],
                                        calibrate_method=_CALIBRATION[params.calibration_method],
                                        extra_options=extra, **common)
            # A large result keeps pointing at the weights it did not change, in their files (ctx.weights_dir).
            quantized = onnx.load(str(out_path), load_external_data=not large)
        except PipelineError:
            raise
        except Exception as e:
            raise PipelineError(f"quantize ({params.mode}) failed on {ctx.graph_name!r}: "
                                f"{one_line(e, 400)}") from None
        finally:
            root.setLevel(level)
            if out_path.exists():
                os.unlink(out_path)
        already = {n.name for n in model.graph.node if n.op_type in INTEGER_OPS}  # an earlier step's
        per_block = _quantized_per_block(quantized, ctx, params.op_types, already)
        count = sum(per_block.values())
        if params.expect_min_nodes is not None and count < params.expect_min_nodes:
            raise PipelineError(f"quantize on {ctx.graph_name!r}: expected at least {params.expect_min_nodes} "
                                f"quantized nodes, got {count} (op_types {params.op_types or 'all'}, "
                                f"scope of {len(nodes) if nodes is not None else 'all'} nodes)")
        ops = op_counts(quantized)
        stats = {"mode": params.mode, "nodes_quantized": count, "quantized_per_block": per_block,
                 "blocks_changed": dict(per_block),
                 "quantize_linear": ops.get("QuantizeLinear", 0), "dequantize_linear": ops.get("DequantizeLinear", 0),
                 "weights_staged": staged}
        if params.mode == "weight_only":
            stats.update(method=params.method, bits=params.bits, block_size=params.block_size,
                         accuracy_level=params.accuracy_level)
        return PassResult.of(ctx, quantized, changed=count > 0, stats=stats)


@contextlib.contextmanager
def _source(model: onnx.ModelProto, ctx: PassContext, staged: bool):
    """What ORT's quantizer is given: a copy of the model (ORT may re-save the proto it gets with external data, in
    place, leaving it pointing at a deleted temp file), or for a light model, the light proto's file in the scratch
    folder, with ORT patched to read the weights from their files in ctx.weights_dir (`passes.ort_light`).

    `staged`, for a model held in memory with HEAVY_BYTES of weights or more: it is made light first, its weights
    written once to a data file in the scratch folder, beside the proto's file and the quantizer's output, which
    then reads the weights it did not change from there. ORT's dynamic and static quantizers hold the model 3-4 times over (copies
    for shape inference and calibration, a session): on the float Kokoro (325 MB) static QDQ peaked 3.0 GB over
    its input, over the bound of 4x the file + 1 GB."""
    from .ort_light import light_quantizers

    if ctx.weights_dir is not None:
        path = ctx.workdir / f"{ctx.graph_name}.input.onnx"
        onnx.save(model, str(path))  # the proto alone (megabytes): its external tensors hold no bytes to move
        with light_quantizers(ctx.weights_dir):
            yield str(path)
    elif staged:
        path = stage_model(model, None, ctx.workdir, f"{ctx.graph_name}.input.onnx", every_weight=True)
        with light_quantizers(ctx.workdir):
            yield str(path)
    else:
        yield copy_model(model)


def _check_weight_only(model: onnx.ModelProto, params: QuantizeParams, ctx: PassContext) -> None:
    """What MatMulNBits and ORT's quantizers would get wrong or fail on obscurely, as one line each."""
    method, block = params.method, params.block_size
    if method != "rtn" and params.bits != 4:
        why = ("its float zero points have no CPU kernel at 8 bits" if method == "hqq"
               else "ORT's GPTQ writes MatMulNBits only at 4 bits")
        raise PipelineError(f"quantize method {method!r} stores 4-bit weights only ({why}): set bits: 4, or use "
                            f"method 'rtn' for 8 bits")
    if method != "rtn" and params.op_types not in (None, ["MatMul"]):
        raise PipelineError(f"quantize method {method!r} quantizes MatMul weights only, not op_types "
                            f"{params.op_types}")
    if block & (block - 1):
        raise PipelineError(f"quantize: block_size {block} is not a power of two >= 16 (MatMulNBits' rule)")
    if method == "rtn" and block > 256:
        raise PipelineError(f"quantize: block_size {block} is over 256, the largest ORT's round-to-nearest "
                            f"quantizer takes (hqq and gptq take larger ones)")
    if method == "gptq" and ctx.calibration is None:
        raise PipelineError("quantize method 'gptq' needs calibration data (recipe 'calibration'): GPTQ fits each "
                            "weight to the layer's captured inputs")
    for node, k in _nbits_matmuls(model, params, ctx):
        if k % block or (method == "gptq" and (k // block) % 2):
            fits = [b for b in (2 ** e for e in range(4, k.bit_length())) if _block_fits(k, b, method)]
            why = (f"gives {k // block} blocks, and ORT's GPTQ packs 4-bit zero points across rows, so it needs an "
                   f"even count" if k % block == 0 else "does not divide it (MatMulNBits would pad it silently)")
            hint = (f"block sizes that fit: {', '.join(map(str, fits))}" if fits
                    else "no block size fits: keep this node out of the scope")
            raise PipelineError(f"quantize ({method}) on {ctx.graph_name!r}: {node.op_type} {node.name!r} has input "
                                f"dimension K={k}; block_size {block} {why}; {hint}")


def _block_fits(k: int, block: int, method: str) -> bool:
    return k % block == 0 and (method != "rtn" or block <= 256) and (method != "gptq" or (k // block) % 2 == 0)


def _nbits_matmuls(model: onnx.ModelProto, params: QuantizeParams, ctx: PassContext):
    """(node, K) of each MatMul the step would hand to MatMulNBits: in scope, weight a constant initializer of
    2 dimensions (or more, all leading ones 1), as ORT's quantizers require. Subgraphs only without a scope
    (a scope names nodes of the main graph), and never for GPTQ, which looks at the main graph only."""
    if "MatMul" not in (params.op_types or ["MatMul"]):
        return

    def walk(graph: onnx.GraphProto, weights: dict[str, onnx.TensorProto], main: bool):
        weights = {**weights, **{t.name: t for t in graph.initializer}}
        for node in graph.node:
            if node.op_type == "MatMul" and (ctx.in_scope(node) if main else ctx.selected is None):
                w = weights.get(node.input[1]) if len(node.input) > 1 else None
                if w is not None and len(w.dims) >= 2 and all(d == 1 for d in w.dims[:-2]) and \
                        (params.method != "gptq" or len(w.dims) == 2):
                    yield node, int(w.dims[-2])
            if params.method != "gptq":
                for attr in node.attribute:
                    for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                        yield from walk(sub, weights, False)

    yield from walk(model.graph, {}, True)


def _all_node_names(graph: onnx.GraphProto) -> list[str]:
    names = []
    for node in graph.node:
        names.append(node.name)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                names.extend(_all_node_names(sub))
    return names


def _weight_only(model: onnx.ModelProto, out_path, params: QuantizeParams, nodes: list[str] | None,
                 ctx: PassContext) -> None:
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    op_types = tuple(params.op_types or ["MatMul"])
    # ORT quantizes a node that is included *or* of a listed op type: the scope must also exclude the rest,
    # subgraph nodes included (the scope names main-graph nodes). Only nodes of those op types are included:
    # ORT hands any included node to its quantizer (RTN logs an error for a Relu, HQQ fails on it).
    inside = None if nodes is None else set(nodes)
    include = None if inside is None else [n.name for n in model.graph.node if n.name in inside
                                           and n.op_type in op_types]
    outside = None if inside is None else [n for n in _all_node_names(model.graph) if n not in inside]
    if params.method == "rtn":
        config = nbits.DefaultWeightOnlyQuantConfig(block_size=params.block_size, is_symmetric=True,
                                                    accuracy_level=params.accuracy_level, bits=params.bits,
                                                    op_types_to_quantize=op_types)
        quantizer = nbits.MatMulNBitsQuantizer(model, nodes_to_include=include, nodes_to_exclude=outside,
                                               algo_config=config)
        quantizer.process()
    elif params.method == "hqq":
        config = nbits.HQQWeightOnlyQuantConfig(block_size=params.block_size, bits=params.bits,
                                                op_types_to_quantize=op_types)
        quantizer = nbits.MatMulNBitsQuantizer(model, nodes_to_include=include, nodes_to_exclude=outside,
                                               algo_config=config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.from_numpy on ORT's read-only weight arrays
            quantizer.process()
        # ORT's HQQ writes no accuracy_level; the attribute is the node's, whichever rounding made its weights.
        if params.accuracy_level:
            for node in quantizer.model.model.graph.node:
                if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                    node.attribute.append(onnx.helper.make_attribute("accuracy_level", params.accuracy_level))
    else:
        quantizer = _gptq_quantizer(nbits, model, params, inside, ctx)
        with mock.patch.object(_weight_only_module(), "gptq", _gptq), contextlib.redirect_stdout(io.StringIO()):
            quantizer.process()  # (ORT prints a progress bar on stdout)
        opsets = quantizer.model.model.opset_import
        if not any(o.domain == "com.microsoft" for o in opsets):  # ORT's GPTQ leaves the contrib domain out
            opsets.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(quantizer.model.model, str(out_path))


def _weight_only_module():
    from onnxruntime.quantization.neural_compressor import weight_only

    return weight_only


def _gptq_quantizer(nbits, model: onnx.ModelProto, params: QuantizeParams, inside: set[str] | None,
                    ctx: PassContext):
    """ORT's GPTQ path, fed the step's calibration feeds and held to its scope."""

    class Scoped(nbits.MatMulNBitsQuantizer):
        def _generate_q4_node_config(self):
            # ORT's GPTQ ignores nodes_to_include/exclude (and op types): it quantizes every MatMul with a constant
            # weight unless its entry in this config is "fp32".
            config = super()._generate_q4_node_config()
            if inside is not None:
                config.update({n.name: "fp32" for n in self.model.model.graph.node
                               if n.op_type == "MatMul" and n.name not in inside})
            return config

    # GPTQ's own block_size is how many input rows it rounds before it applies their error to the rest in one
    # product: speed only, as long as a quantization block (the quantizer's block_size) never straddles two.
    feeds = list(ctx.calibration())
    if not feeds:  # (every Hessian would be 0, and GPTQ zeroes the weights of inputs it never saw)
        raise PipelineError(f"quantize method 'gptq' on {ctx.graph_name!r}: the calibration data gave no feeds")
    config = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=_ListReader(feeds),
                                             block_size=max(128, params.block_size))
    return Scoped(model, bits=4, block_size=params.block_size, is_symmetric=False,
                  accuracy_level=params.accuracy_level, algo_config=config)


def _gptq(W, H, num_bits=4, group_size=32, scheme="asym", blocksize=128, percdamp=0.01, actorder=False,
          mse=False, perchannel=True):
    """GPTQ as ORT's `gptq_quantize` calls it: weight W [K, N], Hessian H [K, K] of the layer's inputs; returns W
    rounded onto its grid, which ORT then packs into MatMulNBits.

    Stands in for ORT 1.32's `weight_only.gptq`, which has no effect: it takes the upper Cholesky factor U of
    H^-1 and reads U[i:, i] and U[i2:, i1:i2], its zero triangle, for the error feedback, so it returns plain
    asymmetric round to nearest (tests pin this). With weights laid out [K, N] the feedback of row i onto a later
    row j is U[i, j] = L[j, i] for the lower factor L: the same algorithm read the right way round. Row by
    row: round to the grid, then subtract the rounding error, scaled by L[j, i] / L[i, i], from every row j not
    yet rounded (rows past the current `blocksize` rows get theirs in one product at its end). Each group's
    grid is ORT's (min and max with 0 inside, per output column), set from the group's rows as they are when the
    group starts, their error feedback included.
    """
    if actorder or mse or not perchannel:
        raise NotImplementedError("the quantize pass's GPTQ does not use actorder, mse or perchannel=False")
    dtype = W.dtype
    maxq = 2 ** num_bits - 1
    W = np.array(W, dtype=np.float64)
    H = np.array(H, dtype=np.float64)
    k = W.shape[0]
    dead = np.diag(H) == 0  # inputs that are always 0: their weights do not matter
    H[dead, dead] = 1
    W[dead, :] = 0
    H[np.diag_indices(k)] += percdamp * np.mean(np.diag(H))
    L = np.linalg.cholesky(np.linalg.inv(H))
    Q = np.zeros_like(W)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        err = np.zeros((i2 - i1, W.shape[1]))
        for r in range(i1, i2):
            if r % group_size == 0:
                scale, zero = _gptq_grid(W[r:r + group_size], maxq, scheme)
            Q[r] = scale * (np.clip(np.round(W[r] / scale) + zero, 0, maxq) - zero)
            err[r - i1] = (W[r] - Q[r]) / L[r, r]
            W[r + 1:i2] -= np.outer(L[r + 1:i2, r], err[r - i1])
        W[i2:] -= L[i2:, i1:i2] @ err
    return Q.astype(dtype)


def _gptq_grid(rows: np.ndarray, maxq: int, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per column of a group of rows, as ORT's GPTQ sets them (its `find_params`)."""
    lo = np.minimum(rows.min(axis=0), 0)
    hi = np.maximum(rows.max(axis=0), 0)
    if scheme == "sym":
        hi = np.maximum(-lo, hi)
        lo = np.where(lo < 0, -hi, lo)
    flat = (lo == 0) & (hi == 0)
    lo[flat], hi[flat] = -1, 1
    scale = (hi - lo) / maxq
    zero = np.full_like(scale, (maxq + 1) / 2) if scheme == "sym" else np.round(-lo / scale)
    return scale, zero


def _count(model: onnx.ModelProto, op: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op)


def _quantized_per_block(model: onnx.ModelProto, ctx: PassContext, op_types: list[str] | None,
                         already: set[str]) -> dict[str, int]:
    """Original nodes that now compute on INT8 data, by block of the input graph (not those `already` integer).

    In QDQ form a node (of the requested op types) is quantized when one of its
    inputs comes out of a DequantizeLinear; in operator form it became an integer op.
    """
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    counts: Counter[str] = Counter()
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        qdq = any(i in dq_outputs for i in node.input) and (op_types is None or node.op_type in op_types)
        if (node.op_type in INTEGER_OPS or qdq) and node.name not in already:
            name = replaced_name(node.name)
            counts[ctx.blocks.node_block.get(name, "(new)")] += 1
    return dict(counts)
