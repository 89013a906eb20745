"""GGUF files from named numpy tensors, family-free: the type rules, the writer and a reader (gguf-py).

A family's GGUF target lists its tensors as `(name, array, wanted type)`, the array in numpy order with matrices
[out, in] (so GGUF's `ne` is [in, out], as llama.cpp stores them), and this module writes them:
- 1-D tensors (norms, biases) are always F32, whatever was asked;
- Q8_0 and Q4_0 quantize rows in blocks of 32: a matrix whose rows are not a multiple of 32 long is stored F16
  instead, and the writer says so (one note per file);
- `general.file_type` is the type that holds the most matrix parameters (llama.cpp's `LlamaFileType`), and
  `general.quantization_version` is written when any tensor is quantized.
Precision choices of the ONNX steps (`pipeline.formats.targets.weight_precision`) map to types by `PRECISION_TYPE`;
int4 becomes Q4_0 where gguf-py can quantize it in numpy, else Q8_0 (`int4_type` says which).
gguf is an optional package: every function here takes the module, imported by the caller with
`pipeline.formats.targets.require_module`.

The check of a `gguf` target (`check_layers`) runs each decoder layer of a file as a numpy forward pass, in
float64, from the file's dequantized tensors alone (`FileTensors`: each dequantized once, kept while its layer is
checked), fed the FP32 ONNX layer's own inputs, and pools the SQNR of the layer's outputs over the check's inputs,
as the ONNX result's per-block check does (isolated). The family supplies the layer's forward pass (built on
`attend`, `rms_norm`, `layer_norm` here) and the reference's inputs and outputs of each layer.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.core import progress
from pipeline.core.onnx_io import parse_graph
from pipeline.evaluation.results import FormatResult

if TYPE_CHECKING:
    from pipeline.formats.targets import FormatInputs

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


Grouped = Iterable[tuple[str, np.ndarray, str]]  # (GGUF name, array, the ONNX graph or block its type follows)


def write_grouped(path: Path, arch: str, metadata: dict[str, Any], tensors: Grouped,
                  qtype_for: str | Picker) -> Written:
    """Write a family's tensors; `qtype_for` is a type (f32, f16, q8_0, q4_0) or a function of a tensor's group
    giving one (1-D tensors are F32 whatever it says)."""
    from pipeline.formats.targets import require_module

    gguf = require_module("gguf", "gguf", "format 'gguf'")
    pick = (lambda group: qtype_for) if isinstance(qtype_for, str) else qtype_for
    typed = ((name, array, pick(group) if array.ndim >= 2 else "f32") for name, array, group in tensors)
    return write_file(gguf, Path(path), arch, metadata, typed)


def matrix_groups(tensors: Grouped) -> list[str]:
    """The groups whose precision `auto` reads: each one holds matrices of the file."""
    return list(dict.fromkeys(group for _, array, group in tensors if array.ndim >= 2))


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
    return parse_graph(final.path(name))


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


def write_files(job: Any, stem: str, weights: Any, write_one: Callable[[Any, Path, str | Picker], Written],
                auto_plan: Callable[[ModuleType, Any, Any], tuple[dict[str, str], list[str]]]) -> list[Path]:
    """The files of a family's `gguf` target job, from its PyTorch `weights`: `<stem>-<type>.gguf` per fixed type,
    then the `auto` file (`auto_plan(gguf, weights, final)`), named by its one type or `mixed`; an auto file that
    equals a fixed one already written is not written twice."""
    from pipeline.formats.targets import require_module

    gguf = require_module("gguf", "gguf", "format 'gguf'")
    if weights.seeded:
        job.notes.append(f"gguf: written from {weights.source}, untrained (general.description says so)")

    def write(path: Path, pick: str | Picker) -> Written:
        return write_one(weights, path, pick)

    paths: list[Path] = []
    job.dest.mkdir(parents=True, exist_ok=True)
    fixed = [t for t in job.params.types if t != "auto"]
    for kind in fixed:
        path = job.dest / f"{stem}-{kind}.gguf"
        job.notes.extend(write(path, kind).notes)
        paths.append(path)
    if "auto" in job.params.types:
        plan, notes = auto_plan(gguf, weights, job.final)
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


# -- the check: decoder layers as numpy forward passes from the file -------------------------------------------------
class Tensors(Protocol):
    """What a layer's forward pass reads: a tensor's values (numpy order, float64) and a metadata value."""

    def __call__(self, name: str) -> np.ndarray: ...

    def meta(self, key: str) -> Any: ...


class FileTensors:
    """A GGUF file's tensors for numpy forward passes: each dequantized once, as float64, and kept until `forget`
    (a check drops a layer's tensors once every input has been through it, so one layer is held at a time)."""

    def __init__(self, gguf: ModuleType, path: Path):
        self.path = Path(path)
        self.contents = read_file(gguf, self.path)
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = self.contents.array(name).astype(np.float64)
        return self._cache[name]

    def meta(self, key: str) -> Any:
        return self.contents.metadata[key]

    def forget(self, prefix: str = "") -> None:
        """Drop the cached tensors whose names start with `prefix` (all by default)."""
        for name in [n for n in self._cache if n.startswith(prefix)]:
            del self._cache[name]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, past_k: np.ndarray, past_v: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Causal attention of S new positions after P cached ones; q, k, v [H, S, D], past [H, P, D].
    Returns the heads' output [S, H*D] and the present key and value [H, P+S, D]."""
    p, s, d = past_k.shape[1], q.shape[1], q.shape[2]
    key, value = np.concatenate([past_k, k], 1), np.concatenate([past_v, v], 1)
    scores = q @ key.transpose(0, 2, 1) / np.sqrt(d)
    scores[:, np.arange(p + s)[None, :] > np.arange(p, p + s)[:, None]] = -np.inf
    out = softmax(scores) @ value
    return out.transpose(1, 0, 2).reshape(s, -1), key, value


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return weight * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


# One input of a layer: the forward pass's arguments after (file, layer), and the FP32 ONNX layer's outputs on it,
# in the order the forward pass returns its own.
Case = tuple[tuple[Any, ...], Sequence[np.ndarray]]
Forward = Callable[..., Sequence[np.ndarray]]  # (tensors, layer, *args) -> outputs


def check_layers(gguf: ModuleType, inputs: FormatInputs, compared: str, total: int,
                 layers: Iterable[tuple[int, list[Case]]], forward: Forward,
                 unfit: Callable[[FileTensors], str | None] = lambda f: None) -> list[FormatResult]:
    """Every .gguf file of `inputs`, layer by layer: `layers` yields (layer index, its cases) in order, `total` of
    them; each file runs `forward` on every case, and the SQNR of its outputs against the ONNX layer's is pooled
    over the cases and outputs (as the ONNX check pools a block's outputs). A file's result is its lowest layer's,
    named by its GGUF prefix (`blk.N`); a file `unfit` says why (another config) is not checked, with that note."""
    from pipeline.evaluation.blockwise import Pooled

    names = [n for n in inputs.files if n.endswith(".gguf")]
    files = {name: FileTensors(gguf, inputs.folder / name) for name in names}
    skipped = {name: why for name, f in files.items() if (why := unfit(f))}
    pooled: dict[str, dict[str, Pooled]] = {name: {} for name in names}
    for n, cases in progress.track(layers, "check: gguf, decoder layers", total=total):
        prefix = f"blk.{n}"
        for name, f in files.items():
            if name in skipped or not cases:
                continue
            p = pooled[name][prefix] = Pooled()
            for args, refs in cases:
                for ref, got in zip(refs, forward(f, n, *args), strict=True):
                    p.update(ref, got)
            f.forget(prefix + ".")
    results = []
    for name in names:
        if name in skipped or not pooled[name]:
            results.append(FormatResult(format="gguf", file=name, compared=compared,
                                        note=skipped.get(name, "no decoder layer was fed")))
            continue
        worst, p = min(pooled[name].items(), key=lambda kv: kv[1].sqnr_db)
        mismatched = sum(q.shape_mismatches for q in pooled[name].values())
        note = f"{mismatched} layer outputs were of another shape than the ONNX layer's, not compared" \
            if mismatched else None
        results.append(FormatResult(format="gguf", file=name, compared=compared, sqnr_db=p.sqnr_db, worst=worst,
                                    note=note))
    return results


def config_mismatch(f: FileTensors, arch: str, wanted: dict[str, int]) -> str | None:
    """Where the file's `<arch>.<key>` metadata differs from the FP32 reference's config (None: it fits)."""
    found = {k: f.contents.metadata.get(f"{arch}.{k}") for k in wanted}
    differ = [f"{k} {found[k]} (the FP32 ONNX: {v})" for k, v in wanted.items() if found[k] != v]
    return f"the file was written for another config: {', '.join(differ)}" if differ else None
