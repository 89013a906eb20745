"""dequantize: turn a quantized model (dynamic, static QDQ or QOperator) back into a float one.

For a user who only has an INT8 export (kokoro-onnx's Kokoro-82M ships one) and wants to start over with any
recipe. Integer weights times their scale become float initializers, and the quantized op chains become plain
float ops, each named into the scope of the node it replaces, so it stays in that node's block:

- ONNX Runtime's `quantize_dynamic`: `DynamicQuantizeLinear -> MatMulInteger/ConvInteger -> Cast -> Mul(scale)`
  becomes `MatMul`/`Conv` on the float input, writing the Mul's output, with `W = (W_q - W_zp) * W_scale`
  (per tensor or per output channel). A ConvInteger whose int32 bias is quantized on the fly (older ORT:
  `bias / (x_scale * W_scale)`, Floor, Cast, Reshape, added before the rescale) gets that float bias back as
  its Conv bias. `DynamicQuantizeLSTM` (com.microsoft, weights [dirs, in, 4h]) becomes a standard `LSTM`
  (W [dirs, 4h, in], R [dirs, 4h, h]); a Gather on an INT8 table (then DequantizeLinear, or straight into an
  integer op) becomes a Gather on the float table.
- Static QDQ: a DequantizeLinear of a constant becomes a float initializer, and an activation's
  QuantizeLinear -> DequantizeLinear pair is removed.
- Static QOperator: QLinearConv, QLinearMatMul, QLinearAdd, QLinearMul, QLinearLeakyRelu and QLinearSigmoid are
  first expanded into DequantizeLinear -> float op -> QuantizeLinear, then the pairs are removed as above.
  Data-movement ops that ONNX Runtime runs on 8-bit data (Transpose, Reshape, MaxPool, ...) between a pair run on
  the float tensor instead.

A removed pair whose integer grid starts at exactly 0 (zero point at the type's minimum) clamped negative values
to 0: ONNX Runtime's quantizers drop a Relu there, because the pair does its work. Such a pair becomes a Relu
(unless its input already comes out of one), so the float graph computes what the quantized one did. An upper
clamp (a Relu6 or Clip the quantizer folded) cannot be told from the calibrated maximum and is not restored.

A model dequantized this way keeps the INT8 export's weight grid: its weights are exactly the INT8 values times
their scale. No precision comes back; what goes away is the 8-bit rounding of activations (and its speed).
ONNX Runtime's fused float ops (FastGelu, SkipLayerNormalization, FusedMatMul) are left as they are.

Only quantized ops in the step's scope are turned back. One the pass cannot turn back is counted in the stats
(`left`, by op type) and logged, never left silently; `expect_min_nodes` fails the step when fewer than it says
were turned back.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pydantic import Field

from pipeline.core.blocks import replaced_name
from pipeline.core.errors import PipelineError
from pipeline.core.graph import attribute, cleanup, constant_value, node_inputs, toposort, unused_name
from pipeline.core.onnx_io import copy_model

from .base import Params, Pass, PassContext, PassResult

# Ops that compute on, or make, quantized data: the pass turns them back or reports them in `left`.
QUANTIZED_OPS = {"MatMulInteger", "ConvInteger", "DynamicQuantizeLSTM", "DynamicQuantizeLinear", "QuantizeLinear",
                 "DequantizeLinear", "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearLeakyRelu",
                 "QLinearSigmoid", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool",
                 "QLinearSoftmax", "QGemm", "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                 "MatMulNBits", "QEmbedLayerNormalization"}
# QLinear ops whose float form has the same attributes: op -> (float op, domain of the float op).
_QLINEAR_FLOAT = {"QLinearConv": "Conv", "QLinearMatMul": "MatMul", "QLinearAdd": "Add", "QLinearMul": "Mul",
                  "QLinearLeakyRelu": "LeakyRelu", "QLinearSigmoid": "Sigmoid"}
# Ops that move 8-bit data without computing on it: op(dequantize(x)) == dequantize(op(x)) for one scale.
_MOVES = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "MaxPool", "Slice", "Expand",
          "Tile", "DepthToSpace", "SpaceToDepth", "Gather"}
_QMIN = {TensorProto.UINT8: 0, TensorProto.INT8: -128, TensorProto.UINT16: 0, TensorProto.INT16: -32768}


class DequantizeParams(Params):
    expect_min_nodes: int | None = Field(default=None, ge=0, description="Fail the step when fewer quantized ops "
                                         "than this (integer ops, QLinear ops, DequantizeLinear nodes) were turned "
                                         "back to float (a scope that matches nothing, a model that was not "
                                         "quantized).")


class Dequantize(Pass):
    """dequantize: turn an INT8 model (ORT dynamic, static QDQ or QOperator) back into float ops and weights.

    The float weights are exactly the INT8 values times their scale: no precision comes back."""

    name = "dequantize"
    Params = DequantizeParams
    # Not `changes_precision`: that flag makes a pass the automatic fallback's and tune's lever, which keep the
    # blocks left out of its scope in FP32. Left out of dequantize's scope, a block stays INT8: the opposite.
    # (Default `min_opset`: every op it writes exists from opset 7. Default `large_model_problem`: it holds the
    # whole model and its float weights, four times the INT8 ones, in memory.)

    def apply(self, model: onnx.ModelProto, params: DequantizeParams, ctx: PassContext) -> PassResult:
        model = copy_model(model)
        nodes_before = len(model.graph.node)
        work = _Dequantizer(model, ctx)
        work.run()
        left, outside = work.leftovers()
        count = sum(work.turned_back.values())
        if left:
            ctx.log(f"dequantize on {ctx.graph_name!r}: could not turn back "
                    f"{', '.join(f'{n} {op}' for op, n in sorted(left.items()))}: "
                    f"{'; '.join(work.reasons[:3])}")
        if params.expect_min_nodes is not None and count < params.expect_min_nodes:
            raise PipelineError(f"dequantize on {ctx.graph_name!r}: expected at least {params.expect_min_nodes} "
                                f"quantized ops turned back, got {count} (left: {left or 'none'})")
        stats = {"nodes_turned_back": count, "turned_back": dict(work.turned_back),
                 "turned_back_per_block": dict(work.per_block), "left": left, "outside_scope": outside,
                 "weight_bytes_before": work.bytes_before, "weight_bytes_after": work.bytes_after,
                 "nodes_before": nodes_before, "nodes_after": len(model.graph.node)}
        return PassResult.of(ctx, model, changed=count > 0, stats=stats, placed=work.placed())


def _key(node: onnx.NodeProto) -> tuple[str, ...]:
    # Node protos are copied in and out of the graph, so they are told apart by their outputs.
    return tuple(node.output)


class _Dequantizer:
    """One model's rewrite: its maps, the nodes it adds and removes, what it turned back."""

    def __init__(self, model: onnx.ModelProto, ctx: PassContext):
        self.model, self.graph, self.ctx = model, model.graph, ctx
        self.inits = {t.name: t for t in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output if o}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                if i:
                    self.readers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.graph.output}
        self.names = {n.name for n in self.graph.node}
        self.tensors = set(self.producer) | set(self.inits) | {i.name for i in self.graph.input}
        self.new_nodes: list[onnx.NodeProto] = []
        self.wanted: dict[tuple[str, ...], str] = {}  # new node -> the name it takes once the old one is gone
        self.new_inits: dict[str, onnx.TensorProto] = {}
        self.removed: set[tuple[str, ...]] = set()
        self.expanded: set[tuple[str, ...]] = set()  # DequantizeLinear nodes of expanded QLinear ops
        self.float_cache: dict[str, str] = {}
        self.weight_cache: dict[tuple, str] = {}
        self.freed: set[str] = set()  # initializers removed nodes read
        self.ancestor_inits: set[str] = set()  # initializers the nodes that died with them read
        self.turned_back: Counter[str] = Counter()
        self.per_block: Counter[str] = Counter()
        self.reasons: list[str] = []
        self.failed: set[tuple[str, ...]] = set()
        self.bytes_before = self.bytes_after = 0

    # --- the walk -------------------------------------------------------------------------------------------

    def run(self) -> None:
        for node in list(self.graph.node):
            if not self.ctx.in_scope(node):
                continue
            op = node.op_type
            try:
                if op in ("MatMulInteger", "ConvInteger"):
                    self.integer_product(node)
                elif op == "DynamicQuantizeLSTM":
                    self.lstm(node)
                elif op in _QLINEAR_FLOAT:
                    self.expand_qlinear(node)
                else:
                    continue
            except _Skip as e:
                self.skip(node, str(e))
                continue
            self.count(node)
        for node in list(self.graph.node) + list(self.new_nodes):
            if node.op_type == "DequantizeLinear" and _key(node) not in self.removed and \
                    (_key(node) in self.expanded or self.ctx.in_scope(node)):
                try:
                    self.dequantize_linear(node)
                except _Skip as e:
                    self.skip(node, str(e))
                    continue
                if _key(node) not in self.expanded:
                    self.count(node)
        self.finish()

    def count(self, node: onnx.NodeProto) -> None:
        self.turned_back[node.op_type] += 1
        self.per_block[self.ctx.blocks.node_block.get(node.name, "(new)")] += 1

    def skip(self, node: onnx.NodeProto, reason: str) -> None:
        self.failed.add(_key(node))
        self.reasons.append(f"{node.op_type} {node.name!r}: {reason}")

    # --- reading --------------------------------------------------------------------------------------------

    def const(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        if name in self.new_inits:
            return numpy_helper.to_array(self.new_inits[name])
        return constant_value(name, self.inits, self.producer)

    def need_const(self, name: str, what: str) -> np.ndarray:
        value = self.const(name)
        if value is None:
            raise _Skip(f"{what} ({name!r}) is not a constant")
        return value

    def only_reader(self, tensor: str, op: str, what: str) -> onnx.NodeProto:
        users = [u for u in self.readers.get(tensor, []) if _key(u) not in self.removed]
        if len(users) != 1 or users[0].op_type != op or tensor in self.outputs:
            found = ", ".join(u.op_type for u in users) or "nothing"
            raise _Skip(f"{what} feeds {found}, not one {op}")
        return users[0]

    # --- editing --------------------------------------------------------------------------------------------

    def add_node(self, op: str, inputs: list[str], outputs: list[str], replaces: onnx.NodeProto, domain: str = "",
                 attrs: Iterable[onnx.AttributeProto] = (), **kw) -> onnx.NodeProto:
        """A node named after `replaces` (its op suffix `_quant` dropped, its scope kept) with its metadata."""
        node = helper.make_node(op, inputs, outputs, domain=domain or None, **kw)
        node.attribute.extend(attrs)
        base = replaced_name(replaces.name) if op == _float_op(replaces.op_type) else \
            f"{replaces.name.rsplit('/', 1)[0]}/{op}" if "/" in replaces.name else f"{replaces.name}_{op}"
        node.name = unused_name(base, self.names)
        self.names.add(node.name)
        self.wanted[_key(node)] = base
        node.metadata_props.extend(replaces.metadata_props)
        for o in node.output:
            if o:
                self.producer[o] = node
                self.tensors.add(o)
        for i in node.input:
            if i:
                self.readers.setdefault(i, []).append(node)
        self.new_nodes.append(node)
        return node

    def fresh(self, base: str) -> str:
        name = unused_name(base, self.tensors)
        self.tensors.add(name)
        return name

    def remove(self, *nodes: onnx.NodeProto) -> None:
        for node in nodes:
            self.removed.add(_key(node))
            self.freed.update(i for i in node.input if i in self.inits)
            for i in node.input:
                if i in self.readers:
                    self.readers[i] = [u for u in self.readers[i] if _key(u) != _key(node)]

    def float_weight(self, q: str, scale: str, zp: str, axis: int | None,
                     transpose: tuple[int, ...] | None = None) -> str:
        """A float initializer `(q - zp) * scale`, per tensor or along `axis` (None: DynamicQuantizeLSTM's
        per-direction layout), named after `q`."""
        key = (q, scale, zp, axis, transpose)
        if key in self.weight_cache:
            return self.weight_cache[key]
        w = self.need_const(q, "the quantized weight")
        value = dequantized(w, self.need_const(scale, "the weight's scale"),
                            self.const(zp) if zp else None, axis)
        if transpose is not None:
            value = np.ascontiguousarray(value.transpose(transpose))
        name = self.fresh(q.removesuffix("_quantized") or q)
        self.new_inits[name] = numpy_helper.from_array(value, name)
        self.weight_cache[key] = name
        return name

    # --- dynamic: MatMulInteger / ConvInteger ---------------------------------------------------------------

    def integer_product(self, node: onnx.NodeProto) -> None:
        a_q, w_q = node.input[0], node.input[1]
        a_zp = node.input[2] if len(node.input) > 2 else ""
        w_zp = node.input[3] if len(node.input) > 3 else ""
        chain, bias = [node], None
        nxt = self.only_reader(node.output[0], "Add", "its int32 output") if self._read_by(node, "Add") else None
        if nxt is not None:
            if node.op_type != "ConvInteger":
                raise _Skip("an int32 bias after a MatMulInteger has no float MatMul form")
            bias = self.int_bias(nxt, node.output[0])
            chain.append(nxt)
        cast = self.only_reader(chain[-1].output[0], "Cast", "its int32 output")
        if attribute(cast, "to") != TensorProto.FLOAT:
            raise _Skip("its output is cast to another type than float")
        mul = self.only_reader(cast.output[0], "Mul", "its float cast")
        scale = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
        a_scale, w_scale = self.split_scale(scale, a_q, a_zp, w_zp)
        a_float = self.float_of(a_q, a_scale, a_zp)
        conv = node.op_type == "ConvInteger"
        w_float = self.float_weight(w_q, w_scale, w_zp, axis=0 if conv else -1)
        inputs = [a_float, w_float]
        if bias is not None:
            inputs.append(bias)
        self.add_node("Conv" if conv else "MatMul", inputs, [mul.output[0]], node,
                      attrs=node.attribute if conv else ())
        self.remove(*chain, cast, mul)

    def _read_by(self, node: onnx.NodeProto, op: str) -> bool:
        users = self.readers.get(node.output[0], [])
        return len(users) == 1 and users[0].op_type == op

    def int_bias(self, add: onnx.NodeProto, acc: str) -> str:
        """The float bias an int32 bias add was quantized from on the fly: Div(bias, scale) -> Floor/Round ->
        Cast -> Reshape (older ORT's dynamic ConvInteger)."""
        name = add.input[1] if add.input[0] == acc else add.input[0]
        node = self.producer.get(name)
        while node is not None and node.op_type in ("Reshape", "Cast", "Floor", "Round", "Unsqueeze"):
            node = self.producer.get(node.input[0])
        if node is None or node.op_type != "Div":
            raise _Skip(f"its int32 bias comes from {node.op_type if node is not None else 'no node'}, not a "
                        f"float bias divided by its scale")
        bias = node.input[0]
        value = self.need_const(bias, "the float bias")
        if bias in self.inits and value.ndim == 1 and value.dtype == np.float32:
            return bias  # the float bias itself: the Conv reads it
        return self.fresh_init(f"{bias}_flat", value.astype(np.float32).ravel())

    def fresh_init(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.new_inits[name] = numpy_helper.from_array(value, name)
        return name

    def split_scale(self, scale: str, a_q: str, a_zp: str, w_zp: str) -> tuple[str, str]:
        """(input's scale, weight's scale) of the rescale factor, which ORT makes as Mul(a_scale, w_scale)."""
        mul = self.producer.get(scale)
        if mul is None or mul.op_type != "Mul":
            raise _Skip(f"its rescale factor comes from {mul.op_type if mul is not None else 'no node'}, not a Mul "
                        f"of the input's and the weight's scales")
        s1, s2 = mul.input[0], mul.input[1]
        source = self.producer.get(a_q)
        guesses = [source.output[1]] if source is not None and source.op_type == "DynamicQuantizeLinear" else []
        guesses.append(a_zp.replace("_zero_point", "_scale"))  # ORT names a scale beside its zero point
        for guess in guesses:
            if guess in (s1, s2):
                return guess, s2 if guess == s1 else s1
        guess = w_zp.replace("_zero_point", "_scale")
        if guess in (s1, s2):
            return s2 if guess == s1 else s1, guess
        raise _Skip("cannot tell the input's scale from the weight's in its rescale factor")

    # --- the float value of a quantized tensor ------------------------------------------------------------

    def float_of(self, q: str, scale: str, zp: str) -> str:
        """The float tensor that `q` (quantized with `scale`, `zp`) stands for, made where needed: the input of
        its (Dynamic)QuantizeLinear (through a Relu where the grid clamps at 0), a Gather on the float table, or
        a data-movement op on the float value of its input."""
        if q in self.float_cache:
            return self.float_cache[q]
        node = self.producer.get(q)
        if node is None:
            raise _Skip(f"its quantized input {q!r} is a graph input or initializer")
        if node.op_type == "DynamicQuantizeLinear":
            out = node.input[0]
        elif node.op_type == "QuantizeLinear":
            out = self.clamped(node)
        elif node.op_type == "Gather" and self.const(node.input[0]) is not None:
            table = self.float_weight(node.input[0], scale, zp, axis=-1)
            out = self.fresh(q.removesuffix("_quantized") if q.endswith("_quantized") else f"{q}_float")
            self.add_node("Gather", [table, node.input[1]], [out], node, attrs=node.attribute)
        elif node.op_type in _MOVES and len(node.output) == 1:
            inner = self.float_of(node.input[0], scale, zp)
            out = self.fresh(q.removesuffix("_quantized") if q.endswith("_quantized") else f"{q}_float")
            self.add_node(node.op_type, [inner, *node.input[1:]], [out], node, domain=node.domain,
                          attrs=node.attribute)
        else:
            raise _Skip(f"its quantized input {q!r} comes from {node.op_type}, which the pass cannot turn back")
        self.float_cache[q] = out
        return out

    def clamped(self, q_node: onnx.NodeProto) -> str:
        """A QuantizeLinear's float input, through a Relu when its grid starts at exactly 0 (it clamped there)."""
        x = q_node.input[0]
        zp_name = q_node.input[2] if len(q_node.input) > 2 else ""
        zp = self.const(zp_name)
        dtype = self.inits[zp_name].data_type if zp_name in self.inits else TensorProto.UINT8
        if zp is None or np.any(zp != _QMIN.get(dtype, 0)) or self.non_negative(x):
            return x
        out = self.fresh(f"{x}_relu")
        self.add_node("Relu", [x], [out], q_node)
        return out

    def non_negative(self, x: str) -> bool:
        """Whether `x` comes out of a Relu, through data-movement ops."""
        node = self.producer.get(x)
        while node is not None and node.op_type in _MOVES:
            node = self.producer.get(node.input[0])
        return node is not None and node.op_type == "Relu"

    # --- DynamicQuantizeLSTM ----------------------------------------------------------------------------------

    def lstm(self, node: onnx.NodeProto) -> None:
        ins = list(node.input) + [""] * (12 - len(node.input))
        # ORT stores W [dirs, in, 4h] and R [dirs, h, 4h] with scales [dirs] or [dirs, 4h]; ONNX's LSTM wants
        # W [dirs, 4h, in], R [dirs, 4h, h].
        w = self.float_weight(ins[1], ins[8], ins[9], axis=None, transpose=(0, 2, 1))
        r = self.float_weight(ins[2], ins[10], ins[11], axis=None, transpose=(0, 2, 1))
        inputs = [ins[0], w, r, *ins[3:8]]
        while inputs and not inputs[-1]:
            inputs.pop()
        self.add_node("LSTM", inputs, list(node.output), node, attrs=node.attribute)
        self.remove(node)

    # --- QOperator: expand into DequantizeLinear -> float op -> QuantizeLinear -------------------------------

    def expand_qlinear(self, node: onnx.NodeProto) -> None:
        op, ins = node.op_type, list(node.input)
        if op in ("QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul"):
            triples = [ins[0:3], ins[3:6]]
            out_scale, out_zp = ins[6], ins[7] if len(ins) > 7 else ""
        else:  # QLinearLeakyRelu, QLinearSigmoid: X, X_scale, X_zp, Y_scale, Y_zp
            triples = [ins[0:3]]
            out_scale, out_zp = ins[3], ins[4] if len(ins) > 4 else ""
        floats = []
        for k, (v, s, zp) in enumerate(triples):
            if k == 1 and op in ("QLinearConv", "QLinearMatMul") and self.const(v) is not None:
                floats.append(self.float_weight(v, s, zp, axis=0 if op == "QLinearConv" else -1))
            else:
                floats.append(self.dequantize_node(v, s, zp, node))
        if op == "QLinearConv" and len(ins) > 8 and ins[8]:
            bias = self.need_const(ins[8], "the int32 bias").astype(np.float32)
            scale = self.need_const(ins[1], "the input's scale") * self.need_const(ins[4], "the weight's scale")
            floats.append(self.fresh_init(ins[8].removesuffix("_quantized"), (bias * scale.astype(np.float32)).ravel()))
        y = self.fresh(f"{node.output[0]}_float")
        float_op = _QLINEAR_FLOAT[op]
        self.add_node(float_op, floats, [y], node, attrs=node.attribute)
        self.add_node("QuantizeLinear", [y, out_scale] + ([out_zp] if out_zp else []), list(node.output), node)
        self.remove(node)

    def dequantize_node(self, v: str, scale: str, zp: str, replaces: onnx.NodeProto) -> str:
        out = self.fresh(f"{v}_dequantized")
        dq = self.add_node("DequantizeLinear", [v, scale] + ([zp] if zp else []), [out], replaces)
        self.expanded.add(_key(dq))
        return out

    # --- DequantizeLinear: a constant becomes an initializer, an activation its float value -------------------

    def dequantize_linear(self, node: onnx.NodeProto) -> None:
        if attribute(node, "block_size", 0):
            raise _Skip("blocked quantization (block_size) is not supported")
        x, scale = node.input[0], node.input[1]
        zp = node.input[2] if len(node.input) > 2 else ""
        y = node.output[0]
        value = None if self.const(x) is not None else self.float_of(x, scale, zp)
        if y in self.outputs:  # another node will write `y`: the removed one must not share its name (its key)
            node.output[0] = self.fresh(f"{y}_removed")
        self.remove(node)
        if value is None:
            source = self.const(scale)
            axis = attribute(node, "axis", 1) if source is not None and source.size > 1 else 0
            name = self.float_weight(x, scale, zp, axis=axis)
            if y in self.outputs or y == x.removesuffix("_quantized"):  # (QDQ's bias DQ writes the bias's name)  # (a graph output keeps its name: the initializer takes it)
                tensor = self.new_inits.pop(name)
                tensor.name = y
                self.new_inits[y] = tensor
                self.weight_cache = {k: (y if v == name else v) for k, v in self.weight_cache.items()}
                name = y
            else:
                self.rewire(y, name)
        else:
            self.bypass(y, value, node)

    def rewire(self, old: str, new: str) -> None:
        for user in self.readers.pop(old, []):
            for k, name in enumerate(user.input):
                if name == old:
                    user.input[k] = new
            self.readers.setdefault(new, []).append(user)

    def bypass(self, y: str, value: str, dq: onnx.NodeProto) -> None:
        """Readers of `y` read the float `value` instead; a graph output `y` keeps its name."""
        if y not in self.outputs:
            self.rewire(y, value)
            return
        maker = self.producer.get(value)
        if maker is not None and value not in self.outputs:  # its producer writes `y` directly
            want = self.wanted.pop(_key(maker), None)
            maker.output[list(maker.output).index(value)] = y
            if want is not None:
                self.wanted[_key(maker)] = want
            self.producer[y] = maker
            self.rewire(value, y)
            self.float_cache = {k: (y if v == value else v) for k, v in self.float_cache.items()}
        else:
            self.add_node("Identity", [value], [y], dq)

    # --- the result -------------------------------------------------------------------------------------------

    def finish(self) -> None:
        graph = self.graph
        doomed = {k for k in self.removed}
        # What only the removed nodes needed (the DynamicQuantizeLinear, the scale Mul, the bias chain, an 8-bit
        # Gather) dies with them: cleanup drops those of their ancestors nothing else reads.
        ancestors = self.ancestors([n for n in graph.node if _key(n) in doomed])
        kept = [n for n in graph.node if _key(n) not in doomed]
        known = {i.name for i in graph.input} | set(self.inits) | set(self.new_inits)
        ordered = toposort(kept + self.new_nodes, known, what="dequantize (a bug in the pass)")
        del graph.node[:]
        graph.node.extend(ordered)
        new_keys = {_key(n) for n in self.new_nodes}
        cleanup(self.model, removable=lambda n: _key(n) in ancestors or _key(n) in new_keys)
        read = {i for n in graph.node for i in node_inputs(n)} | self.outputs
        freed = {name for name in self.freed | self.ancestor_inits if name not in read}
        self.bytes_before = sum(_nbytes(self.inits[name]) for name in freed)
        added = [t for name, t in self.new_inits.items() if name in read]
        self.bytes_after = sum(_nbytes(t) for t in added)
        kept_inits = [t for t in graph.initializer if t.name not in freed]
        del graph.initializer[:]
        graph.initializer.extend(kept_inits)
        graph.initializer.extend(added)
        self.rename_new_nodes()

    def ancestors(self, nodes: list[onnx.NodeProto]) -> set[tuple[str, ...]]:
        seen: set[tuple[str, ...]] = set()
        stack = [i for n in nodes for i in n.input if i]
        while stack:
            name = stack.pop()
            if name in self.inits:
                self.ancestor_inits.add(name)
            node = self.producer.get(name)
            if node is None or _key(node) in seen:
                continue
            seen.add(_key(node))
            stack.extend(i for i in node.input if i)
        # A node of ours writing a name an old node wrote is not the old node's ancestor.
        return seen - {_key(n) for n in self.new_nodes}

    def rename_new_nodes(self) -> None:
        """New nodes take the name they were meant to have where the node that held it is gone."""
        taken = {n.name for n in self.graph.node}
        for node in self.graph.node:
            want = self.wanted.get(_key(node))
            if want and node.name != want and want not in taken:
                taken.discard(node.name)
                node.name = want
                taken.add(want)

    def placed(self) -> set[str]:
        new_keys = {_key(n) for n in self.new_nodes}
        return {n.name for n in self.graph.node if _key(n) in new_keys}

    def leftovers(self) -> tuple[dict[str, int], dict[str, int]]:
        """Quantized ops still in the graph: in scope (`left`, not turned back) and outside it, by op type."""
        left: Counter[str] = Counter()
        outside: Counter[str] = Counter()
        new_keys = {_key(n) for n in self.new_nodes}
        for node in self.graph.node:
            if node.op_type not in QUANTIZED_OPS:
                continue
            if _key(node) in new_keys or self.ctx.in_scope(node):
                left[node.op_type] += 1
            else:
                outside[node.op_type] += 1
        return dict(left), dict(outside)


class _Skip(Exception):
    """A quantized op the pass cannot turn back: the message says why."""


def _float_op(op: str) -> str:
    return {"MatMulInteger": "MatMul", "ConvInteger": "Conv", "DynamicQuantizeLSTM": "LSTM",
            "Gather": "Gather", **_QLINEAR_FLOAT}.get(op, op)


def _nbytes(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def dequantized(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int | None) -> np.ndarray:
    """`(q - zp) * scale` in float32, as DequantizeLinear computes it: `scale` and `zp` one value, or one per index
    of `axis`. `axis` None: DynamicQuantizeLSTM's weights [dirs, rows, 4h] with a scale per direction [dirs] or
    per direction and column [dirs, 4h]."""
    scale = np.asarray(scale, np.float32)
    zp = np.zeros((), np.float32) if zp is None else np.asarray(zp).astype(np.float32)

    def shaped(v: np.ndarray) -> np.ndarray:
        if v.size == 1:
            return v.reshape(())
        if axis is None:
            return v.reshape(v.shape[0], 1, -1 if v.ndim == 2 else 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        return v.reshape(shape)

    return ((q.astype(np.float32) - shaped(zp)) * shaped(scale)).astype(np.float32)
