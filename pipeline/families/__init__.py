"""Model families: everything model-specific, behind one interface the core calls.

A family says how to recognise its ModelSet, which exporters and calibration
sources it brings, what its default evaluation inputs are, how every graph's
inputs are captured (a dataflow chain, or an autoregressive loop), what its
outputs mean (audio at a sample rate, or tokens) and so which thresholds a
check may set, what `pipeline bench` feeds it and what `pipeline generate`
does. The core (runner, check, compare, bench, report, fallback, recipe, CLI)
asks the family and never names one.

Families are found through the entry-point group `tts_onnx_pipeline.families`
(each entry point names a `Family` subclass); the built-in ones are registered
the same way in pyproject.toml, so a separate package adds a family without
editing this repository. `register()` adds one at run time (tests do).

A plug-in is held to a contract when it loads: a `Family` subclass with a `name`
of its own (a plain name no other family has), a str `description`, and tuples of
`Exporter`s, `CalibrationSource` subclasses and `Target`s. One that breaks it, or
does not import, is set aside and the others keep working: `plugin_problems()`
lists one line per plug-in set aside, `pipeline families` prints them, and
`get_family` names the problem when asked for a family set aside. A built-in
family that is missing or broken is a broken install: a hard PipelineError.
A plug-in whose `recognizes()` raises is skipped by `detect_family`; that line is
added to `plugin_problems()` and logged once (logger "pipeline", warning), since
detection without it may pick the wrong family. `reload()` forgets the cache.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from calibration import CalibrationSource, SourceContext, checked_feeds
from pipeline.core.audio import MelSettings
from pipeline.core.errors import PipelineError, one_line
from pipeline.core.recipe import AudioSpec, parse_params

if TYPE_CHECKING:
    import onnx
    from pipeline.core.feeds import Feeds

    from pipeline.evaluation.metrics import Metric
    from pipeline.evaluation.results import CheckReport
    from pipeline.core.modelset import ModelSet
    from pipeline.formats.targets import Target

ENTRY_POINT_GROUP = "tts_onnx_pipeline.families"
GENERIC = "generic"
# Registered through entry points like any plug-in; missing, the install's metadata is stale or absent, and a
# voice would silently be taken for a generic model (no sidecar copied, no audio metrics).
BUILT_IN = ("piper", "hifigan", "chattts", "tortoise", "kokoro")


@dataclass(frozen=True)
class AudioOutput:
    """How to measure a family's audio: its first output (of the last graph, in a chain) is the waveform."""

    mel: MelSettings = field(default_factory=MelSettings)  # sample rate and mel front end of the metrics
    durations: str | None = None  # tensor whose FP32 values pin the candidate's durations when lengths differ
    output: str | None = None  # the output that is audio; None: the first output (of the last graph, in a chain)

    @property
    def sample_rate(self) -> int:
        return self.mel.sample_rate


@dataclass
class Exporter:
    """A base exporter: PyTorch weights -> ModelSet, with a parameter schema and a cache key."""

    name: str
    Params: type[BaseModel]
    export: Callable[[Any, Path, Callable[[str], Path]], ModelSet]  # (params, dest, resolve)
    key: Callable[[Any, Callable[[str], Path]], str]  # what the export depends on
    # (params, resolve, where): builds the model from its config alone (no weights, e.g. on torch's meta device),
    # raising a PipelineError that names the key at fault, so a config that cannot be built fails in validate
    check: Callable[[Any, Callable[[str], Path], str], None] | None = None

    def parse(self, params: dict[str, Any], where: str) -> BaseModel:
        return parse_params(self.Params, params, f"{where}.params", nested=True)

    def validate(self, params: dict[str, Any], where: str, resolve: Callable[[str], Path]) -> BaseModel:
        """`parse`, then `check`: everything about the model that can be known before any work."""
        parsed = self.parse(params, where)
        if self.check is not None:
            try:
                self.check(parsed, resolve, f"{where}.params")
            except PipelineError:
                raise
            except Exception as e:  # a plug-in's check that does not wrap its own failure
                raise PipelineError(f"{where}.params: the model cannot be built: "
                                    f"{one_line(f'{type(e).__name__}: {e}')}") from None
        return parsed


@dataclass
class GenerateRequest:
    """What `pipeline generate` asks of a family (it interprets what applies to it)."""

    ids: list[int] | None
    prompt: str | None
    tokenizer: Path | None
    steps: int
    greedy: bool
    seed: int
    mode: str | None  # None: the family's default
    threads: int
    conditioning: Path | None = None  # a .npy the family conditions on (a speaker latent)
    json_path: Path | None = None  # where --json goes: arrays the family keeps are written beside it


@dataclass
class SpeechBatch:
    """One pass of a family's model over a piece of text (`pipeline say`): what it is, and the model's feeds."""

    label: str
    feeds: Feeds


@dataclass
class Generated:
    lines: list[str]  # what the CLI prints
    data: dict[str, Any]  # what --json writes


class Family:
    """Base class of a family plug-in; the generic behaviour is that of a plain ONNX file."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    exporters: ClassVar[tuple[Exporter, ...]] = ()
    sources: ClassVar[tuple[type[CalibrationSource], ...]] = ()
    # Formats beside ONNX (a recipe's `targets:`), written from the PyTorch model its exporter loads.
    targets: ClassVar[tuple[Target, ...]] = ()
    no_targets: ClassVar[str] = ""  # why a family writes no format beside ONNX, when it has none
    # A family whose ModelSet is an autoregressive loop implements `check_loop`; the core then
    # calls it instead of walking the graphs as a dataflow chain.
    autoregressive: ClassVar[bool] = False

    # -- recognising ----------------------------------------------------------------
    def recognizes(self, model_path: Path, model: onnx.ModelProto) -> bool:
        """True when a plain ONNX file (no `family` key anywhere) is one of this family's models.

        `model` is that file, already loaded: detection reads it once for every family."""
        return False

    def missing(self, model_path: Path, model: onnx.ModelProto) -> str | None:
        """For a file `recognizes` turned down that looks like this family's model all the same: what it lacks
        (a voice's sidecar), in one line; None otherwise. Detection then says it, instead of leaving the user
        to wonder why the model is taken for a generic one."""
        return None

    # -- outputs and their metrics ------------------------------------------------
    def audio(self, ms: ModelSet | None) -> AudioOutput | None:
        """The audio output of the whole ModelSet, or None when it makes no audio (`ms` None: before export)."""
        return None

    def tokens(self, ms: ModelSet | None) -> bool:
        """True when the ModelSet's outputs are token distributions (teacher-forced token metrics)."""
        return False

    def metrics(self, ms: ModelSet | None) -> list[Metric]:
        """Metrics of this family's own, beyond block/output SQNR, audio and tokens (`ms` None: before export)."""
        return []

    # -- inputs ---------------------------------------------------------------------
    def eval_source(self, model_path: Path | None, ms: ModelSet | None) -> tuple[str, dict[str, Any]] | None:
        """(source, params) the check and compare use when the recipe names none; None: the calibration's."""
        return None

    def fit_source(self, source: CalibrationSource, ms: ModelSet, explicit: dict[str, Any]) -> None:
        """Adjust a source's params to an exported ModelSet (`explicit`: what the recipe set itself)."""

    def entry_graph(self, ms: ModelSet) -> str:
        """The graph the recipe's calibration feeds are checked against."""
        from pipeline.evaluation.chain import entry_graphs

        return entry_graphs(ms)[0]

    def capture(self, reference: ModelSet, entry_feeds: list[Feeds], graph: str, cache: dict[str, list[Feeds]],
                progress: Callable[[int, int], None]) -> list[Feeds]:
        """Inputs of `graph` on real entry feeds, computed by the FP32 `reference` (dataflow by default).

        `cache` is per reference ModelSet: a family that captures every graph in one sweep fills it once."""
        if graph not in cache:
            from pipeline.evaluation.chain import graph_feeds

            cache[graph] = graph_feeds(reference, entry_feeds, graph, progress=progress)
        return cache[graph]

    def check_loop(self, reference: ModelSet, candidate: ModelSet, samples: list[Feeds], decode_steps: int,
                   progress: Callable[[str], None]) -> CheckReport:
        """Per-graph isolated/accumulated error and token metrics of an autoregressive ModelSet."""
        raise PipelineError(f"family {self.name!r} is not autoregressive")

    # -- bench and generate --------------------------------------------------------
    def bench_inputs(self, model_path: Path, count: int, sentences: Path | None) -> tuple[list[str], list[Feeds]]:
        """(labels, feeds) that `pipeline bench` runs every variant on: the first `count` evaluation inputs.

        `model_path` is the reference's .onnx file, or the folder of a chained ModelSet."""
        from pipeline.core.modelset import ModelSet
        from pipeline.core.onnx_io import load_onnx

        ms = ModelSet.read(model_path) if model_path.is_dir() else None
        entry = ms.path(self.entry_graph(ms)) if ms is not None else model_path
        spec = self.eval_source(entry, ms)
        if spec is None:
            raise PipelineError(f"{model_path}: family {self.name!r} has no evaluation inputs for bench")
        name, params = spec
        if sentences is not None:
            params = {**params, "sentences": str(sentences)}
        feeds, source = draw_samples(name, params, SourceContext(entry), load_onnx(entry), "bench inputs",
                                     limit=count)
        # The sentences spoken, where the source knows them (`bench --asr` scores transcripts against them).
        return source.texts() or [f"sample {i}" for i in range(len(feeds))], feeds

    def speech(self, ms: ModelSet, text: str, voice: str | None) -> list[SpeechBatch]:
        """The text front end (`pipeline say`): the feeds that speak `text` in `voice` (None: the default one),
        one batch per pass of the model, spoken in order."""
        raise PipelineError(f"a {self.name!r} model has no text front end: pipeline say speaks with families that "
                            f"turn text into their model's inputs (piper, kokoro)")

    def generate(self, ms: ModelSet, request: GenerateRequest) -> Generated:
        raise PipelineError(f"family {self.name!r} has no generation (pipeline generate is for token families)")

    # -- sidecars -------------------------------------------------------------------
    def sidecars(self, model_path: Path) -> list[Path]:
        """Files next to a plain ONNX model that its runtime reads; copied along with it."""
        return []


class GenericFamily(Family):
    """A plain ONNX file: blocks from node names, error on its outputs, inputs from the recipe."""

    name = GENERIC
    description = "any ONNX model: per-block error on its outputs, inputs from --npz or the recipe"
    # What the file lacks to be a family's model it looks like (`Family.missing`), found by `detect_family`.
    lacks: list[str] = []


_REGISTERED: dict[str, type[Family]] = {}
_LOADED: dict[str, type[Family]] | None = None
_SET_ASIDE: dict[str, str] = {}  # entry-point name -> why that plug-in was set aside (one line)
_RECOGNIZE_FAILED: dict[str, str] = {}  # family name -> why its recognizes() was skipped (one line)
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
log = logging.getLogger("pipeline")


def register(cls: type[Family]) -> type[Family]:
    """Add a family at run time (as an entry point would); returns the class, so it works as a decorator."""
    _REGISTERED[cls.name] = cls
    _RECOGNIZE_FAILED.pop(cls.name, None)  # a fixed class starts with a clean slate
    global _LOADED
    _LOADED = None
    return cls


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)
    _RECOGNIZE_FAILED.pop(name, None)
    global _LOADED
    _LOADED = None


def reload() -> None:
    """Forget the families found and the problems met, so the next call looks at the entry points again."""
    global _LOADED
    _LOADED = None
    _SET_ASIDE.clear()
    _RECOGNIZE_FAILED.clear()


def plugin_problems() -> list[str]:
    """One line per family plug-in set aside (loading or recognising), in the order they were met."""
    families()
    return [*_SET_ASIDE.values(), *_RECOGNIZE_FAILED.values()]


def _is_tuple_of(value: object, check: Callable[[object], bool]) -> bool:
    return isinstance(value, tuple) and all(check(v) for v in value)


def _contract_problem(cls: object) -> str | None:
    """What a loaded entry point lacks to be a family, or None when it keeps the contract."""
    from pipeline.formats.targets import Target

    if not (isinstance(cls, type) and issubclass(cls, Family)):
        return f"is not a Family subclass (it is {type(cls).__name__} {one_line(repr(cls), 80)})"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        return f"has no usable `name` (a plain name such as 'myvoice'; it has {name!r})"
    checks = {
        "description": (isinstance(cls.description, str), "a str"),
        "exporters": (_is_tuple_of(cls.exporters, lambda e: isinstance(e, Exporter)), "a tuple of Exporter"),
        "sources": (_is_tuple_of(cls.sources, lambda s: isinstance(s, type) and issubclass(s, CalibrationSource)),
                    "a tuple of CalibrationSource subclasses"),
        "targets": (_is_tuple_of(cls.targets, lambda t: isinstance(t, Target)), "a tuple of Target"),
    }
    for attr, (ok, want) in checks.items():
        if not ok:
            return f"`{attr}` must be {want} (it is {one_line(repr(getattr(cls, attr)), 80)})"
    return None


def _load(ep: Any) -> tuple[type[Family] | None, str | None]:
    """(class, None) for an entry point that keeps the contract, else (None, what is wrong)."""
    try:
        cls = ep.load()
    except Exception as e:  # a plug-in's import error is its own, not a bug of this tool
        return None, f"does not load: {type(e).__name__}: {one_line(e, 200)}"
    problem = _contract_problem(cls)
    return (None, problem) if problem else (cls, None)


def _is_built_in(ep: Any) -> bool:
    return ep.name in BUILT_IN and ep.value.startswith(f"{__name__}.")


def families() -> dict[str, type[Family]]:
    """Every known family: built-ins, then plug-ins, then run-time registrations (which win on a name clash)."""
    global _LOADED
    if _LOADED is None:
        found: dict[str, type[Family]] = {GENERIC: GenericFamily}
        eps = list(entry_points(group=ENTRY_POINT_GROUP))
        _load_built_ins([ep for ep in eps if _is_built_in(ep)], found)
        _SET_ASIDE.clear()
        # Built-ins first, so that a plug-in taking a built-in's name is the one set aside, whatever the order.
        for ep in eps:
            if not _is_built_in(ep):
                _load_plugin(ep, found)
        found.update(_REGISTERED)
        _LOADED = found
    return _LOADED


def _load_built_ins(eps: list[Any], found: dict[str, type[Family]]) -> None:
    """The built-in families into `found`; any missing or broken is a broken install, not a plug-in to skip."""
    for ep in eps:
        cls, problem = _load(ep)
        if problem:
            raise PipelineError(f"built-in family {ep.name!r} ({ep.value}) {problem}: this package's install is "
                                f"broken; reinstall it (pip install -e .)")
        found[cls.name] = cls
    missing = [name for name in BUILT_IN if name not in found]
    if missing:
        raise PipelineError(f"the built-in families {', '.join(missing)} are not registered (entry-point group "
                            f"{ENTRY_POINT_GROUP}): this package's install is missing or older than its code; "
                            f"reinstall it (pip install -e .)")


def _load_plugin(ep: Any, found: dict[str, type[Family]]) -> None:
    """One plug-in into `found`, or set aside with one line naming its entry point and what is wrong."""
    cls, problem = _load(ep)
    if cls is not None and found.get(cls.name, cls) is not cls:  # the same class found twice is no clash
        taken = found[cls.name]
        problem = f"takes the name {cls.name!r}, already that of {taken.__module__}.{taken.__qualname__}"
    if problem:
        _SET_ASIDE[ep.name] = f"family plug-in {ep.name!r} ({ep.value}) set aside: {problem}"
    else:
        found[cls.name] = cls


def _set_aside_hint() -> str:
    return f"; {len(_SET_ASIDE)} family plug-in(s) set aside, see `pipeline families`" if _SET_ASIDE else ""


def declare_audio(family: Family, spec: AudioSpec | None, where: str = "model.audio") -> Family:
    """`family` with the audio a recipe's `model.audio` (or compare's and bench's options) declares: each key
    given overrides the family's own value; a model no family knows gets audio metrics this way, no Python.

    The result is an instance of a subclass of the family's own class, so every other hook stays the family's."""
    if spec is None:
        return family
    if spec.sample_rate is None and family.audio(None) is None:
        raise PipelineError(f"{where}.sample_rate: a {family.name!r} model has no audio of its own: say at how "
                            f"many Hz its output is audio")
    merged_audio(family.audio(None), spec)  # a front end that cannot fit fails here, before any work
    own = type(family)

    def audio(self, ms):
        return merged_audio(own.audio(self, ms), spec)

    def __reduce__(self):  # pickled as the family it declares audio for, and the declaration (a run apart)
        plain = own.__new__(own)
        plain.__dict__.update(self.__dict__)
        return declare_audio, (plain, spec)

    declared = type(own.__name__, (own,), {"audio": audio, "__reduce__": __reduce__, "__module__": own.__module__,
                                           "__doc__": own.__doc__})()
    declared.__dict__.update(family.__dict__)  # what detection set on it (a generic model's `lacks`)
    return declared


def check_declared_audio(spec: AudioSpec, model: onnx.ModelProto, where: str) -> None:
    """The output and the durations tensor a recipe's `model.audio` names exist in the model (one graph)."""
    from pipeline.core.graph import require_intermediates

    outputs = [o.name for o in model.graph.output]
    if spec.output is not None and spec.output not in outputs:
        raise PipelineError(f"{where}.output: the model has no output {spec.output!r} (its outputs: "
                            f"{', '.join(outputs)})")
    if spec.durations is not None:
        require_intermediates(model, [spec.durations], f"{where}.durations")


def merged_audio(base: AudioOutput | None, spec: AudioSpec) -> AudioOutput:
    """A family's audio (None: it has none) with what `spec` gives in its place."""
    base = base or AudioOutput()
    mel = dataclasses.asdict(base.mel)
    if spec.sample_rate is not None:
        mel["sample_rate"] = spec.sample_rate
        mel["fmax"] = min(mel["fmax"], spec.sample_rate / 2)  # a band edge above Nyquist has no bins
    mel.update({k: v for k, v in (spec.mel.model_dump() if spec.mel else {}).items() if v is not None})
    if mel["fmax"] > mel["sample_rate"] / 2 or mel["fmin"] >= mel["fmax"]:
        raise PipelineError(f"audio mel: bands {mel['fmin']:g} to {mel['fmax']:g} Hz do not fit a "
                            f"{mel['sample_rate']} Hz output (fmin < fmax <= sample_rate / 2)")
    return AudioOutput(mel=MelSettings(**mel), durations=spec.durations or base.durations,
                       output=spec.output or base.output)


def get_family(name: str, where: str = "model.family") -> Family:
    known = families()
    if name not in known and name in _SET_ASIDE:
        raise PipelineError(f"{where}: {_SET_ASIDE[name]}")
    if name not in known:
        raise PipelineError(f"{where}: unknown model family {name!r} (known: {', '.join(sorted(known))})"
                            f"{_set_aside_hint()}")
    return known[name]()


def family_of_exporter(exporter: str, where: str = "model") -> tuple[Family, Exporter]:
    for cls in families().values():
        for e in cls.exporters:
            if e.name == exporter:
                return cls(), e
    names = sorted(e.name for cls in families().values() for e in cls.exporters)
    raise PipelineError(f"{where}.exporter: unknown exporter {exporter!r} (known: {', '.join(names)})"
                        f"{_set_aside_hint()}")


def detect_family(model_path: Path, model: onnx.ModelProto | None = None) -> Family:
    """The family of a plain ONNX file (`model`: the file, if already loaded): the first family that
    recognises it, else the generic one."""
    if model is None:
        from pipeline.core.onnx_io import load_onnx

        model = load_onnx(model_path)
    for cls in families().values():
        if cls is not GenericFamily and _recognizes(cls, model_path, model):
            return cls()
    generic = GenericFamily()
    generic.lacks = [line for cls in families().values() if cls is not GenericFamily
                     and (line := _missing(cls, model_path, model))]
    return generic


def _missing(cls: type[Family], model_path: Path, model: onnx.ModelProto) -> str | None:
    try:
        return cls().missing(model_path, model)
    except Exception:  # (a plug-in's bug here only loses a hint)
        return None


def _recognizes(cls: type[Family], model_path: Path, model: onnx.ModelProto) -> bool:
    """A family's verdict on a file; one that raises is skipped (and said once), so the others still decide."""
    try:
        return bool(cls().recognizes(model_path, model))
    except Exception as e:  # a plug-in's bug must not stop detection for every family
        if cls.name not in _RECOGNIZE_FAILED:
            line = (f"family {cls.name!r} ({cls.__module__}) skipped in detection: recognizes() raised "
                    f"{type(e).__name__}: {one_line(e, 200)}")
            _RECOGNIZE_FAILED[cls.name] = line
            log.warning("warning: %s", line)
        return False


def family_of(ms: ModelSet) -> Family:
    """The family named in a ModelSet's metadata; one without it is detected from its first graph's file."""
    name = ms.meta.get("family")
    if name:
        return get_family(name, where=f"{ms.root}/modelset.json: meta.family")
    if ms.meta.get("exporter"):  # written before model sets named their family
        try:
            return family_of_exporter(ms.meta["exporter"])[0]
        except PipelineError:
            pass  # an exporter no family brings any more: detect from the file
    return detect_family(ms.path(ms.names()[0]))


def all_sources() -> list[type[CalibrationSource]]:
    """Every calibration source by name: the generic `npz` folder, plus the sources each family brings."""
    from calibration.npz_folder import NpzFolder

    return [NpzFolder, *(s for cls in families().values() for s in cls.sources)]


def source_class(name: str, where: str = "calibration") -> type[CalibrationSource]:
    registry = {cls.name: cls for cls in all_sources()}
    if name not in registry:
        raise PipelineError(f"{where}.source: unknown calibration source {name!r} (known: {', '.join(sorted(registry))})")
    return registry[name]


def path_fields(source_name: str) -> list[str]:
    """The params of a calibration source that name files or folders (marked with `PATH`); none for an unknown source."""
    cls = {c.name: c for c in all_sources()}.get(source_name)
    if cls is None:
        return []
    return [key for key, f in cls.Params.model_fields.items()
            if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("path")]


def make_source(name: str, params: dict[str, Any], ctx: SourceContext, where: str = "calibration") -> CalibrationSource:
    """The calibration source `name` with its params checked (one line naming `where` when they are wrong)."""
    cls = source_class(name, where)
    source = cls(parse_params(cls.Params, params, f"{where}.params"), ctx)
    source.where = where
    source.check()
    return source


def draw_samples(name: str, params: dict[str, Any], ctx: SourceContext, graph: onnx.ModelProto, where: str,
                 family: Family | None = None, ms: ModelSet | None = None,
                 check_where: str | None = None, limit: int | None = None) -> tuple[list[Feeds], CalibrationSource]:
    """The one way samples are drawn, for calibration, checks, compare, bench and tune: the source made with its
    params checked (`where` names them), fitted to an exported model set by its family, and every sample checked
    against the graph it feeds (`check_where` names that, default `where`); the first `limit`, where given."""
    source = make_source(name, params, ctx, where=where)
    if family is not None and ms is not None:
        family.fit_source(source, ms, params)
    return checked_feeds(source, graph, where=check_where or where, limit=limit), source


def files_key(params: BaseModel, files: list[Path]) -> str:
    """A cache key from an exporter's params and the size and mtime of the files it reads."""
    h = hashlib.sha256(json.dumps(params.model_dump(), sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()
