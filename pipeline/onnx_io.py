"""Loading, checking and running ONNX models, with user-facing errors."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .errors import PipelineError

MAX_PROTO_BYTES = 2 * 1024**3


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load and sanity-check an ONNX file; every failure is one clear PipelineError."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"model file not found: {path}")
    if not path.is_file():
        raise PipelineError(f"model path is not a file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise PipelineError(f"model file is empty: {path}")
    if size >= MAX_PROTO_BYTES:
        raise PipelineError(f"{path}: model is over 2 GB; models with external data are not supported yet")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, or others on garbage
        raise PipelineError(f"{path}: not a valid ONNX model (truncated or corrupt?): {_one_line(e)}") from None
    _load_external_data(model, path)
    if model.ir_version == 0 or len(model.graph.node) == 0:
        raise PipelineError(f"{path}: not a valid ONNX model (no IR version or no nodes)")
    problem = _checker_problem(model)
    if problem:
        raise PipelineError(f"{path}: ONNX checker rejects the model: {problem}")
    return model


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
    model = onnx.load(str(path), load_external_data=False)
    data = external_files(path, model)
    if not data:
        return load_onnx(path)
    missing = [f.name for f in data if not f.is_file()]
    if missing:
        raise PipelineError(f"{path}: its weights file {missing[0]} is missing")
    return model


def _external(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


def external_files(path: Path, model: onnx.ModelProto | None = None) -> list[Path]:
    """The external-data files a model file's initializers live in (none for a self-contained file)."""
    model = model if model is not None else onnx.load(str(path), load_external_data=False)
    names = dict.fromkeys(e.value for t in _external(model) for e in t.external_data if e.key == "location")
    return [path.parent / n for n in names]


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Bring external weights into the proto, which then stays under protobuf's 2 GB like any other."""
    tensors = _external(model)
    if not tensors:
        return
    for f in external_files(path, model):
        if f.parent.resolve() != path.parent.resolve():
            raise PipelineError(f"{path}: external data must lie next to the model, not at {f}")
        if not f.is_file():
            raise PipelineError(f"{path}: its weights file {f.name} is missing")
    total = sum(int(next((e.value for e in t.external_data if e.key == "length"), 0)) for t in tensors)
    if total + path.stat().st_size >= MAX_PROTO_BYTES:
        raise PipelineError(f"{path}: model with its external data is over 2 GB; not supported yet")
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as e:
        raise PipelineError(f"{path}: cannot read its external data: {_one_line(e)}") from None


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


def _checker_problem(model: onnx.ModelProto) -> str | None:
    """The checker's complaint, if any, ignoring ops only ONNX Runtime registers.

    Fusions emit ORT ops such as SimplifiedLayerNormalization in the default domain;
    the checker does not know them, ORT runs them (check_loads proves it after each step).
    """
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        text = _one_line(e)
        if text.startswith("No Op registered for"):
            return None
        return text
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
            arena: bool = True, spinning: bool = True, weights_dir: Path | None = None) -> ort.InferenceSession:
    """A CPU session with a fixed thread count, so timings compare.

    `arena=False` returns freed activation memory to the system instead of keeping
    ORT's high-water mark cached, and plans no memory pattern (which caches one
    per input shape): for sessions that expose many intermediates.
    `spinning=False` stops idle worker threads from busy-waiting: for runtimes that
    chain many sessions, whose thread pools would otherwise fight over the cores.
    After `share_one_thread_pool`, the process's pool replaces both `threads` and `spinning`.
    `weights_dir`: a proto whose weights stay in external-data files reads them from there; ONNX Runtime
    maps them, and keeps them in the file's layout (no repacked copy): a session over a 1.6 GB graph then
    costs megabytes until it runs, and the check's three sessions share the pages.
    """
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = arena
    opts.enable_mem_pattern = arena
    if _shared_pool_threads is not None:
        opts.use_per_session_threads = False
    else:
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if weights_dir is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
        opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.graph_optimization_level = optimization
    opts.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else \
        model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def check_loads(model: onnx.ModelProto, what: str) -> None:
    """onnx.checker, then an ORT CPU session: a step whose result cannot load fails here."""
    problem = _checker_problem(model)
    if problem:
        raise PipelineError(f"{what}: result fails the ONNX checker: {problem}")
    try:
        session(model, threads=1, optimization=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    except Exception as e:
        raise PipelineError(f"{what}: ONNX Runtime cannot load the result: {_one_line(e)}") from None


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
            graph = onnx.shape_inference.infer_shapes(model).graph
        except Exception:  # inference is a help here; ORT checks the types anyway
            graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


# ORT's input type strings -> numpy dtypes, for feeding a value to a session that declares another float width.
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
               "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}


def as_ort_type(value: np.ndarray, ort_type: str) -> np.ndarray:
    """`value` cast to the dtype an ORT input declares (`sess.get_inputs()[i].type`), when it differs."""
    want = _ORT_DTYPES.get(ort_type)
    return value if want is None or value.dtype == want else value.astype(want)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:600] + ("..." if len(text) > 600 else "")


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Write via a temporary name in the same folder, then rename: never half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
