"""Calibration sources: real inputs for static quantization and error checks.

A source yields feed dicts (input name -> array) for a graph. Every source's
feeds are checked against the graph's inputs (names, dtypes, ranks) before
any long work starts, so a mismatched folder fails in a second, not after
minutes of calibration.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, Field

from pipeline.core.errors import PipelineError
from pipeline.core.recipe import CountOrAll
from pipeline.core.feeds import Feeds

DATA_DIR = Path(__file__).parent / "data"


class SourceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Marks a source parameter that names a file or folder, relative to the recipe: `Field(..., json_schema_extra=PATH)`.
# Searches make these absolute in the recipes they write elsewhere (`pipeline.families.path_fields`).
PATH = {"path": True}


@dataclass
class SourceContext:
    """What a source may know: the base model file (for sidecars) and how to resolve paths."""

    model_path: Path | None  # None for an exported model set (known only after step 00)
    resolve: Callable[[str], Path] = Path


class CalibrationSource:
    name: ClassVar[str]
    Params: ClassVar[type[SourceParams]] = SourceParams

    # The recipe section the source comes from, for its errors (`{where}.params.count: ...`); set by make_source.
    where: str = "calibration"

    def __init__(self, params: SourceParams, ctx: SourceContext):
        self.params = params
        self.ctx = ctx

    def check(self) -> None:
        """What can be checked before any feed is drawn (files, counts); `make_source` calls it, so a recipe's
        mistake fails in `pipeline validate`, not minutes into a run."""

    def feeds(self) -> Iterator[Feeds]:
        raise NotImplementedError

    # What `feeds()` records as it yields: the text behind each feed, where the source knows it.
    spoken: list[str] | None = None

    def texts(self) -> list[str] | None:
        """The text each feed speaks, in the order the last `feeds()` yielded them, where the source knows it
        (sentences; an npz folder with a texts.txt): what an ASR check scores transcripts against. None where
        it does not (tensors, a vocoder's chunks of mel)."""
        return self.spoken

    def describe(self) -> str:
        return self.name


class SentencesParams(SourceParams):
    # text file, one sentence per line; default: the source's shipped set
    sentences: str | None = Field(default=None, json_schema_extra=PATH)
    count: CountOrAll = Field(
        default="all", description="how many sentences, the first after `skip`: `all` (the default) or a number "
                                   "no larger than the source holds; asking for more is an error, never a silent cap")
    # sentences to leave out first: calibrate on others than the check evaluates on (its first `samples`)
    skip: int = Field(default=0, ge=0)


class SentenceSource(CalibrationSource):
    """A source made from sentences: a text file (`sentences`), or the shipped `default_sentences`.

    `feeds()` records in `spoken` the sentence behind each feed it yields (a sentence without phonemes yields
    none), which `texts()` returns."""

    default_sentences: ClassVar[str]  # a file in calibration/data

    def check(self) -> None:
        self.sentences()

    def sentences(self) -> list[str]:
        p = self.params
        path = self.ctx.resolve(p.sentences) if p.sentences else DATA_DIR / self.default_sentences
        return self.pick(read_sentences(path), path)

    def pick(self, sentences: list[str], path: Path) -> list[str]:
        """`skip` sentences, then `count` of the rest. More than the rest is an error naming both numbers: a
        silent cap would calibrate (or evaluate) on fewer samples than the recipe says, and nobody would know."""
        p = self.params
        left = sentences[p.skip:]
        if not left:
            raise PipelineError(f"{self.name}: skip {p.skip} leaves no sentence")
        if p.count == "all":
            return left
        if p.count > len(left):
            after = f" after skip {p.skip}" if p.skip else ""
            raise PipelineError(f"{self.where}.params.count: {p.count} sentences asked, but source {self.name!r} "
                                f"holds {len(left)}{after} ({shown(path)}); use count: all or at most {len(left)}")
        return left[: p.count]


def read_sentences(path: Path) -> list[str]:
    """The sentences of a text file, one a line; blank lines and `#` comments left out."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise PipelineError(f"cannot read sentences file {path}: {e.strerror}") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def shown(path: Path) -> str:
    """A shipped data file as `calibration/data/NAME` (where it is in the checkout), any other file as it is."""
    return f"calibration/data/{path.name}" if path.parent == DATA_DIR else str(path)


_ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_,
}


def graph_inputs(model: onnx.ModelProto) -> dict[str, tuple[type, list[int | None]]]:
    """Real inputs of a graph (initializers excluded): name -> (numpy dtype, dims; None where symbolic)."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        out[inp.name] = (_ONNX_TO_NUMPY.get(tt.elem_type), dims)
    return out


def check_feeds(feeds: Feeds, model: onnx.ModelProto, where: str) -> None:
    """One clear error when a feed does not fit the graph's inputs (names, dtypes, ranks, fixed sizes)."""
    expected = graph_inputs(model)
    missing = sorted(set(expected) - set(feeds))
    extra = sorted(set(feeds) - set(expected))
    if missing or extra:
        raise PipelineError(f"{where}: feed names do not match the graph inputs "
                            f"(graph wants {sorted(expected)}; missing {missing}, unexpected {extra})")
    for name, (dtype, dims) in expected.items():
        value = np.asarray(feeds[name])
        if dtype is not None and value.dtype != dtype:
            raise PipelineError(f"{where}: input {name!r} has dtype {value.dtype}, the graph wants {np.dtype(dtype)}")
        if value.ndim != len(dims):
            raise PipelineError(f"{where}: input {name!r} has rank {value.ndim} (shape {list(value.shape)}), "
                                f"the graph wants rank {len(dims)}")
        wrong = [(axis, size) for axis, (size, want) in enumerate(zip(value.shape, dims)) if want and size != want]
        if wrong:
            axis, size = wrong[0]
            shape = ["?" if d is None else d for d in dims]
            raise PipelineError(f"{where}: input {name!r} has size {size} on axis {axis} (shape "
                                f"{list(value.shape)}), the graph wants {dims[axis]} there (shape {shape})")


def checked_feeds(source: CalibrationSource, model: onnx.ModelProto, where: str = "calibration",
                  limit: int | None = None) -> list[Feeds]:
    """All feeds of a source (the first `limit`: the source makes no more, so a vocoder's source speaks only
    the sentences a check uses), each checked against `model`; an empty source is an error."""
    feeds = []
    for i, f in enumerate(source.feeds()):
        check_feeds(f, model, f"{where} ({source.describe()}), sample {i}")
        feeds.append(f)
        if limit is not None and len(feeds) >= limit:
            break
    if not feeds:
        raise PipelineError(f"{where}: source {source.describe()} yields no samples")
    return feeds
