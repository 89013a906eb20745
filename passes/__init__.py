"""The registry of passes: one module each, listed here explicitly."""
from __future__ import annotations

from pipeline.errors import PipelineError

from .base import Pass
from .compress_weights import CompressWeights
from .fp16 import Fp16
from .fuse_attention import FuseAttention
from .pin import Pin
from .quantize import Quantize
from .simplify import Simplify
from .split import Split

PASSES: dict[str, type[Pass]] = {cls.name: cls for cls in (Simplify, FuseAttention, Fp16, Quantize, CompressWeights,
                                                            Split, Pin)}


def get_pass(name: str, where: str = "step") -> Pass:
    if name not in PASSES:
        raise PipelineError(f"{where}: unknown pass {name!r} (known passes: {', '.join(sorted(PASSES))})")
    return PASSES[name]()
