"""What the checks of autoregressive-loop families share (ChatTTS, Tortoise: `Family.check_loop`).

Such a family captures every graph's inputs in one sweep of its own loop on the FP32 model (a prefill, the
decode steps with their real cache), then hands each graph its share: `captured_feeds`.
"""
from __future__ import annotations

from pipeline.core.errors import PipelineError
from pipeline.core.feeds import Feeds


def captured_feeds(captured: dict[str, list[Feeds]], graph: str, model: str, samples: str) -> list[Feeds]:
    """`graph`'s share of a one-sweep capture of a `model` (ChatTTS, Tortoise) loop over its `samples` (prompts,
    sentences); a graph without a capture, or without inputs, is an error."""
    if graph not in captured:
        raise PipelineError(f"calibration: no capture for {model} graph {graph!r} (captured: {', '.join(captured)})")
    if not captured[graph]:
        raise PipelineError(f"calibration: the {samples} gave no inputs for {graph!r}")
    return captured[graph]
