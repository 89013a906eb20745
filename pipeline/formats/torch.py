"""TorchScript and Core ML from a PyTorch module with one input whose last axis (time) varies.

Family-free: a family's target writer loads its module and calls these. Tracing bakes in nothing
shape-dependent for convolutional models, but a trace can silently freeze a length; so every trace is
checked on a second length against the eager module before it is saved. coremltools is an optional
package (`tts-onnx-pipeline[coreml]`); its converter's error names the PyTorch op it could not convert,
and that name is what the user reads.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import PipelineError, one_line
from pipeline.core.audio import sqnr_db
from pipeline.formats.targets import require_module

# A traced module must reproduce the eager one at another length; FP32 both sides, so far above any loss.
TRACE_MIN_SQNR_DB = 100.0


@contextlib.contextmanager
def _jit():
    """torch.jit warns that it is deprecated (use torch.export): TorchScript is still what LibTorch loads.
    (A trace's own warnings go too: `trace` checks the result itself.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def trace(module: torch.nn.Module, example: torch.Tensor, what: str) -> torch.jit.ScriptModule:
    """`torch.jit.trace` of `module` on `example`, proven on a longer input that the time axis stays free."""
    module = module.eval()
    longer = torch.randn(*example.shape[:-1], example.shape[-1] + 37, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), _jit():
        traced = torch.jit.trace(module, example, check_trace=False)
        got, want = traced(longer), module(longer)
    if got.shape != want.shape or sqnr_db(want.numpy(), got.numpy()) < TRACE_MIN_SQNR_DB:
        raise PipelineError(f"{what}: the traced module does not follow the time axis (at {longer.shape[-1]} "
                            f"frames it gives {list(got.shape)}, eager {list(want.shape)})")
    return traced


def save_torchscript(traced: torch.jit.ScriptModule, path: Path, meta: dict[str, Any]) -> None:
    """Save with `meta` as the extra file `pipeline.json` (LibTorch reads it with `_extra_files`)."""
    with _jit():
        torch.jit.save(traced, str(path), _extra_files={"pipeline.json": json.dumps(meta, sort_keys=True)})


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """A saved module, as LibTorch would load it."""
    with _jit():
        return torch.jit.load(str(path)).eval()


def coreml_convert(traced: torch.jit.ScriptModule, input_name: str, fixed_shape: tuple[int, ...],
                   frames: tuple[int, int, int], output_name: str, fp16: bool, deployment_target: str) -> Any:
    """An ML program: input `input_name` of shape `fixed_shape + (frames,)` with frames in [min, max]
    (default the third), FP32 in and out, FP16 or FP32 compute."""
    ct = _import_coremltools()
    low, high, default = frames
    inputs = [ct.TensorType(name=input_name, dtype=np.float32,
                            shape=(*fixed_shape, ct.RangeDim(lower_bound=low, upper_bound=high, default=default)))]
    try:
        with _quiet():
            return ct.convert(traced, inputs=inputs, outputs=[ct.TensorType(name=output_name, dtype=np.float32)],
                              convert_to="mlprogram",
                              compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
                              minimum_deployment_target=getattr(ct.target, deployment_target))
    except Exception as e:  # coremltools' own errors carry the op: "convert function for op 'erfinv' ..."
        message = one_line(e)
        op = re.search(r"op '([^']+)'", message)
        at = f"op {op.group(1)!r} failed to convert" if op else "conversion failed"
        raise PipelineError(f"format 'coreml': {at}: {message}") from None


def coreml_ops(mlmodel: Any) -> Counter:
    """Operation types of an ML program's main function (constants included, as the spec has them)."""
    spec = mlmodel.get_spec()
    return Counter(op.type for fn in spec.mlProgram.functions.values()
                   for block in fn.block_specializations.values() for op in block.operations)


def _import_coremltools() -> Any:
    with _quiet():  # on Linux it says, at import, that it cannot run models: the README says so once
        return require_module("coremltools", "coreml", "format 'coreml'")


@contextlib.contextmanager
def _quiet():
    """coremltools' progress bars, version warnings and import notices: noise in our output."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
