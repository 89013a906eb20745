"""Pinned comparisons: run a candidate with some tensors fed the reference's values.

`pin` (in `pipeline.core.graph`, with the rest of the cutting) makes a candidate take
intermediate tensors as inputs, e.g. the FP32 durations of a Piper voice, so an
audio comparison is not thrown off by a quantized duration predictor that
changes the output length. `PinnedPair` (and the one-shot `capture`,
`run_pinned`) is the comparison side: run the reference with the pinned tensors
exposed as outputs, then feed their values to the pinned candidate.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from pipeline.core.errors import PipelineError
from pipeline.core.graph import pin, with_outputs
from pipeline.core.onnx_io import as_ort_type, load_onnx, session
from pipeline.core.feeds import Feeds

__all__ = ["PinnedPair", "PinnedRun", "capture", "run_pinned"]



class PinnedPair:
    """A reference and a candidate whose `tensors` are pinned to the reference's values.

    Sessions are built once; `run(feeds)` runs the reference (capturing the
    pinned tensors along with its outputs), then the candidate fed those values.
    The candidate may be the unpinned model (pinned here) or one the `pin`
    pass already pinned; values are cast to the dtype its inputs declare
    (an FP16 candidate takes float16 durations).
    """

    def __init__(self, reference: onnx.ModelProto | str | Path, candidate: onnx.ModelProto | str | Path,
                 tensors: Sequence[str], threads: int = 2):
        self.tensors = list(dict.fromkeys(tensors))
        reference = _proto(reference)
        self.reference_outputs = [v.name for v in reference.graph.output]
        self.reference = session(with_outputs(reference, self.tensors, typed=True, what="capture"), threads=threads,
                                 spinning=False)
        candidate = _proto(candidate)
        if not set(self.tensors) <= {v.name for v in candidate.graph.input}:
            candidate = pin(candidate, self.tensors)
        self.candidate = session(candidate, threads=threads, spinning=False)

    def capture(self, feeds: Feeds) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """The reference's outputs and its values of the pinned tensors."""
        names = self.reference_outputs + [t for t in self.tensors if t not in self.reference_outputs]
        values = dict(zip(names, self.reference.run(names, _feeds_for(self.reference, feeds))))
        return [values[n] for n in self.reference_outputs], {t: values[t] for t in self.tensors}

    def run(self, feeds: Feeds) -> PinnedRun:
        reference, pinned = self.capture(feeds)
        candidate = self.candidate.run(None, _feeds_for(self.candidate, {**feeds, **pinned}))
        return PinnedRun(reference, candidate, pinned)


@dataclass
class PinnedRun:
    reference: list[np.ndarray]  # the reference's outputs
    candidate: list[np.ndarray]  # the candidate's outputs, run with the reference's pinned values
    pinned: dict[str, np.ndarray]


def capture(model: onnx.ModelProto | str | Path, feeds: Feeds, tensors: Sequence[str],
            threads: int = 2) -> dict[str, np.ndarray]:
    """The values `model` computes for `tensors` on `feeds` (one-shot; PinnedPair keeps its sessions)."""
    sess = session(with_outputs(_proto(model), tensors, typed=True, what="capture"), threads=threads)
    return dict(zip(tensors, sess.run(list(tensors), _feeds_for(sess, feeds))))


def run_pinned(reference: onnx.ModelProto | str | Path, candidate: onnx.ModelProto | str | Path,
               feeds: Feeds, tensors: Sequence[str], threads: int = 2) -> PinnedRun:
    """Run `candidate` with `tensors` pinned to the values `reference` computes on `feeds` (one-shot)."""
    return PinnedPair(reference, candidate, tensors, threads).run(feeds)


def _proto(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_onnx(model)


def _feeds_for(sess, feeds: Feeds) -> Feeds:
    """The feeds the session takes (ORT rejects unknown names), cast to the dtype each input declares."""
    inputs = sess.get_inputs()
    missing = [i.name for i in inputs if i.name not in feeds]
    if missing:
        raise PipelineError(f"feeds lack input(s) {', '.join(missing)} (given: {', '.join(feeds)})")
    return {i.name: as_ort_type(np.asarray(feeds[i.name]), i.type) for i in inputs}
