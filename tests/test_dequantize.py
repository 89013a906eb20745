"""The dequantize pass on tiny models quantized by ONNX Runtime (dynamic, static QDQ, static QOperator), run
through real ONNX Runtime sessions, and on the real Kokoro-82M INT8 export (e2e)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from passes import get_pass
from passes.base import PassContext
from passes.dequantize import QUANTIZED_OPS
from pipeline.core.blocks import BlockPartition
from pipeline.core.errors import PipelineError
from pipeline.core.onnx_io import session
from pipeline.core.recipe import Scope

node = helper.make_node


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "tiny", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _weights(seed: int):
    rng = np.random.default_rng(seed)
    inits = []

    def weight(name: str, shape: tuple[int, ...], scale: float = 0.3) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    return inits, weight


def token_net() -> onnx.ModelProto:
    """tokens -> /emb Gather -> /fc MatMul+Add+Relu -> /conv Conv -> /lstm bidirectional LSTM -> y; the embedding
    is also an output (`emb`), so ORT's dynamic quantizer writes Gather -> DequantizeLinear for it."""
    inits, w = _weights(0)
    nodes = [
        node("Gather", [w("emb.weight", (20, 8), 1.0), "tokens"], ["/emb/Gather_output_0"], name="/emb/Gather"),
        node("Mul", ["/emb/Gather_output_0", w("emb.gain", (8,))], ["emb"], name="/emb/Mul"),
        node("MatMul", ["/emb/Gather_output_0", w("fc.weight", (8, 16))], ["/fc/MatMul_output_0"], name="/fc/MatMul"),
        node("Add", ["/fc/MatMul_output_0", w("fc.bias", (16,))], ["/fc/Add_output_0"], name="/fc/Add"),
        node("Relu", ["/fc/Add_output_0"], ["/fc/Relu_output_0"], name="/fc/Relu"),
        node("Transpose", ["/fc/Relu_output_0"], ["/conv/Transpose_output_0"], name="/conv/Transpose", perm=[0, 2, 1]),
        node("Conv", ["/conv/Transpose_output_0", w("conv.weight", (8, 16, 3)), w("conv.bias", (8,))],
             ["/conv/Conv_output_0"], name="/conv/Conv", pads=[1, 1]),
        node("Transpose", ["/conv/Conv_output_0"], ["/lstm/Transpose_output_0"], name="/lstm/Transpose",
             perm=[2, 0, 1]),
        node("LSTM", ["/lstm/Transpose_output_0", w("lstm.W", (2, 24, 8)), w("lstm.R", (2, 24, 6)),
                      w("lstm.B", (2, 48), 0.1)], ["y"], name="/lstm/LSTM", hidden_size=6, direction="bidirectional"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, "T"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", 2, 1, 6]),
                   helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, "T", 8])], inits)


def float_net() -> onnx.ModelProto:
    """x [1, T, 8] -> /fc MatMul+Add+Relu -> /conv Conv -> y: what static quantization takes (a float input)."""
    inits, w = _weights(1)
    nodes = [
        node("MatMul", ["x", w("fc.weight", (8, 16))], ["/fc/MatMul_output_0"], name="/fc/MatMul"),
        node("Add", ["/fc/MatMul_output_0", w("fc.bias", (16,))], ["/fc/Add_output_0"], name="/fc/Add"),
        node("Relu", ["/fc/Add_output_0"], ["/fc/Relu_output_0"], name="/fc/Relu"),
        node("Transpose", ["/fc/Relu_output_0"], ["/conv/Transpose_output_0"], name="/conv/Transpose", perm=[0, 2, 1]),
        node("Conv", ["/conv/Transpose_output_0", w("conv.weight", (8, 16, 3)), w("conv.bias", (8,))], ["y"],
             name="/conv/Conv", pads=[1, 1]),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, "T"])], inits)


def token_feeds(seed: int = 7) -> dict:
    return {"tokens": np.random.default_rng(seed).integers(0, 20, (1, 12)).astype(np.int64)}


def x_feeds(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 10 + 2 * i, 8)).astype(np.float32)} for i in range(n)]


class Reader(CalibrationDataReader):
    def __init__(self, feeds: list[dict]):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def quantized(model: onnx.ModelProto, tmp_path: Path, mode: str, per_channel: bool = False) -> onnx.ModelProto:
    src, out = tmp_path / "float.onnx", tmp_path / f"{mode}.onnx"
    onnx.save(model, src)
    if mode == "dynamic":
        quantize_dynamic(src, out, per_channel=per_channel, weight_type=QuantType.QInt8)
    else:
        quantize_static(src, out, Reader(x_feeds(6, seed=1)), per_channel=per_channel,
                        quant_format=QuantFormat.QDQ if mode == "qdq" else QuantFormat.QOperator)
    return onnx.load(out)


def dequantize(model: onnx.ModelProto, tmp_path: Path, params: dict | None = None, scope: Scope | None = None,
               log=None):
    blocks = BlockPartition(model)
    selected = None if scope is None else blocks.select(scope)
    p = get_pass("dequantize")
    ctx = PassContext("model", blocks, selected, tmp_path, log=log or (lambda msg: None))
    return p.apply(model, p.Params.model_validate(params or {}), ctx)


def ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def with_weights_of(model: onnx.ModelProto, source: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (the float original) with every weight replaced by `source`'s initializer of the same name."""
    theirs = {t.name: t for t in source.graph.initializer}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.dims and t.data_type == TensorProto.FLOAT and t.name in theirs and t.name != "emb.gain":
            t.CopyFrom(theirs[t.name])
    return out


def sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    """inf when identical (the embedding output: the same table values, no activation rounding on that path)."""
    with np.errstate(divide="ignore"):
        return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - out).astype(np.float64) ** 2)))


def check_float(original: onnx.ModelProto, back: onnx.ModelProto, weights: list[str], shared_bias: bool = False):
    """No quantized op and only float weights are left; every weight came back under its own name, on an 8-bit grid
    (within one step of the original: the INT8 values times scale, nothing more); the graph is the original's."""
    assert not ops(back) & QUANTIZED_OPS, ops(back) & QUANTIZED_OPS
    assert all(t.data_type in (TensorProto.FLOAT, TensorProto.INT64) for t in back.graph.initializer)
    before = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in back.graph.initializer}
    for name in weights:
        assert after[name].shape == before[name].shape, name
        step = (before[name].max() - min(before[name].min(), 0)) / 127  # at least one int8 step of any 8-bit grid
        err = np.abs(after[name] - before[name]).max()
        assert 0 < err <= step, f"{name}: off by {err}, one step is {step}"  # rounded, by at most a step


# --- dynamic quantization -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_channel", [False, True])
def test_dynamic_model_comes_back_float(tmp_path, per_channel):
    model = token_net()
    q = quantized(model, tmp_path, "dynamic", per_channel)
    assert {"MatMulInteger", "ConvInteger", "DynamicQuantizeLSTM", "DequantizeLinear"} <= ops(q)
    result = dequantize(q, tmp_path)
    back = result.model
    check_float(model, back, ["emb.weight", "fc.weight", "conv.weight", "lstm.W", "lstm.R"])
    assert result.stats["turned_back"] == {"MatMulInteger": 1, "ConvInteger": 1, "DynamicQuantizeLSTM": 1,
                                           "DequantizeLinear": 1}
    assert result.stats["left"] == {} and result.stats["nodes_turned_back"] == 4
    assert result.stats["weight_bytes_after"] > result.stats["weight_bytes_before"] > 0
    names = {n.name for n in back.graph.node}
    assert {"/fc/MatMul", "/conv/Conv", "/lstm/LSTM"} <= names  # named as the nodes they replaced: same blocks
    feeds = token_feeds()
    got = session(back).run(None, feeds)
    # The dequantized graph is the float original computing on the dequantized weights, to float rounding.
    want = session(with_weights_of(model, back)).run(None, feeds)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    # Against the INT8 model, only the activations' run-time 8-bit rounding differs (the weights are the same
    # values): 44-45 dB measured on `y` (ORT 1.32), inf on `emb` (no activation rounding on that path); 35 dB
    # leaves margin, while a wrong weight layout, scale axis or a lost bias falls far below it (near 0 dB).
    for g, i in zip(got, session(q).run(None, feeds)):
        assert sqnr(i, g) > 35


def test_dynamic_scope_turns_back_only_the_block(tmp_path):
    q = quantized(token_net(), tmp_path, "dynamic")
    result = dequantize(q, tmp_path, scope=Scope(include=["/conv"]))
    back = result.model
    assert result.stats["turned_back"] == {"ConvInteger": 1}
    assert result.stats["turned_back_per_block"] == {"/conv": 1}
    assert result.stats["outside_scope"]["MatMulInteger"] == 1
    assert result.stats["outside_scope"]["DynamicQuantizeLSTM"] == 1
    assert {"MatMulInteger", "DynamicQuantizeLSTM"} <= ops(back) and "ConvInteger" not in ops(back)
    assert "/conv/Conv" in result.placed
    session(back).run(None, token_feeds())


def test_expect_min_nodes_fails_the_step(tmp_path):
    q = quantized(token_net(), tmp_path, "dynamic")
    with pytest.raises(PipelineError, match="expected at least 5 quantized ops turned back, got 4"):
        dequantize(q, tmp_path, {"expect_min_nodes": 5})
    assert dequantize(q, tmp_path, {"expect_min_nodes": 4}).changed


def test_what_it_cannot_turn_back_is_reported_and_logged(tmp_path):
    """A DequantizeLinear of an 8-bit graph input has no float value to go back to."""
    model = _model([node("DequantizeLinear", ["x", "s", "zp"], ["y"], name="/in/DequantizeLinear")],
                   [helper.make_tensor_value_info("x", TensorProto.UINT8, [4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                   [numpy_helper.from_array(np.array(0.5, np.float32), "s"),
                    numpy_helper.from_array(np.array(3, np.uint8), "zp")])
    logged: list[str] = []
    result = dequantize(model, tmp_path, log=logged.append)
    assert result.stats["left"] == {"DequantizeLinear": 1} and not result.changed
    assert len(logged) == 1 and "could not turn back 1 DequantizeLinear" in logged[0] and "graph input" in logged[0]


# --- static quantization --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["qdq", "qoperator"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_static_model_comes_back_float(tmp_path, mode, per_channel):
    model = float_net()
    q = quantized(model, tmp_path, mode, per_channel)
    assert ("QLinearConv" in ops(q)) == (mode == "qoperator")
    result = dequantize(q, tmp_path)
    back = result.model
    check_float(model, back, ["fc.weight", "conv.weight"])
    assert result.stats["left"] == {}
    # ORT folded the Relu into the 8-bit grid that starts at 0; it comes back as a Relu.
    assert sorted(n.op_type for n in back.graph.node) == ["Add", "Conv", "MatMul", "Relu", "Transpose"]
    x = x_feeds(1, seed=9)[0]
    got = session(back).run(None, x)[0]
    want = session(with_weights_of(model, back)).run(None, x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Against the INT8 model: only its static 8-bit activations (calibrated ranges) differ, 35.6-36.6 dB measured
    # (ORT 1.32); 30 dB leaves margin, while a lost Relu or bias, or a wrong scale, falls far below it.
    assert sqnr(session(q).run(None, x)[0], got) > 30


# --- the real Kokoro-82M INT8 export ---------------------------------------------------------------------------------

_RSS_SCRIPT = """
import json, sys
from pathlib import Path
import onnx
from passes import get_pass
from pipeline.core.procinfo import peak_rss_mb
from passes.base import PassContext
from pipeline.core.blocks import BlockPartition
model = onnx.load(sys.argv[1])
p = get_pass("dequantize")
result = p.apply(model, p.Params(expect_min_nodes=245), PassContext("model", BlockPartition(model), None, Path(sys.argv[3])))
del model
onnx.save(result.model, sys.argv[2])
stats = dict(result.stats, peak_rss=int(peak_rss_mb() * 2**20))  # VmHWM: ru_maxrss carries the parent's over exec
print(json.dumps(stats))
"""


@pytest.mark.e2e
def test_kokoro_int8_comes_back_fp32(tmp_path):
    from calibration.kokoro_inputs import kokoro_data, kokoro_model

    source = kokoro_model(tmp_path / "kokoro")
    out = tmp_path / "kokoro-fp32.onnx"
    # In a child process, so its peak RSS is the pass's (with loading and saving): under 4x the file + 1 GB.
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(source), str(out), str(tmp_path)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["peak_rss"] < 4 * source.stat().st_size + 1024**3, stats["peak_rss"]
    assert stats["turned_back"] == {"MatMulInteger": 148, "ConvInteger": 87, "DynamicQuantizeLSTM": 6,
                                    "DequantizeLinear": 4}
    assert stats["left"] == {} and stats["nodes_after"] == 2366
    back = onnx.load(out)
    kinds = ops(back)
    assert not kinds & {"MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "DynamicQuantizeLSTM",
                        "DequantizeLinear"}
    assert {"FastGelu", "SkipLayerNormalization", "FusedMatMul", "LSTM"} <= kinds  # ORT's fused float ops stay
    # Every weight is FP32: no 8-bit initializer is left (int64 position ids and shapes stay int64).
    types = {t.data_type for t in back.graph.initializer if len(t.dims) >= 2}
    assert types <= {TensorProto.FLOAT, TensorProto.INT64} and not {TensorProto.INT8, TensorProto.UINT8} & \
        {t.data_type for t in back.graph.initializer}
    assert 320e6 < out.stat().st_size < 330e6  # ~325.5 MB of FP32

    vocab = json.loads(kokoro_data("vocab.json").read_text())["vocab"]
    ids = [vocab[c] for c in "konnitɕiwa, kyoːwa iː tenki desu ne." if c in vocab]
    style = np.load(kokoro_data("voices_ja.npz"))["jf_alpha"][len(ids)].reshape(1, 256).astype(np.float32)
    feeds = {"tokens": np.array([[0, *ids, 0]], np.int64), "style": style, "speed": np.array([1.0], np.float32)}
    int8 = session(source).run(None, feeds)[0].reshape(-1)
    fp32 = session(out).run(None, feeds)[0].reshape(-1)
    # Same durations here: the same number of 24 kHz samples. Durations are rounded, so the activation rounding
    # that is gone can flip one: with "kʲoːwa" for "kyoːwa" the FP32 graph is one frame (600 samples) shorter.
    assert int8.size == fp32.size
    from pipeline.core.audio import log_mel_distance

    # Measured 0.19 (ORT 1.32, CPU): the INT8 model's run-time activation rounding, gone here. The waveform SQNR
    # is about -2 dB and means nothing: the harmonic source's phase follows F0, which moves a little. A wrong weight
    # layout or scale would be garbled speech, log-mel well above 1.
    assert log_mel_distance(int8, fp32, sr=24000) < 0.3
