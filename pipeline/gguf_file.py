"""GGUF files from named numpy tensors, family-free: the type rules, the writer and a reader (gguf-py).

A family's GGUF target lists its tensors as `(name, array, wanted type)`, the array in numpy order with matrices
[out, in] (so GGUF's `ne` is [in, out], as llama.cpp stores them), and this module writes them:
- 1-D tensors (norms, biases) are always F32, whatever was asked;
- Q8_0 and Q4_0 quantize rows in blocks of 32: a matrix whose rows are not a multiple of 32 long is stored F16
  instead, and the writer says so (one note per file);
- `general.file_type` is the type that holds the most matrix parameters (llama.cpp's `LlamaFileType`), and
  `general.quantization_version` is written when any tensor is quantized.
Precision choices of the ONNX steps (`pipeline.targets.weight_precision`) map to types by `PRECISION_TYPE`;
int4 becomes Q4_0 where gguf-py can quantize it in numpy, else Q8_0 (`int4_type` says which).
gguf is an optional package: every function here takes the module, imported by the caller with
`pipeline.targets.require_module`.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, Field, field_validator

TYPES = ("f32", "f16", "q8_0", "q4_0")
BLOCKED = ("q8_0", "q4_0")  # quantized in blocks of 32 along a row
BLOCK = 32
PRECISION_TYPE = {"fp32": "f32", "fp16": "f16", "int8": "q8_0", "int4": "q4_0"}
# llama.cpp's LlamaFileType values (ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_Q4_0)
FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}
Picker = Callable[[str], str]  # tensor group (an ONNX graph or block) -> wanted type


@dataclass(frozen=True)
class Entry:
    """One tensor as a file holds it: numpy-order shape and GGUF type name (f32, f16, q8_0, q4_0)."""

    name: str
    shape: tuple[int, ...]
    type: str


@dataclass
class Written:
    entries: list[Entry]
    notes: list[str] = field(default_factory=list)  # where a tensor's type differs from the one asked for


def stored_type(shape: tuple[int, ...], wanted: str) -> tuple[str, str | None]:
    """The type a tensor is stored in, and the reason when a matrix cannot have the type asked for."""
    if wanted not in TYPES:
        raise ValueError(f"unknown GGUF type {wanted!r} (known: {', '.join(TYPES)})")
    if len(shape) < 2:
        return "f32", None
    if wanted in BLOCKED and shape[-1] % BLOCK:
        return "f16", f"rows of {shape[-1]} are not a multiple of {BLOCK}"
    return wanted, None


def int4_type(gguf: ModuleType) -> str:
    """q4_0 when this gguf-py quantizes Q4_0 in numpy (0.19 does), else q8_0."""
    try:
        gguf.quants.quantize(np.zeros((1, BLOCK), np.float32), gguf.GGMLQuantizationType.Q4_0)
    except NotImplementedError:
        return "q8_0"
    return "q4_0"


def carried_type(gguf: ModuleType, precision: str) -> str:
    """The GGUF type that keeps an ONNX precision (int4, int8, fp16, fp32) as far as gguf-py can."""
    return int4_type(gguf) if precision == "int4" else PRECISION_TYPE[precision]


def _qtype(gguf: ModuleType, name: str):
    return gguf.GGMLQuantizationType[name.upper()]


def _add_metadata(writer: Any, metadata: dict[str, Any]) -> None:
    # llama.cpp reads lengths and counts as uint32 and epsilons/frequencies as float32.
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            (writer.add_uint32 if value >= 0 else writer.add_int32)(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            raise TypeError(f"GGUF metadata {key}: unsupported value {value!r}")


def _file_type(entries: list[Entry]) -> int:
    params: Counter[str] = Counter()
    for e in entries:
        if len(e.shape) >= 2:
            params[e.type] += int(np.prod(e.shape))
    return FILE_TYPE[params.most_common(1)[0][0]] if params else FILE_TYPE["f32"]


def write_file(gguf: ModuleType, path: Path, arch: str, metadata: dict[str, Any],
               tensors: Iterable[tuple[str, np.ndarray, str]]) -> Written:
    """Write `tensors` (name, float array in numpy order, wanted type) and `metadata` (full keys; ints as uint32,
    floats as float32) into a GGUF file whose `general.architecture` is `arch`."""
    writer = gguf.GGUFWriter(str(path), arch)
    entries, fallbacks = [], []
    quantized = False
    for name, array, wanted in tensors:
        array = np.ascontiguousarray(array, dtype=np.float32)
        kind, why = stored_type(array.shape, wanted)
        if why:
            fallbacks.append(f"{name} ({why})")
        data = gguf.quants.quantize(array, _qtype(gguf, kind))
        # quantized blocks are bytes: gguf-py needs their type to describe them (it works out the element shape)
        writer.add_tensor(name, data, raw_dtype=_qtype(gguf, kind) if kind in BLOCKED else None)
        quantized |= kind in BLOCKED
        entries.append(Entry(name, tuple(array.shape), kind))
    _add_metadata(writer, {**metadata, "general.file_type": _file_type(entries)})
    if quantized:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    notes = [f"{path.name}: stored as F16, not the block type asked for: {', '.join(fallbacks)}"] if fallbacks else []
    return Written(entries, notes)


@dataclass
class Contents:
    """A GGUF file read back: its metadata values, its tensors (in file order) and their dequantized values."""

    metadata: dict[str, Any]
    entries: list[Entry]
    _tensors: dict[str, Any]
    _gguf: ModuleType

    def array(self, name: str) -> np.ndarray:
        """The tensor's values as float32, in numpy order (matrices [out, in])."""
        t = self._tensors[name]
        shape = tuple(int(n) for n in reversed(t.shape))
        return np.asarray(self._gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)


def read_file(gguf: ModuleType, path: Path) -> Contents:
    """A GGUF file read back with gguf-py's reader (shapes turned from GGUF's ne order into numpy's)."""
    reader = gguf.GGUFReader(str(path))
    metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    entries = [Entry(t.name, tuple(int(n) for n in reversed(t.shape)), t.tensor_type.name.lower())
               for t in reader.tensors]
    return Contents(metadata, entries, tensors, gguf)


def file_label(types: Iterable[str]) -> str:
    """What a file is called by: its one matrix type, or `mixed`."""
    found = set(types)
    return found.pop() if len(found) == 1 else "mixed"


def graph_proto(final: Any, name: str) -> onnx.ModelProto:
    """A graph of the ONNX result without its weights' bytes: a precision is read off the initializers' types."""
    return onnx.load(str(final.path(name)), load_external_data=False)


def plan_from_precisions(gguf: ModuleType, precisions: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Tensor group -> GGUF type, from group -> ONNX weight precision; a note where int4 cannot carry over."""
    plan = {g: carried_type(gguf, p) for g, p in precisions.items()}
    lost = [g for g, p in precisions.items() if p == "int4" and plan[g] != "q4_0"]
    notes = [f"gguf: the 4-bit choice of {', '.join(lost)} did not carry over: this gguf-py cannot quantize Q4_0 "
             f"in numpy, so they are Q8_0"] if lost else []
    return plan, notes


def describe_plan(plan: dict[str, str], most: int = 6) -> str:
    """`Q8_0: layer_01; F32: 5 groups`: which group got which type, the common type counted, not listed."""
    by_type: dict[str, list[str]] = {}
    for group, kind in plan.items():
        by_type.setdefault(kind, []).append(group)
    parts = [f"{kind.upper()}: " + (", ".join(groups) if len(groups) <= most else f"{len(groups)} groups")
             for kind, groups in sorted(by_type.items(), key=lambda kv: len(kv[1]))]
    return "; ".join(parts)



class GGUFParams(BaseModel):
    """The `gguf` target's parameters (the same for every family that writes GGUF)."""

    model_config = ConfigDict(extra="forbid")

    types: list[Literal["f32", "f16", "q8_0", "auto"]] = Field(
        default_factory=lambda: ["auto"], min_length=1,
        description="One .gguf file per entry. f32, f16, q8_0: every matrix in that type (norms and biases stay "
                    "F32; Q8_0 rows not a multiple of 32 fall back to F16). auto: each decoder layer, embedding and "
                    "head in the type the ONNX steps chose for it (int8 -> Q8_0, int4 -> Q4_0, fp16 -> F16, "
                    "fp32 -> F32); the file is named by its one type, or `mixed`.")

    @field_validator("types")
    @classmethod
    def _unique(cls, types: list[str]) -> list[str]:
        if len(set(types)) != len(types):
            raise ValueError(f"types: each type once (got {types})")
        return types


def write_target(job: Any, gguf: ModuleType, stem: str, write: Callable[[Path, Picker], Written],
                 auto_plan: Callable[[], tuple[dict[str, str], list[str]]]) -> list[Path]:
    """The files of a `gguf` target job: `<stem>-<type>.gguf` per fixed type, then the `auto` file, named by its
    one type or `mixed`; an auto file that equals a fixed one already written is not written twice."""
    paths: list[Path] = []
    job.dest.mkdir(parents=True, exist_ok=True)
    fixed = [t for t in job.params.types if t != "auto"]
    for kind in fixed:
        path = job.dest / f"{stem}-{kind}.gguf"
        job.notes.extend(write(path, lambda group, kind=kind: kind).notes)
        paths.append(path)
    if "auto" in job.params.types:
        plan, notes = auto_plan()
        job.notes.extend(notes)
        path = job.dest / f"{stem}-{file_label(plan.values())}.gguf"
        if path in paths:
            job.notes.append(f"{path.name}: auto carries over {file_label(plan.values()).upper()} everywhere, "
                             f"the same file as the fixed type")
            return paths
        job.notes.extend(write(path, plan.__getitem__).notes)
        job.notes.append(f"{path.name}: the ONNX steps' precision carried over ({describe_plan(plan)})")
        paths.append(path)
    return paths
