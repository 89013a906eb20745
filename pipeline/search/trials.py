"""Tune trials and where they run: this process's worker processes, or Ray tasks.

A trial runs one candidate graph on the tune samples and measures its first
output against the FP32 reference's: pooled SQNR (and the noise ratio behind
it, which adds up over independent errors), the log-mel distance of every
sample where the family makes audio, and the length change. A screening
trial's candidate is the FP32 graph with one block spliced in from the graph
where a menu item treated every searched block (`check.splice_block`); a
verification trial measures a whole built model.

A trial is a plain function of picklable arguments, so the same code runs in a
`ProcessPoolExecutor` worker or as a Ray task; models travel as file paths
(local) or bytes through Ray's object store, and every process keeps the graphs
it parsed, by content hash, for the trials that follow.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import onnx

from pipeline.core.feeds import Feeds

from pipeline.core.errors import PipelineError, one_line

RAY_EXTRA = "pip install -e '.[ray]' (or pip install 'tts-onnx-pipeline[ray]')"
RAY_CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class TrialSpec:
    key: str  # cache key (content of the graphs, block, samples, tool version)
    reference: str  # sha256 of the reference graph
    candidate: str  # sha256 of the candidate graph
    block: str | None  # splice this block of the candidate into the reference; None: the candidate whole
    blocks: dict[str, Any] | None  # the recipe's BlockSpec, as JSON
    mel: Any  # the family's audio MelSettings, or None when it makes no audio
    threads: int = 1
    output: str | None = None  # the output measured (a declared audio output); None: the first


_GRAPHS: dict[str, tuple[onnx.ModelProto, Any]] = {}  # sha256 -> (light model, partition), per process
_WEIGHTS: list[Any] = []  # this process's scratch folder: every graph's weights, one subfolder per sha256


def _weights_root() -> Path:
    """Where this process's trials map their graphs' weights from: a scratch folder removed when it exits."""
    if not _WEIGHTS:
        import tempfile
        from multiprocessing import util

        folder = tempfile.TemporaryDirectory(prefix="pipeline-trials-")
        util.Finalize(None, folder.cleanup, exitpriority=10)  # a pool worker ends in os._exit: no atexit there
        _WEIGHTS.append(folder)
    return Path(_WEIGHTS[0].name)


def release_graphs() -> None:
    """Forget the graphs this process parsed and remove their weights (a worker's go when it exits; the search's
    own process, which runs the verification trials, calls this when the search ends)."""
    _GRAPHS.clear()
    if _WEIGHTS:
        _WEIGHTS.pop().cleanup()


def _graph(sha: str, source: bytes | str, blocks: dict[str, Any] | None):
    """The graph with that hash. From a file (this machine's workers): light, its weights written once into
    `_weights_root()/<sha>`, each external tensor's location rooted there, so a splice of two graphs reads both
    from one folder. Held whole, a worker kept the base, every menu item's graph, the spliced copy and the
    session's own copy of the weights: 3.5 GB on a 325 MB Kokoro, over the 4x file + 1 GB a pass or check may
    take. From bytes (a Ray task): whole, as received; Ray ends its workers without letting them clean up, so
    they write no files."""
    if sha not in _GRAPHS:
        from pipeline.core.blocks import BlockPartition
        from pipeline.core.recipe import BlockSpec

        model = onnx.load_from_string(source) if isinstance(source, bytes) else _mapped(sha, Path(source))
        _GRAPHS[sha] = (model, BlockPartition(model, BlockSpec.model_validate(blocks) if blocks else None))
    return _GRAPHS[sha]


def _mapped(sha: str, path: Path) -> onnx.ModelProto:
    from pipeline.core.onnx_io import load_mapped, stage_model

    folder = _weights_root() / sha[:32]
    model, weights = load_mapped(path, folder)
    if weights != folder:  # a file whose weights were external already: its data files linked in
        stage_model(model, weights, folder, "linked.onnx")
    for t in model.graph.initializer:
        for entry in t.external_data if t.data_location == onnx.TensorProto.EXTERNAL else ():
            if entry.key == "location":
                entry.value = f"{folder.name}/{entry.value}"
    return model


def run_trial(spec: TrialSpec, reference: bytes | str, candidate: bytes | str, samples: list[Feeds],
              ref_outputs: list[np.ndarray]) -> dict[str, Any]:
    """The candidate's output (`spec.output`, else the first) on every sample against the reference's
    (`ref_outputs`)."""
    from pipeline.core.audio import compare_audio
    from pipeline.evaluation.blockwise import Pooled, splice_block
    from pipeline.core.onnx_io import session
    from pipeline.core.procinfo import peak_rss_mb

    t0 = time.perf_counter()
    cand_model, cand_part = _graph(spec.candidate, candidate, spec.blocks)
    if spec.block is None:
        model = cand_model
    else:
        ref_model, ref_part = _graph(spec.reference, reference, spec.blocks)
        model = splice_block(ref_model, cand_model, ref_part, cand_part, spec.block)
    mapped = isinstance(candidate, str)  # (see `_graph`)
    sess = session(model, threads=spec.threads, arena=False, weights_dir=_weights_root() if mapped else None)
    output = spec.output or sess.get_outputs()[0].name
    pooled, log_mels, lengths = Pooled(), [], []
    for feeds, ref in zip(samples, ref_outputs):
        out = sess.run([output], feeds)[0]
        pooled.update(ref, out)
        lengths.append((out.size - ref.size) / max(ref.size, 1))
        if spec.mel is not None:
            log_mels.append(compare_audio(ref, out, mel=spec.mel).log_mel_distance)
    result = {
        "sqnr_db": pooled.sqnr_db if pooled.samples else None,
        # noise / signal energy over the samples that kept their length: what adds up across blocks
        "noise_ratio": (pooled.see / pooled.sxx) if pooled.sxx > 0 else 0.0,
        "length_change_max": float(max(abs(x) for x in lengths)),
        "samples_with_length_change": int(sum(x != 0 for x in lengths)),
        "wall_s": round(time.perf_counter() - t0, 3),
        "worker_peak_rss_mb": round(peak_rss_mb(), 1),  # the worker process's peak so far: what sizes a cluster
    }
    if log_mels:
        result["log_mel_max"] = float(max(log_mels))
        result["log_mel_mean"] = float(np.mean(log_mels))
    if result["sqnr_db"] is not None and not np.isfinite(result["sqnr_db"]):
        result["sqnr_db"] = "inf" if result["sqnr_db"] > 0 else "-inf"
    return result


class Executor:
    """Runs trials; `map` yields (spec, result) as they finish, in any order."""

    def map(self, specs: list[TrialSpec], sources: dict[str, str], samples: list[Feeds],
            ref_outputs: list[np.ndarray]) -> Iterator[tuple[TrialSpec, dict[str, Any]]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalExecutor(Executor):
    """Trials in worker processes on this machine (spawned: ONNX Runtime's threads do not survive a fork)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def map(self, specs, sources, samples, ref_outputs):
        if self.workers == 1 or len(specs) == 1:  # no process start for one trial at a time
            for s in specs:
                yield s, run_trial(s, sources[s.reference], sources[s.candidate], samples, ref_outputs)
            return
        if self._pool is None:
            import multiprocessing

            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        futures = {self._pool.submit(run_trial, s, sources[s.reference], sources[s.candidate], samples,
                                     ref_outputs): s for s in specs}
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        try:
            for f in as_completed(futures):
                yield futures[f], f.result()
        except BrokenProcessPool:
            raise PipelineError(f"tune: a trial worker process died (the system ends one that runs out of memory "
                                f"first); try fewer workers than {self.workers} (tune.workers)") from None

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


class RayExecutor(Executor):
    """Trials as Ray tasks; models and samples go to the object store once and are shared by every task."""

    def __init__(self, address: str | None, workers: int | None, threads: int, log: Callable[[str], None]):
        ray = require_ray()  # the address was probed when the recipe was checked (tune.validate_tune)
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True,
                                  "logging_level": "ERROR"}
        if address is None:
            kwargs["num_cpus"] = workers * threads if workers else os.cpu_count()
            # The workers import this package: on a local instance they share this interpreter's environment.
        else:
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, TimeoutError) as e:
            where = address or "a local instance"
            raise PipelineError(f"tune: cannot start Ray on {where}: {one_line(e)}") from None
        self.ray = ray
        self.threads = threads
        self._remote = ray.remote(num_cpus=threads, max_retries=1)(run_trial)
        resources = ray.cluster_resources()
        log(f"tune: Ray {'at ' + address if address else 'local instance'}: {resources.get('CPU', 0):.0f} CPUs, "
            f"{resources.get('CPU', 0) / threads:.0f} trials at once")
        self._refs: dict[str, Any] = {}

    def _ref(self, key: str, value: Any):
        if key not in self._refs:
            self._refs[key] = self.ray.put(value)
        return self._refs[key]

    def map(self, specs, sources, samples, ref_outputs):
        from pathlib import Path

        samples_ref = self._ref("samples", samples)
        outputs_ref = self._ref("ref_outputs", ref_outputs)
        pending = {}
        for s in specs:
            ref = self._ref(s.reference, Path(sources[s.reference]).read_bytes())
            cand = self._ref(s.candidate, Path(sources[s.candidate]).read_bytes())
            pending[self._remote.remote(s, ref, cand, samples_ref, outputs_ref)] = s
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1)
            for d in done:
                yield pending.pop(d), self.ray.get(d)

    def close(self):
        self._refs.clear()
        self.ray.shutdown()


def require_ray():
    if importlib.util.find_spec("ray") is None:
        raise PipelineError(f"tune: executor 'ray' needs Ray, which is not installed: {RAY_EXTRA}")
    import ray

    return ray


def probe_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """A Ray address that does not answer fails within `timeout` seconds instead of hanging."""
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    if not parsed.hostname or not parsed.port:
        raise PipelineError(f"tune: Ray address {address!r} is not 'auto', 'host:port' or 'ray://host:port'")
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout):
            pass
    except OSError as e:
        raise PipelineError(f"tune: Ray address {address!r} does not answer within {timeout:.0f} s "
                            f"({e.strerror or e})") from None


def make_executor(kind: str, address: str | None, workers: int | None, threads: int,
                  log: Callable[[str], None]) -> Executor:
    if kind == "ray":
        return RayExecutor(address, workers, threads, log)
    return LocalExecutor(workers or max(1, (os.cpu_count() or 1) // threads))
