"""The registry of passes: one module each, listed here explicitly."""
from __future__ import annotations

import sys
import typing

from pipeline.core.errors import PipelineError

from .base import Pass
from .compress_weights import CompressWeights
from .convtranspose_to_conv import ConvTransposeToConv
from .dequantize import Dequantize
from .fp16 import Fp16
from .fuse_attention import FuseAttention
from .fuse_matmuls import FuseMatmuls
from .pin import Pin
from .quantize import Quantize
from .simplify import Simplify
from .split import Split

PASSES: dict[str, type[Pass]] = {cls.name: cls for cls in (Dequantize, Simplify, FuseAttention, FuseMatmuls,
                                                            ConvTransposeToConv, Fp16, Quantize, CompressWeights, Split,
                                                            Pin)}


def get_pass(name: str, where: str = "step") -> Pass:
    if name not in PASSES:
        raise PipelineError(f"{where}: unknown pass {name!r} (known passes: {', '.join(sorted(PASSES))})")
    return PASSES[name]()


def summary(cls: type[Pass]) -> str:
    """What a pass does, in one line: the first line of its docstring (else of its module's)."""
    doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def type_name(annotation) -> str:
    """`Literal['a', 'b']` -> `a|b`, `list[str] | None` -> `list[str] | None`."""
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type) and typing.get_origin(annotation) is None:
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def default_text(field, quote: str = "") -> str:
    """`required`, or `default X` with the value a missing key gets (`quote`: around X, e.g. a backtick)."""
    if field.is_required():
        return "required"
    return f"default {quote}{field.get_default(call_default_factory=True)!r}{quote}"


def markdown_table() -> str:
    """The README's pass table (between its `<!-- passes:begin -->` and `<!-- passes:end -->` markers),
    made from the registry: `pipeline passes --markdown` prints it."""
    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    lines = ["| pass | what it does | parameters | scope |", "|---|---|---|---|"]
    for name, cls in PASSES.items():  # registry order: the order recipes usually run them in
        what = summary(cls).removeprefix(f"{name}: ")
        params = []
        for field_name, field in cls.Params.model_fields.items():
            params.append(f"`{field_name}` (`{type_name(field.annotation)}`, {default_text(field, '`')}): "
                          f"{field.description or ''}")
        lines.append(f"| `{name}` | {cell(what[:1].upper() + what[1:])} | {cell('<br>'.join(params)) or '-'} | "
                     f"{'scoped' if cls.scoped else 'whole graph'} |")
    return "\n".join(lines) + "\n"
