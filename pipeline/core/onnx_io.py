"""Loading, checking and running ONNX models, with user-facing errors."""
from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from pipeline.core.errors import PipelineError, one_line

MAX_PROTO_BYTES = 2 * 1024**3
# Protobuf cannot serialize or parse a message of 2 GiB or more. A model whose weights (graph file plus its
# external-data files) reach LARGE_BYTES is therefore handled "light": its proto is loaded without the weights,
# which stay in their files; passes read the tensors they need from there, sessions map the files, and every
# save writes the weights to an external-data file. The margin below 2 GiB leaves room for the graph itself and
# for what a pass adds inline. (Tests lower it to run the light path on small models.)
LARGE_BYTES = int(1.8 * 1024**3)
# What `InferenceSession.run` raises when a model cannot run on some input (a Concat of lengths that no longer
# agree, a shape a kernel refuses): the model's own failure on that input, not a bug of ours.
ORT_RUN_ERRORS = tuple(getattr(ort.capi.onnxruntime_pybind11_state, name) for name in
                       ("Fail", "RuntimeException", "InvalidArgument", "NotImplemented"))
EXTERNAL_MIN_BYTES = 1024  # a large model's tensors of at least this size go to its external-data file
# A proto holding this many bytes of weights is not serialized whole where that can be avoided: shape inference
# reads a view without them, a session given `inline_limit=HEAVY_BYTES` maps them from a scratch file.
HEAVY_BYTES = 16 * 1024**2
_ALIGN = 4096  # external tensors start on a page: ONNX Runtime maps them instead of copying


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load and sanity-check an ONNX file; every failure is one clear PipelineError.

    A large model (`LARGE_BYTES` of weights or more, with external data) comes back light: its weights stay in
    their files next to it (`is_light`), which is what a session or a pass then reads."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"model file not found: {path}")
    if not path.is_file():
        raise PipelineError(f"model path is not a file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise PipelineError(f"model file is empty: {path}")
    if size >= MAX_PROTO_BYTES:
        raise PipelineError(f"{path}: a single ONNX file of 2 GB or more cannot be parsed (protobuf's limit); save "
                            f"the model with its weights as external data (onnx.save_model(model, path, "
                            f"save_as_external_data=True)) and give that")
    # Checked from the file, before the proto is read: checking a proto would serialize it (another copy of every
    # weight, and impossible over 2 GB), and the checker holds a copy of its own (twice a float vocoder's
    # 325 MB at its peak), which must not come on top of ours. Its verdict is given after the plainer problems.
    problem = _checker_problem(path)
    model = parse_graph(path)
    if model.ir_version == 0 or len(model.graph.node) == 0:
        raise PipelineError(f"{path}: not a valid ONNX model (no IR version or no nodes)")
    _require_external_files(model, path)
    if problem:
        raise PipelineError(f"{path}: ONNX checker rejects the model: {problem}")
    if not _stays_light(path, model):
        _load_external_data(model, path)
    return model


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy: code that edits a graph in place works on one, so its input stays as it was."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def parse_graph(path: str | Path) -> onnx.ModelProto:
    """A model file's proto without its external weights; a file that does not parse is one line naming it
    (protobuf's own message names neither the file nor what it is)."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except OSError:
        raise  # the CLI names the file and the reason
    except Exception as e:  # protobuf raises DecodeError, or others on garbage
        raise PipelineError(f"{path}: not a valid ONNX model (truncated or corrupt?): {one_line(e, 600)}") from None


def model_size(path: Path, model: onnx.ModelProto | None = None) -> int:
    """Bytes of a model file plus its external-data files."""
    return path.stat().st_size + sum(f.stat().st_size for f in external_files(path, model) if f.is_file())


def is_light(model: onnx.ModelProto) -> bool:
    """True when some of the model's weights were left in external-data files (a large model's proto)."""
    return bool(_external(model))


def is_large(path: Path) -> bool:
    """True when `load_onnx` hands this file's model over light."""
    return _stays_light(path, parse_graph(path))


def _stays_light(path: Path, model: onnx.ModelProto) -> bool:
    """A model with external data that reaches LARGE_BYTES with it keeps its weights in their files."""
    return bool(_external(model)) and model_size(path, model) >= LARGE_BYTES


def stored_bytes(t: onnx.TensorProto) -> int:
    """A weight's size as stored, inline or in an external-data file (whose data need not be loaded)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return int(next((e.value for e in t.external_data if e.key == "length"), 0))
    return int(numpy_helper.to_array(t).nbytes)


def load_light(path: Path) -> onnx.ModelProto:
    """`load_onnx`, except that the weights of a model kept in an external-data file stay there, unchecked
    (sessions read them through `session(..., weights_dir=path.parent)`)."""
    if not path.is_file():
        return load_onnx(path)
    if not external_files(path):  # (a scan of its bytes: a self-contained file is parsed once, by load_onnx)
        return load_onnx(path)
    model = parse_graph(path)
    data = external_files(path, model)
    missing = [f.name for f in data if not f.is_file()]
    if missing:
        raise PipelineError(f"{path}: its weights file {missing[0]} is missing")
    return model


def load_mapped(path: Path, folder: Path) -> tuple[onnx.ModelProto, Path]:
    """A model file's proto, light, and the folder its weights lie in: sessions given that folder
    (`session(..., weights_dir=)`) map the weights, so several sessions of one model (the check's whole,
    isolated and pinned runs) share one copy of them, and no proto holds them besides. A file whose weights lie
    in external data already is read from its own folder; one holding them itself is written once into
    `folder` (a scratch folder the caller removes), the weights page-aligned in a data file beside it."""
    model = load_light(path)
    if is_light(model):
        return model, path.parent
    for k, t in enumerate(model.graph.initializer):
        # Values some writers keep in typed fields (float_data; FP16 in int32_data) can be mapped as raw bytes.
        if not t.HasField("raw_data") and t.data_location != onnx.TensorProto.EXTERNAL \
                and _nbytes(t) >= EXTERNAL_MIN_BYTES \
                and np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)) in _MAPPABLE:
            model.graph.initializer[k].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / path.name
    _save_external(model, staged, folder, move_inline=True)
    del model
    return parse_graph(staged), folder


def _external(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


def external_files(path: Path, model: onnx.ModelProto | None = None) -> list[Path]:
    """The external-data files a model file's initializers live in (none for a self-contained file)."""
    if model is None and not _mentions_location(path):
        return []  # self-contained: not parsed (that would hold all its weights: 325 MB for a float Kokoro)
    model = model if model is not None else parse_graph(path)
    names = dict.fromkeys(e.value for t in _external(model) for e in t.external_data if e.key == "location")
    return [path.parent / n for n in names]


def _mentions_location(path: Path, chunk: int = 8 << 20) -> bool:
    """Whether the file's bytes hold b"location", the key every external-data reference writes: read in chunks,
    so checking a self-contained file costs one buffer, not its weights in memory."""
    key = b"location"
    with open(path, "rb") as f:
        tail = b""
        while block := f.read(chunk):
            window = tail + block  # (the key may straddle two reads)
            if key in window:
                return True
            tail = window[-(len(key) - 1):]
    return False


def _require_external_files(model: onnx.ModelProto, path: Path) -> None:
    for f in external_files(path, model):
        if f.parent.resolve() != path.parent.resolve():
            raise PipelineError(f"{path}: external data must lie next to the model, not at {f}")
        if not f.is_file():
            raise PipelineError(f"{path}: its weights file {f.name} is missing")


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Bring a small model's external weights into the proto, which then stays under protobuf's 2 GB."""
    if not _external(model):
        return
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as e:
        raise PipelineError(f"{path}: cannot read its external data: {one_line(e, 600)}") from None


def save_sharing_weights(models: dict[Path, onnx.ModelProto], data_file: Path, min_bytes: int = 1024) -> None:
    """Save models that hold the same weights (a prefill and a decode graph) with one external-data file.

    Each distinct initializer of at least `min_bytes` is written once, whichever model and name it has
    (exporters name folded weights differently per graph), at a page-aligned offset; every model's
    tensors point at it. `models` are changed in place. Everything in one folder, written through
    temporary names and renamed, data file first."""
    import hashlib

    where: dict[bytes, tuple[int, int]] = {}
    tmp = data_file.with_name(f".{data_file.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for model in models.values():
                for t in model.graph.initializer:
                    if t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) < min_bytes:
                        continue
                    key = hashlib.sha256(t.raw_data).digest()
                    if key not in where:
                        f.seek(-f.tell() % 4096, os.SEEK_CUR)
                        where[key] = (f.tell(), len(t.raw_data))
                        f.write(t.raw_data)
                    offset, length = where[key]
                    t.ClearField("raw_data")
                    t.data_location = onnx.TensorProto.EXTERNAL
                    del t.external_data[:]
                    for k, v in (("location", data_file.name), ("offset", str(offset)), ("length", str(length))):
                        t.external_data.add(key=k, value=v)
        os.replace(tmp, data_file)
    finally:
        if tmp.exists():
            tmp.unlink()
    for path, model in models.items():
        save_onnx(model, path)


def _checker_problem(model: onnx.ModelProto | Path) -> str | None:
    """The checker's complaint, if any, ignoring ops only ONNX Runtime registers.

    Fusions emit ORT ops such as SimplifiedLayerNormalization in the default domain;
    the checker does not know them, ORT runs them (check_loads proves it after each step).
    A file is checked from disk (any size, its external data found next to it).
    """
    try:
        onnx.checker.check_model(str(model) if isinstance(model, Path) else model)
    except onnx.checker.ValidationError as e:
        text = one_line(e, 600)
        if text.startswith("No Op registered for"):
            return None
        return text
    except Exception as e:  # a file that does not parse: `parse_graph` says so, naming it
        return one_line(e, 600)
    return None


_shared_pool_threads: int | None = None  # set by share_one_thread_pool: every session of the process uses it


def share_one_thread_pool(threads: int) -> None:
    """From now on every session of this process runs on one global ONNX Runtime pool of `threads` threads.

    For a process that generates: a ChatTTS step runs ~23 sessions one after another. Per-session pools
    that spin between runs fight over the cores (a step took 363 ms on another machine), and pools that do
    not spin pay a wake-up for every parallel kernel; one shared pool spins as a single session's would
    (INT8 decode step 14.5 vs 17.5 ms on 2 cores). ONNX Runtime then refuses sessions with pools of their
    own, so it is all or nothing for the process: `pipeline generate` and benchmark workers opt in, the
    runner and the check (which mix thread counts) do not."""
    global _shared_pool_threads
    if _shared_pool_threads not in (None, threads):
        raise PipelineError(f"this process already shares a pool of {_shared_pool_threads} threads, not {threads}")
    if _shared_pool_threads is None:
        ort.capi._pybind_state.set_global_thread_pool_sizes(threads, 1)
        _shared_pool_threads = threads


def session(model: onnx.ModelProto | bytes | str | Path, threads: int = 2,
            optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            arena: bool | Literal["shared"] = True, spinning: bool = True, weights_dir: Path | None = None,
            inline_limit: int | None = None, in_graph_order: bool = False) -> ort.InferenceSession:
    """A CPU session with a fixed thread count, so timings compare.

    `arena=False` returns freed activation memory to the system instead of keeping
    ORT's high-water mark cached, and plans no memory pattern (which caches one
    per input shape): for sessions that expose many intermediates.
    `arena=SHARED`: the session allocates from the process's one shared CPU arena, for sessions that run one
    after another (the check's reference, candidate and isolated runs): each reuses the memory the last freed,
    where sessions with arenas of their own would each keep their high-water mark, and sessions without one
    leave glibc's heap fragmented (a float Kokoro's check: 1.6 GB peak RSS shared, 2.3 GB and more without).
    `spinning=False` stops idle worker threads from busy-waiting: for runtimes that
    chain many sessions, whose thread pools would otherwise fight over the cores.
    After `share_one_thread_pool`, the process's pool replaces both `threads` and `spinning`.
    `in_graph_order`: run the nodes in the order the graph lists them where it can (ORT's PRIORITY_BASED
    order), so a node placed right after a tensor's producer (a reduction of it) runs before the tensor is
    freed; ORT's default order may run such nodes last, holding every tensor they read at once.
    `weights_dir`: a proto whose weights stay in external-data files reads them from there; ONNX Runtime
    maps them, and keeps them in the file's layout (no repacked copy): a session over a 1.6 GB graph then
    costs megabytes until it runs, and the check's three sessions share the pages.
    A proto of any size works: one holding `inline_limit` bytes of weights or more (default `LARGE_BYTES`),
    which protobuf could not serialize, goes through a temporary file with external data (`_file_session`).
    """
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = bool(arena)
    opts.enable_mem_pattern = bool(arena)
    if arena == SHARED:
        _register_shared_arena()
        opts.add_session_config_entry("session.use_env_allocators", "1")
    if _shared_pool_threads is not None:
        opts.use_per_session_threads = False
    else:
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = optimization
    opts.log_severity_level = 3
    if in_graph_order:
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    limit = LARGE_BYTES if inline_limit is None else inline_limit
    if isinstance(model, onnx.ModelProto) and inline_bytes(model) >= limit:
        opts.add_session_config_entry("session.disable_prepacking", "1")
        return _file_session(model, opts, weights_dir)
    shared: dict[str, ort.OrtValue] = {}
    if weights_dir is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
        opts.add_session_config_entry("session.disable_prepacking", "1")
        if isinstance(model, onnx.ModelProto):
            shared = _mapped_initializers(model, weights_dir)
            for name, value in shared.items():
                opts.add_initializer(name, value)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else \
        model if isinstance(model, bytes) else str(model)
    sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    sess._pipeline_weights = shared  # ORT reads them in place: they live as long as the session
    return sess


SHARED = "shared"  # `session(arena=SHARED)`
_shared_arena = False


def _register_shared_arena() -> None:
    """Register ONNX Runtime's process-wide CPU arena (ORT's defaults), once; sessions opt in to it."""
    global _shared_arena
    if not _shared_arena:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        _shared_arena = True


# One read-only map per weights file for the whole process (dropped with the last session that reads it). Every
# session that maps a file itself adds it to the process's RSS once more, though the pages are shared: the
# check's candidate and isolated-candidate sessions would count a 2 GB model twice.
_maps: weakref.WeakValueDictionary[str, np.memmap] = weakref.WeakValueDictionary()
_MAPPABLE = {np.dtype(t) for t in (np.float32, np.float16, np.float64, np.int8, np.uint8, np.int16, np.uint16,
                                   np.int32, np.uint32, np.int64, np.uint64, np.bool_)}


def _mapped_initializers(model: onnx.ModelProto, weights_dir: Path) -> dict[str, ort.OrtValue]:
    """The model's external weights as OrtValues over the process's shared maps of their files (a session given
    them reads them in place), for the plain numeric types; others ONNX Runtime reads from the files itself."""
    values = {}
    for t in _external(model):
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        file, offset, length = _external_info(t, weights_dir)
        if dtype not in _MAPPABLE or offset % dtype.itemsize or length != _nbytes(t) or length == 0:
            continue
        key = str(file.resolve())
        mapped = _maps.get(key)
        if mapped is None:
            mapped = np.memmap(file, dtype=np.uint8, mode="r")
            _maps[key] = mapped
        array = mapped[offset:offset + length].view(dtype).reshape(tuple(t.dims))
        values[t.name] = ort.OrtValue.ortvalue_from_numpy(array)
    return values


def _file_session(model: onnx.ModelProto, opts: ort.SessionOptions, weights_dir: Path | None) -> ort.InferenceSession:
    """A session over a proto past `inline_limit`: written into a scratch folder, every weight it holds in a data
    file (beside the weights files it already reads, linked in), and loaded from there: no serialized copy, and
    ONNX Runtime maps the weights instead of holding a copy. The folder lives as long as the session."""
    import tempfile

    folder = tempfile.TemporaryDirectory(prefix="pipeline-session-")
    path = stage_model(model, weights_dir, Path(folder.name), "model.onnx", every_weight=True)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    sess._pipeline_scratch = folder  # removed when the session is
    return sess


def check_loads(model: onnx.ModelProto | Path, what: str, weights_dir: Path | None = None) -> None:
    """onnx.checker, then an ORT CPU session: a step whose result cannot load fails here.

    Give a saved file for a model of any size: both read it from disk, with its external data. A light proto
    (weights left in files) is only loaded in ONNX Runtime, from `weights_dir` (the checker wants a file)."""
    problem = None if isinstance(model, onnx.ModelProto) and is_light(model) else _checker_problem(model)
    if problem:
        raise PipelineError(f"{what}: result fails the ONNX checker: {problem}")
    if isinstance(model, Path):  # weights mapped from the file, not repacked (12 s and 2.5 GB on a 2.4 GB model)
        weights_dir = model.parent
    try:
        session(model, threads=1, optimization=ort.GraphOptimizationLevel.ORT_DISABLE_ALL, weights_dir=weights_dir)
    except Exception as e:
        raise PipelineError(f"{what}: ONNX Runtime cannot load the result: {one_line(e, 600)}") from None


def set_provenance(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Write `pipeline.*` keys into metadata_props, replacing older values."""
    keep = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def tensor_types(model: onnx.ModelProto, infer: bool = True) -> dict[str, int]:
    """Tensor name -> ONNX element type, over value_info, inputs, outputs and initializers.

    `infer=True` runs shape inference first (falling back to what the model declares
    when inference fails); `infer=False` reads only what the model declares, which is
    what a converter that rewrote value_info wants to be taken at its word on.
    """
    graph = model.graph
    if infer:
        try:
            graph = onnx.shape_inference.infer_shapes(_shape_view(model)).graph
        except Exception:  # inference is a help here; ORT checks the types anyway
            graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def infer_value_info(model: onnx.ModelProto) -> None:
    """Set the model's value_info (and its outputs' types) to what shape inference finds, in place, inferred on a
    view without the weights' bytes: `infer_shapes` on the model itself would serialize it and parse back a
    second whole copy (a float Kokoro: 0.9 GB more at the peak). A model it fails on is left as it was."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_shape_view(model)).graph
    except Exception:  # inference is a help; ORT checks the types anyway
        return
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.value_info)
    for out, found in zip(model.graph.output, inferred.output):
        out.CopyFrom(found)


def _shape_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model itself, or for one holding weights of MB, a copy with their bytes left out (names, types and
    shapes kept): all that shape inference reads of a weight, without serializing them (once more in memory, or
    past protobuf's 2 GB)."""
    if inline_bytes(model, EXTERNAL_MIN_BYTES) < HEAVY_BYTES:
        return model
    view = _without_initializers(model)
    for t in model.graph.initializer:
        big = t.data_location != onnx.TensorProto.EXTERNAL and _nbytes(t) >= EXTERNAL_MIN_BYTES
        view.graph.initializer.append(_external_ref(t, "left-out", 0, 0) if big else t)
    return view


# ORT's input type strings -> numpy dtypes, for feeding a value to a session that declares another float width.
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
               "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}


def as_ort_type(value: np.ndarray, ort_type: str) -> np.ndarray:
    """`value` cast to the dtype an ORT input declares (`sess.get_inputs()[i].type`), when it differs."""
    want = _ORT_DTYPES.get(ort_type)
    return value if want is None or value.dtype == want else value.astype(want)


def input_caster(path: Path):
    """feeds -> feeds with each float input cast to the float type the graph at `path` declares: feeds captured
    from the FP32 reference, given to a graph whose inputs an earlier step made FP16 (keep_io_types: false)."""
    floats = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
              onnx.TensorProto.DOUBLE: np.float64}
    declared = {i.name: floats.get(i.type.tensor_type.elem_type) for i in parse_graph(path).graph.input}

    def cast(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v.astype(declared[k]) if declared.get(k) is not None and v.dtype != declared[k]
                and np.issubdtype(v.dtype, np.floating) else v for k, v in feeds.items()}

    return cast


def save_onnx(model: onnx.ModelProto, path: Path, weights_dir: Path | None = None) -> None:
    """Write via a temporary name in the same folder, then rename: never half a file.

    A light model (weights left in external-data files in `weights_dir`), one holding `LARGE_BYTES` of weights or
    more, or any model given a `weights_dir` (what a step made of a light one, which may now hold its weights
    itself) is written with its weights in an external-data file beside it (`_save_external`): what came from a
    large model stays cheap to open, whatever a step left of it. A light model given no `weights_dir` points at
    files beside `path` already (`save_sharing_weights`)."""
    if weights_dir is not None or is_light(model) or inline_bytes(model, EXTERNAL_MIN_BYTES) >= LARGE_BYTES:
        _save_external(model, path, weights_dir or path.parent)
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def inline_bytes(model: onnx.ModelProto, min_bytes: int = 0) -> int:
    """Bytes of the weights a proto holds itself (initializers of at least `min_bytes`), from their shapes."""
    return sum(n for t in model.graph.initializer
               if t.data_location != onnx.TensorProto.EXTERNAL and (n := _nbytes(t)) >= min_bytes)


def _nbytes(t: onnx.TensorProto) -> int:
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):  # strings and odd types: never large, never raw bytes here
        return 0
    return itemsize * int(np.prod(t.dims, dtype=np.int64))


def _save_external(model: onnx.ModelProto, path: Path, weights_dir: Path, move_inline: bool = False) -> None:
    """Write `model` with every weight of EXTERNAL_MIN_BYTES or more in `<file>.data`, page-aligned, one tensor
    at a time: those the proto holds from it, light ones copied from their files in `weights_dir`. Files already
    beside `path` are pointed at, not copied, and the weights the proto holds then stay in it unless they are too
    many (a model whose weights lie in a shared file keeps its small ones, as it always did). The proto given is
    not changed (a new one points at the data); the data file is renamed into place first, then the graph."""
    keep = weights_dir.resolve() == path.parent.resolve()
    move_inline = move_inline or not keep or inline_bytes(model, EXTERNAL_MIN_BYTES) >= LARGE_BYTES
    kept = {e.value for t in _external(model) for e in t.external_data if e.key == "location"} if keep else set()
    data = path.with_name(f"{path.name}.data")
    while data.name in kept:  # never write over a file the model still reads
        data = data.with_name(f"_{data.name}")
    tmp_data = data.with_name(f".{data.name}.tmp-{os.getpid()}")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    out = _without_initializers(model)
    sources: dict[str, Any] = {}
    try:
        with open(tmp_data, "wb") as f:
            for t in model.graph.initializer:
                external = t.data_location == onnx.TensorProto.EXTERNAL
                inline_stays = not (move_inline and t.HasField("raw_data") and _nbytes(t) >= EXTERNAL_MIN_BYTES)
                if (external and keep) or (not external and inline_stays):
                    out.graph.initializer.append(t)  # kept refs, and small or typed-field tensors, stay as they are
                    continue
                f.seek(-f.tell() % _ALIGN, os.SEEK_CUR)
                offset = f.tell()
                if external:
                    _copy_external(t, weights_dir, f, sources)
                else:
                    f.write(t.raw_data)
                out.graph.initializer.append(_external_ref(t, data.name, offset, f.tell() - offset))
            wrote = f.tell() > 0
        onnx.save(out, str(tmp))
        if wrote:
            os.replace(tmp_data, data)
        os.replace(tmp, path)
    finally:
        for handle in sources.values():
            handle.close()
        for leftover in (tmp_data, tmp):
            if leftover.exists():
                leftover.unlink()


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model but for its main graph's initializers, made without copying their bytes."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    return out


def _copy_fields(src, dst, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "extend"):  # a repeated field
            getattr(dst, field.name).extend(value)
        elif field.message_type:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _external_ref(t: onnx.TensorProto, location: str, offset: int, length: int) -> onnx.TensorProto:
    ref = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, doc_string=t.doc_string,
                           data_location=onnx.TensorProto.EXTERNAL)
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        ref.external_data.add(key=k, value=v)
    return ref


def _external_info(t: onnx.TensorProto, weights_dir: Path | None) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor; its location must be a plain name inside `weights_dir`."""
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    if weights_dir is None or not location or Path(location).is_absolute() or ".." in Path(location).parts:
        raise PipelineError(f"tensor {t.name!r}: its external data {location!r} cannot be read"
                            + ("" if weights_dir else " (no folder given for the model's weights)"))
    file = weights_dir / location
    length = int(info["length"]) if "length" in info else file.stat().st_size - int(info.get("offset", 0))
    return file, int(info.get("offset", 0)), length


def _copy_external(t: onnx.TensorProto, weights_dir: Path, out, sources: dict[str, Any]) -> None:
    """Copy an external tensor's bytes into the open file `out`, in chunks (never the whole tensor in memory)."""
    file, offset, length = _external_info(t, weights_dir)
    if str(file) not in sources:
        sources[str(file)] = open(file, "rb")
    src = sources[str(file)]
    src.seek(offset)
    while length > 0:
        chunk = src.read(min(length, 1 << 26))
        if not chunk:
            raise PipelineError(f"tensor {t.name!r}: its external data file {file.name} is truncated")
        out.write(chunk)
        length -= len(chunk)


def external_bytes(t: onnx.TensorProto, weights_dir: Path | None) -> np.ndarray:
    """An external tensor's stored bytes (uint8), read from its file without touching the proto."""
    file, offset, length = _external_info(t, weights_dir)
    data = np.fromfile(file, dtype=np.uint8, count=length, offset=offset)
    if data.size != length:
        raise PipelineError(f"tensor {t.name!r}: its external data file {file.name} is truncated")
    return data


def tensor_array(t: onnx.TensorProto, weights_dir: Path | None = None) -> np.ndarray:
    """A tensor's value, read from its external-data file in `weights_dir` when the proto left it there."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        _external_info(t, weights_dir)  # one clear error for a location that cannot be read
        return numpy_helper.to_array(t, base_dir=str(weights_dir))  # (onnx reads it without changing `t`)
    return numpy_helper.to_array(t)


def stage_model(model: onnx.ModelProto, weights_dir: Path | None, folder: Path, name: str,
                every_weight: bool = False) -> Path:
    """Write a (light) model into `folder` for a tool that reads files (ONNX Runtime, onnxsim): the external-data
    files it points at are hard-linked there from `weights_dir` (copied across file systems; the onnx package
    itself refuses to read through a link), weights it holds go to a data file of its own when they are too
    many for one proto (`save_onnx`), or, with `every_weight`, whenever they reach EXTERNAL_MIN_BYTES.
    Returns the model's path."""
    import shutil

    for t in _external(model):
        file, _, _ = _external_info(t, weights_dir)
        target = folder / file.relative_to(weights_dir)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(file, target)
            except OSError:
                shutil.copyfile(file, target)
    path = folder / name
    if every_weight:
        _save_external(model, path, folder, move_inline=True)
    else:
        save_onnx(model, path, weights_dir=folder)
    return path
