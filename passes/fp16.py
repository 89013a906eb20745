"""fp16: convert float tensors and weights to FP16 with onnxconverter-common.

Halves the file. On ONNX Runtime's CPU provider most ops have no FP16 kernel,
so ORT casts back to FP32 at load: the saving is download and disk, not speed
or RAM; on GPUs FP16 also runs faster.

The converter alone produces models ORT refuses to load, so this pass adds
what it misses, by itself:
- ops that cannot be FP16 stay FP32: the converter's default block list plus
  `RandomNormalLike` (its `dtype` attribute stays float) and `Range`;
- an existing `Cast(to=FLOAT)` whose output the converter re-typed as FP16 is
  made to cast to FP16 (the Piper voice's `/enc_p/Cast_1` type clash);
- Casts to the type their input already has are dropped first (the
  converter's cast cleanup crashes on chains of them);
- an initializer shared by a kept-FP32 node and a converted node is split, so
  neither sees the other's type;
- the converter wraps every kept node in its own Cast pair, so a tensor
  flowing between two kept nodes still rounds through FP16; those round trips
  are removed, so a kept region really computes in FP32;
- with calibration data, tensors whose magnitude comes near the FP16 limit
  (`overflow_threshold`) are found on real inputs and their producers kept FP32;
- quantized ops (an INT8 model: DynamicQuantizeLinear, MatMulInteger, ConvInteger,
  QuantizeLinear/DequantizeLinear, QLinear*, com.microsoft's DynamicQuantizeLSTM...)
  have no FP16 form, so they stay FP32 with their float arithmetic: the Cast of an
  integer accumulator to float (values far past 65504) and the Muls that rescale it
  and multiply the scales (scales near 1e-5 are FP16 subnormals); a QDQ group
  (DequantizeLinear -> op -> QuantizeLinear), which ORT runs as one integer kernel,
  stays whole. The float tensors around them get Casts;
- a weight or constant FP16 cannot hold (beyond `max_finite_val`) is never clipped:
  the nodes that read it stay FP32, and the stats name it.

The guard reads one number per tensor (its largest finite magnitude, reduced inside
the graph), never the activations themselves: exposing every intermediate as an
output held them all at once, 9.1 GB on the 92 MB Kokoro INT8 model.

Nodes outside the step's scope stay FP32 too (a VITS duration predictor in
FP16 flips `Ceil` on durations near an integer and shifts the audio).
"""
from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxconverter_common import float16
from pydantic import Field

from pipeline.core.errors import PipelineError, one_line
from pipeline.core.graph import attribute, cleanup, consumers, producers, unused_name, with_outputs
from pipeline.core.onnx_io import (HEAVY_BYTES, copy_model, external_bytes, infer_value_info, session, tensor_array,
                                   tensor_types)

from .base import Params, Pass, PassContext, PassResult

ALWAYS_FP32_OPS = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | {"RandomNormalLike", "RandomNormal", "RandomUniform"})
FP16_MAX = 65504.0
# Quantized ops that no pattern below names (contrib ops of ONNX Runtime holding quantized weights).
QUANTIZED_OPS = {"QGemm", "QAttention", "QEmbedLayerNormalization", "MatMulNBits", "MatMulBnb4", "MatMulFpQ4", "QMoE"}
INTEGER_TYPES = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32,
                 TensorProto.UINT32, TensorProto.INT64, TensorProto.UINT64, TensorProto.INT4, TensorProto.UINT4}
# Tensors of unclear peak (an inf or NaN among their values) the guard reads whole, this many per session run.
EXPOSED_PER_RUN = 16


class Fp16Params(Params):
    keep_io_types: bool = Field(True, description="Keep the graph's inputs and outputs FP32 (Casts at the edges).")
    op_block_list: list[str] = Field(default_factory=list, description="Extra op types to keep FP32, besides "
                                     "those that cannot be FP16 (`Range`, `RandomNormalLike`, the converter's list).")
    node_block_list: list[str] = Field(default_factory=list, description="Extra node names to keep FP32 "
                                       "(each must name a node of the graph).")
    overflow_guard: bool = Field(True, description="Keep FP32 the nodes whose outputs reach `overflow_threshold` on "
                                 "the recipe's calibration data; skipped (and logged) without calibration data.")
    overflow_threshold: float = Field(default=FP16_MAX / 4, gt=0, description="Magnitude at which the overflow "
                                      "guard keeps a node FP32 (FP16's largest finite value is 65504).")
    min_positive_val: float = Field(1e-7, description="Weights smaller in magnitude are clamped to this "
                                    "(the converter's `min_positive_val`).")
    max_finite_val: float = Field(FP16_MAX, gt=0, le=FP16_MAX, description="Weights and constants larger in "
                                  "magnitude keep the nodes that read them FP32 (listed in the stats' "
                                  "`constants_kept_fp32`); never clipped. The default is FP16's largest finite "
                                  "value: every value FP16 can hold converts as it is (the converter's own 1e4 "
                                  "turned Kokoro's sample rate 24000 into 10000).")


class Fp16(Pass):
    name = "fp16"
    Params = Fp16Params
    changes_precision = True

    def wants_calibration(self, params: Fp16Params) -> bool:
        return params.overflow_guard

    def large_model_problem(self, params: Fp16Params) -> str | None:
        return None  # the converter rewrites the light proto; the weights it converts are read from their files

    def apply(self, model: onnx.ModelProto, params: Fp16Params, ctx: PassContext) -> PassResult:
        names = {n.name for n in model.graph.node}
        unknown = sorted(set(params.node_block_list) - names)
        if unknown:
            raise PipelineError(f"fp16 on {ctx.graph_name!r}: node_block_list names no node: {', '.join(unknown[:5])}")
        op_block = sorted(set(ALWAYS_FP32_OPS) | set(params.op_block_list))
        reasons: dict[str, str] = {}
        for n in model.graph.node:
            if n.op_type in op_block:
                reasons[n.name] = "op type"
            elif not ctx.in_scope(n):
                reasons[n.name] = "out of scope"
        for name in params.node_block_list:
            reasons[name] = "node_block_list"
        for name, why in _quantized_nodes(model).items():
            reasons.setdefault(name, why)
        for name in _transposes_into_matmuls(model):
            reasons.setdefault(name, "Transpose into MatMul")
        big_constants, readers = _unrepresentable_constants(model, params.max_finite_val, ctx.weights_dir)
        for name in readers:
            reasons.setdefault(name, "constant out of range")
        if params.overflow_guard and ctx.calibration is not None:
            for name in _overflowing_nodes(model, ctx, params.overflow_threshold):
                reasons.setdefault(name, "overflow")
        elif params.overflow_guard:
            ctx.log(f"fp16 on {ctx.graph_name}: no calibration data, overflow guard skipped")
        node_block = sorted(n for n, why in reasons.items() if why != "op type")
        model = copy_model(model)
        noop_casts = _remove_noop_casts(model)
        _detach_consumed_outputs(model)
        node_block = [n for n in node_block if n not in noop_casts]
        unshared = _unshare_initializers(model, set(op_block), set(node_block))
        # The converter edits the model it is given (its own shape inference, skipped here, would have made a
        # second whole copy): what is read of the graph before conversion is read now.
        float_outputs = {o.name for o in model.graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT}
        outputs_before = {n.name: list(n.output) for n in model.graph.node}
        ops_kept = dict(Counter(n.op_type for n in model.graph.node if reasons.get(n.name) == "op type"))
        infer_value_info(model)
        # The converter warns about every clamped weight; the stats say what matters.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("onnxconverter_common").setLevel(logging.ERROR)
            try:
                converted = float16.convert_float_to_float16(
                    model, min_positive_val=params.min_positive_val, max_finite_val=params.max_finite_val,
                    keep_io_types=params.keep_io_types, op_block_list=op_block, node_block_list=node_block,
                    disable_shape_infer=True)
            except Exception as e:
                raise PipelineError(f"fp16 conversion failed on {ctx.graph_name!r}: "
                                    f"{one_line(e, 400)}") from None
        from_files = _convert_external_weights(converted, ctx.weights_dir, params) if ctx.weights_dir else 0
        cast_fixed = _fix_cast_targets(converted)
        if params.keep_io_types:
            _keep_float_outputs(converted, float_outputs)
        roundtrips = _remove_fp16_round_trips(converted)
        restored = _restore_tensor_names(outputs_before, converted)
        kept = Counter(reasons.values())
        fp16_inits = sum(1 for t in converted.graph.initializer if t.data_type == TensorProto.FLOAT16)
        stats = {
            "nodes_converted": len(names) - len(reasons),
            "nodes_kept_fp32": dict(kept),
            "ops_kept_fp32": ops_kept,
            "overflow_nodes": sorted(n for n, why in reasons.items() if why == "overflow"),
            "constants_kept_fp32": big_constants,
            "initializers_fp16": fp16_inits,
            "casts": sum(1 for n in converted.graph.node if n.op_type == "Cast"),
            "cast_targets_fixed": cast_fixed,
            "initializers_unshared": unshared,
            "noop_casts_removed": len(noop_casts),
            "fp16_round_trips_removed": roundtrips,
            "tensor_names_restored": restored,
            **({"weights_converted_from_files": from_files} if ctx.weights_dir else {}),
            "blocks_changed": dict(Counter(ctx.blocks.node_block.get(n, "?") for n in sorted(names - set(reasons)))),
        }
        return PassResult.of(ctx, converted, changed=True, stats=stats)


def _is_quantized_op(node: onnx.NodeProto) -> bool:
    op = node.op_type
    return "quantize" in op.lower() or "Integer" in op or op.startswith(("QLinear", "QOrdered")) or op in QUANTIZED_OPS


def _quantized_nodes(model: onnx.ModelProto) -> dict[str, str]:
    """Nodes that must keep FP32 inputs and outputs in a quantized graph, with why: "quantized op" (no FP16
    form: DynamicQuantizeLinear refuses FP16), "dequantization" (the float arithmetic of an integer op, as ORT's
    dynamic quantizer writes it: the Cast of its int32 accumulator, far past 65504, and the Mul that rescales it;
    the arithmetic on DynamicQuantizeLinear's scale: the product of scales, which FP16 holds only as subnormals,
    and a bias divided by it into accumulator units), "QDQ group" (DequantizeLinear -> op -> QuantizeLinear,
    which ORT fuses into an integer kernel; Casts in between would undo the fusion)."""
    nodes = model.graph.node
    quantized = [n for n in nodes if _is_quantized_op(n)]
    if not quantized:
        return {}
    types = tensor_types(model)
    reasons = {n.name: "quantized op" for n in quantized}
    accumulators = {t for n in quantized for t in n.output if types.get(t) in INTEGER_TYPES}
    scales = {n.output[1] for n in quantized if n.op_type == "DynamicQuantizeLinear" and len(n.output) > 1}
    rescaled: set[str] = set()
    for n in nodes:  # (in topological order)
        if n.name in reasons:
            continue
        reads_accumulator = any(i in accumulators for i in n.input)
        if n.op_type == "Cast" and reads_accumulator and attribute(n, "to") == TensorProto.FLOAT:
            reasons[n.name] = "dequantization"
            rescaled.add(n.output[0])
        elif any(i in rescaled for i in n.input):  # back at the activations' scale: nothing after it is kept
            reasons[n.name] = "dequantization"
        elif any(i in scales for i in n.input):
            reasons[n.name] = "dequantization"
            scales.update(t for t in n.output if types.get(t) == TensorProto.FLOAT)
        elif reads_accumulator and all(types.get(t) in INTEGER_TYPES for t in n.output):
            accumulators.update(n.output)  # ConvInteger's integer bias Add
    reasons.update({name: "QDQ group" for name in _qdq_groups(model) if name not in reasons})
    return reasons


def _transposes_into_matmuls(model: onnx.ModelProto) -> list[str]:
    """Transposes a MatMul or Gemm reads: kept FP32, since ONNX Runtime 1.32 crashes (segfault, at level
    ORT_ENABLE_ALL) on Cast(FLOAT16) -> Transpose(perm=[1, 2, 0] or [1, 0, 2]) -> Cast(FLOAT) -> MatMul, and makes
    that pattern itself where an FP16 Transpose feeds a MatMul it runs in FP32 (Kokoro's text encoder). A
    Transpose holds no weights: FP32 costs it nothing in size."""
    readers = consumers(model.graph.node)
    return [n.name for n in model.graph.node if n.op_type == "Transpose" and
            any(r.op_type in ("MatMul", "FusedMatMul", "Gemm") for r in readers.get(n.output[0], []))]


def _qdq_groups(model: onnx.ModelProto) -> list[str]:
    """Nodes whose inputs all come from DequantizeLinear (or are initializers) and whose outputs only
    QuantizeLinear reads."""
    nodes = model.graph.node
    dequantized = {n.output[0] for n in nodes if n.op_type == "DequantizeLinear"}
    inits = {t.name for t in model.graph.initializer}
    readers = consumers(nodes)
    outputs = {o.name for o in model.graph.output}
    found = []
    for n in nodes:
        inputs = [i for i in n.input if i]
        if _is_quantized_op(n) or not any(i in dequantized for i in inputs) or \
                not all(i in dequantized or i in inits for i in inputs):
            continue
        if all(o not in outputs and readers.get(o) and all(r.op_type == "QuantizeLinear" for r in readers[o])
               for o in n.output):
            found.append(n.name)
    return found


def _unrepresentable_constants(model: onnx.ModelProto, limit: float, weights_dir: Path | None) \
        -> tuple[list[str], set[str]]:
    """Float weights and constants (initializers, tensor attributes) with a finite value beyond `limit`, and the
    nodes to keep FP32 for them: their readers, and a node holding one as an attribute (a Constant)."""
    def beyond(value: np.ndarray) -> bool:
        finite = np.abs(value[np.isfinite(value)])
        return bool(finite.size) and float(finite.max()) > limit

    big = {t.name for t in model.graph.initializer
           if t.data_type == TensorProto.FLOAT and beyond(tensor_array(t, weights_dir))}
    names = sorted(big)
    keep = set()
    for n in model.graph.node:
        attrs = [t for a in n.attribute for t in ([a.t] if a.HasField("t") else a.tensors)]
        if any(t.data_type == TensorProto.FLOAT and beyond(numpy_helper.to_array(t)) for t in attrs):
            keep.add(n.name)
            big.update(n.output)
            names.append(n.name)
    keep.update(n.name for n in model.graph.node if any(i in big for i in n.input))
    return names, keep


def _overflowing_nodes(model: onnx.ModelProto, ctx: PassContext, threshold: float) -> list[str]:
    """Nodes whose float outputs reach `threshold` in largest finite magnitude on the calibration inputs."""
    float_types = {name for name, t in tensor_types(model).items() if t == TensorProto.FLOAT}
    producer = {t: n.name for t, n in producers(model.graph.node).items() if t in float_types}
    peak, unclear = _peak_magnitudes(model, ctx, producer)
    for k in range(0, len(unclear), EXPOSED_PER_RUN):
        for t, m in _exposed_peaks(model, ctx, unclear[k:k + EXPOSED_PER_RUN]).items():
            peak[t] = max(peak.get(t, 0.0), m)
    return sorted({producer[t] for t, m in peak.items() if m >= threshold})


def _peak_magnitudes(model: onnx.ModelProto, ctx: PassContext, tensors: Iterable[str]) \
        -> tuple[dict[str, float], list[str]]:
    """max |t| of each tensor over the calibration inputs, reduced inside the graph (Abs -> ReduceMax after each
    producer), so a run holds the activations no longer than plain inference does. Also the tensors whose
    reduction holds an inf or NaN: their largest finite magnitude needs the values themselves."""
    probe, reduced = _with_peak_outputs(model, set(tensors))
    # In graph order: each reduction runs right after its tensor is made, which is then freed (ORT's default
    # order ran every reduction last, holding all activations: 4.5 GB on Kokoro INT8 for one sentence, not 0.65).
    # Its weights mapped from a scratch file (`inline_limit`), not serialized and copied: twice a float Kokoro's
    # 325 MB less at the peak.
    sess = session(probe, weights_dir=ctx.weights_dir, in_graph_order=True, inline_limit=HEAVY_BYTES)
    del probe
    peak: dict[str, float] = {}
    unclear: set[str] = set()
    for feeds in ctx.calibration():
        for t, value in zip(reduced, sess.run(list(reduced.values()), feeds)):
            m = float(value)
            if m == -np.inf:  # (the max of an empty tensor)
                m = 0.0
            if not np.isfinite(m):
                unclear.add(t)
            else:
                peak[t] = max(peak.get(t, 0.0), m)
    return peak, sorted(unclear)


def _exposed_peaks(model: onnx.ModelProto, ctx: PassContext, tensors: list[str]) -> dict[str, float]:
    """Largest finite magnitude of a few tensors over the calibration inputs, read as graph outputs."""
    sess = session(with_outputs(model, tensors), weights_dir=ctx.weights_dir, in_graph_order=True)
    peak: dict[str, float] = {}
    for feeds in ctx.calibration():
        for t, value in zip(tensors, sess.run(tensors, feeds)):
            finite = np.abs(value[np.isfinite(value)])
            peak[t] = max(peak.get(t, 0.0), float(finite.max()) if finite.size else 0.0)
    return peak


def _with_peak_outputs(model: onnx.ModelProto, tensors: set[str]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of `model` with `ReduceMax(Abs(t))` (a scalar) after the producer of each tensor in `tensors`,
    as an extra output: {tensor: its output}."""
    probe = copy_model(model)
    used = {t for n in probe.graph.node for t in (*n.input, *n.output)} | {i.name for i in probe.graph.input}
    reduced: dict[str, str] = {}
    nodes = []
    for n in probe.graph.node:
        nodes.append(n)
        for t in n.output:
            if t not in tensors:
                continue
            absolute, peak = unused_name(f"{t}_abs", used), unused_name(f"{t}_peak", used)
            used.update((absolute, peak))
            nodes += [helper.make_node("Abs", [t], [absolute], name=absolute),
                      helper.make_node("ReduceMax", [absolute], [peak], name=peak, keepdims=0)]
            reduced[t] = peak
    del probe.graph.node[:]
    probe.graph.node.extend(nodes)
    for peak in reduced.values():
        probe.graph.output.add(name=peak)
    return probe, reduced


def _convert_external_weights(model: onnx.ModelProto, weights_dir: Path, params: Fp16Params) -> int:
    """Give the weights the converter marked FP16 in a light model their FP16 bytes, held in the proto.

    The converter changes the type of a weight left in its external-data file but cannot reach its bytes, which
    are still FP32 there: they are read, converted as the converter converts (clamped to `min_positive_val` and
    `max_finite_val`) and stored inline, one tensor at a time (half the size of what they were)."""
    count = 0
    for t in model.graph.initializer:
        if t.data_type != TensorProto.FLOAT16 or t.data_location != TensorProto.EXTERNAL:
            continue
        fp32 = external_bytes(t, weights_dir).view(np.float32)
        with warnings.catch_warnings():  # (one per clamped weight, as in the converter)
            warnings.simplefilter("ignore")
            half = float16.convert_np_to_float16(fp32, params.min_positive_val, params.max_finite_val)
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT
        t.raw_data = half.astype(np.float16).tobytes()
        count += 1
    return count


def _restore_tensor_names(outputs_before: dict[str, list[str]], converted: onnx.ModelProto) -> int:
    """Give a node's outputs back the names they had where the converter renamed them and the old name is gone.

    Around the nodes it keeps FP32 the converter renames their outputs (`Y` -> `Y_output_cast_0`) for the Casts
    it inserts; once those Casts are found needless and dropped, the old name is nowhere, and the check could no
    longer find the boundary tensors of the blocks left FP32 (19 of Kokoro's 36 blocks read as unmatched).
    `outputs_before`: each node's outputs before conversion. Returns how many tensors were renamed."""
    was = outputs_before
    used = {t for n in converted.graph.node for t in (*n.input, *n.output)}
    used |= {v.name for v in (*converted.graph.input, *converted.graph.output, *converted.graph.initializer)}
    rename = {}
    for n in converted.graph.node:
        for new, old in zip(n.output, was.get(n.name, [])):
            if new != old and new and old and old not in used:
                rename[new] = old
                used.add(old)
    if not rename:
        return 0
    for n in converted.graph.node:
        n.input[:] = [rename.get(t, t) for t in n.input]
        n.output[:] = [rename.get(t, t) for t in n.output]
    for v in (*converted.graph.output, *converted.graph.value_info):
        v.name = rename.get(v.name, v.name)
    return len(rename)


def _remove_noop_casts(model: onnx.ModelProto) -> set[str]:
    """Drop Casts to the type their input already has (PyTorch's `x.float()` on a float tensor).

    Exact in the FP32 graph, and it keeps the converter away from Cast->Cast chains with
    several consumers, on which its cast cleanup crashes ('list' object has no attribute 'input').
    """
    types = tensor_types(model)
    outputs = {o.name for o in model.graph.output}
    rewire, dropped = {}, set()
    for n in model.graph.node:
        if n.op_type == "Cast" and n.output[0] not in outputs and \
                types.get(n.input[0]) == next(a.i for a in n.attribute if a.name == "to"):
            rewire[n.output[0]] = n.input[0]
            dropped.add(n.name)
    for n in model.graph.node:
        for k, t in enumerate(n.input):
            while t in rewire:
                t = rewire[t]
            n.input[k] = t
    keep = [n for n in model.graph.node if n.name not in dropped]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return dropped


def _detach_consumed_outputs(model: onnx.ModelProto) -> int:
    """A graph output that nodes also read gets its own Identity: `t` stays the output, readers use `t_inner`.

    With keep_io_types the converter casts such an output back to float but leaves
    its internal readers typed for the wrong precision (KV caches: `present_key` is
    both an output and the keys the attention reads).
    """
    outputs = {o.name for o in model.graph.output}
    read = {t for n in model.graph.node for t in n.input}
    detached = 0
    for name in sorted(outputs & read):
        inner = f"{name}_inner"
        for n in model.graph.node:
            n.output[:] = [inner if t == name else t for t in n.output]
            n.input[:] = [inner if t == name else t for t in n.input]
        model.graph.node.append(onnx.helper.make_node("Identity", [inner], [name], name=f"{name}_output"))
        detached += 1
    return detached


def _unshare_initializers(model: onnx.ModelProto, op_block: set[str], node_block: set[str]) -> int:
    """Give kept-FP32 consumers their own copy of a float initializer shared with converted nodes.

    The converter keeps a shared initializer FP32 if any consumer is kept, and the
    converted consumers then see a float input among FP16 ones.
    """
    inits = {t.name: t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    users = {name: nodes for name, nodes in consumers(model.graph.node).items() if name in inits}
    count = 0
    for name, nodes in users.items():
        kept = [n for n in nodes if n.op_type in op_block or n.name in node_block]
        if kept and len(kept) < len(nodes):
            twin = TensorProto()
            twin.CopyFrom(inits[name])
            twin.name = f"{name}_fp32"
            model.graph.initializer.append(twin)
            for n in kept:
                for k, x in enumerate(n.input):
                    if x == name:
                        n.input[k] = twin.name
            count += 1
    return count


def _fix_cast_targets(model: onnx.ModelProto) -> list[str]:
    """Cast(to=FLOAT) nodes whose output the converter declared FP16 now cast to FP16."""
    declared = tensor_types(model, infer=False)
    fixed = []
    for n in model.graph.node:
        if n.op_type != "Cast":
            continue
        for a in n.attribute:
            if a.name == "to" and a.i == TensorProto.FLOAT and declared.get(n.output[0]) == TensorProto.FLOAT16:
                a.i = TensorProto.FLOAT16
                fixed.append(n.name)
    return fixed


def _keep_float_outputs(model: onnx.ModelProto, float_outputs: set[str]) -> None:
    """A float graph output that a kept-FP32 node writes stays FLOAT: the converter casts it to FLOAT16 after the
    node and declares it so (its keep_io_types only handles outputs of converted nodes)."""
    producer = producers(model.graph.node)
    for o in model.graph.output:
        cast = producer.get(o.name)
        if o.name in float_outputs and o.type.tensor_type.elem_type == TensorProto.FLOAT16 \
                and cast is not None and cast.op_type == "Cast":
            for a in cast.attribute:
                if a.name == "to":
                    a.i = TensorProto.FLOAT
            o.type.tensor_type.elem_type = TensorProto.FLOAT


def _remove_fp16_round_trips(model: onnx.ModelProto) -> int:
    """Rewire Cast(FLOAT)(Cast(FLOAT16)(x: float)) to x, and drop Casts left unused."""
    types = tensor_types(model, infer=False)
    producer = producers(model.graph.node)
    graph_outputs = {o.name for o in model.graph.output}

    def cast_to(n: onnx.NodeProto) -> int:
        return next(a.i for a in n.attribute if a.name == "to")

    rewire: dict[str, str] = {}
    for n in model.graph.node:
        if n.op_type != "Cast" or cast_to(n) != TensorProto.FLOAT or n.output[0] in graph_outputs:
            continue
        src = producer.get(n.input[0])
        if src is not None and src.op_type == "Cast" and cast_to(src) == TensorProto.FLOAT16 \
                and types.get(src.input[0]) == TensorProto.FLOAT:
            rewire[n.output[0]] = src.input[0]
    if not rewire:
        return 0
    for n in model.graph.node:
        for k, i in enumerate(n.input):
            if i in rewire:
                n.input[k] = rewire[i]
    cleanup(model, removable=lambda n: n.op_type == "Cast")  # a dead Cast can leave its input Cast dead
    return len(rewire)
