"""ONNX Runtime's quantizers on a model too large for one proto: its weights stay in their external-data files.

ORT's quantizers hold a model several times over: they load it with its weights, copy it to run shape
inference on the copy (`save_and_reload_model_with_shape_infer`), and static calibration loads it once more
and maps it again in a session. On a 2.4 GB model, `quantize_dynamic` and `quantize_static` each peaked at
7.1 GB of RSS (3x). Within `light_quantizers` they see the light proto instead (megabytes): shape inference
runs on it as it is, a weight is read from its file when they ask for its value (all of them go through
`onnx.numpy_helper.to_array`, or `onnx_ir` for MatMulNBits), and the calibration session maps the weights
(`onnx_io.session`). What ORT computes is unchanged; only where the bytes come from is. The quantizers must
not be told `use_external_data_format`: their output then holds what they made and keeps pointing at the
weights they did not change, in `weights_dir`. (The weights are read from `weights_dir` wherever the proto's
file lies: onnx refuses to read external data through a hard link, so none is staged.)
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import onnx
import onnx_ir
import onnxruntime as ort

from pipeline.core.onnx_io import SHARED, session

_MODULES = ("quant_utils", "quantize", "base_quantizer", "onnx_quantizer", "calibrate")


@contextlib.contextmanager
def light_quantizers(weights_dir: Path) -> Iterator[None]:
    """While open, onnxruntime.quantization works on light protos whose weights lie in `weights_dir`."""
    ort_q = {name: importlib.import_module(f"onnxruntime.quantization.{name}") for name in _MODULES}
    read = onnx.numpy_helper.to_array

    def to_array(tensor: onnx.TensorProto, base_dir: str = ""):
        return read(tensor, base_dir or str(weights_dir))  # (onnx reads external bytes without changing `tensor`)

    ir_read = onnx_ir.serde.deserialize_tensor

    def ir_tensor(proto: onnx.TensorProto, base_path: str = ""):  # the MatMulNBits quantizer reads through onnx_ir
        return ir_read(proto, base_path or str(weights_dir))

    def with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
        # What `save_and_reload_model_with_shape_infer` returns (a copy, shapes inferred, marked), without the
        # round trip through a file that would load every weight.
        inferred = onnx.shape_inference.infer_shapes(model)
        ort_q["quant_utils"].add_infer_metadata(inferred)
        return inferred

    def load(path: Path) -> onnx.ModelProto:
        return with_shapes(onnx.load(str(path), load_external_data=False))

    def calibration_session(calibrater) -> None:
        # Graph order: each tensor's ReduceMin/ReduceMax run right after it is made, not at the end with every
        # tensor held. One shared arena: sentences of many lengths fragment a session's own arena run by run
        # (static INT8 on the float Kokoro: +60 MB a sentence, 2.6 GB in all).
        calibrater.infer_session = session(calibrater.model, optimization=ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                           weights_dir=weights_dir, arena=SHARED, in_graph_order=True)

    patches = [mock.patch.object(onnx.numpy_helper, "to_array", to_array),
               mock.patch.object(onnx_ir.serde, "deserialize_tensor", ir_tensor),
               mock.patch.object(ort_q["calibrate"].CalibraterBase, "create_inference_session", calibration_session),
               *(mock.patch.object(ort_q[m], "load_model_with_shape_infer", load) for m in ("quantize", "calibrate")),
               *(mock.patch.object(ort_q[m], "save_and_reload_model_with_shape_infer", with_shapes)
                 for m in ("quant_utils", "quantize", "base_quantizer", "onnx_quantizer"))]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield
