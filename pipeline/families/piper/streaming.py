"""Streaming synthesis with a split Piper voice: encode once, then decode z chunk by chunk.

As Piper's `infer_onnx_streaming.SpeechStreamer` does: z (with y_mask) is cut
into chunks of `chunk_frames` frames; each chunk is decoded together with
`pad_frames` frames of its neighbours on each side, so the flow's and the
generator's convolutions see context, and the audio of that padding
(hop * pad samples per side) is trimmed off. Piper's defaults are 45 frames
per chunk and 10 frames of padding (its command line passes 5); an utterance
no longer than chunk + 2 * pad is decoded in one go, as there.

Two departures from Piper's code: padding is taken from the whole z, not
only from the adjacent chunk (the same unless a chunk is shorter than the
padding), and the last chunk's end is not trimmed (Piper trims it by the
previous chunk's padding, dropping the utterance's last frames).

The hop (samples per frame) is read from each decode: output samples / frames.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from pipeline.core.errors import PipelineError
from pipeline.evaluation.chain import parse_edges
from pipeline.core.modelset import ModelSet
from pipeline.core.onnx_io import session
from pipeline.core.feeds import Feeds


CHUNK_FRAMES = 45  # Piper's SpeechStreamer default
PAD_FRAMES = 10  # Piper's SpeechStreamer default (its CLI uses 5)


@dataclass(frozen=True)
class Chunk:
    """Frames [start, end) are kept; frames [left, right) are decoded."""

    start: int
    end: int
    left: int
    right: int


def plan_chunks(n_frames: int, chunk_frames: int = CHUNK_FRAMES, pad_frames: int = PAD_FRAMES) -> list[Chunk]:
    """Piper's chunking of n_frames: whole when short, else chunk_frames each with pad_frames context."""
    if n_frames <= chunk_frames + 2 * pad_frames:
        return [Chunk(0, n_frames, 0, n_frames)]
    starts = range(0, n_frames, chunk_frames)
    return [Chunk(s, min(s + chunk_frames, n_frames), max(s - pad_frames, 0),
                  min(s + chunk_frames + pad_frames, n_frames)) for s in starts]


@dataclass
class StreamTiming:
    first_audio_s: float  # from the call until the first chunk of audio is ready (encoder + first decode)
    total_s: float  # until the last chunk is ready
    encoder_s: float
    chunks: int
    samples: int


class PiperStreaming:
    """Encoder once, decoder per chunk; `stream(feeds)` yields 1-D float32 audio chunks as they come.

    `encoder` and `decoder` are ONNX paths or protos; `chain` maps encoder
    outputs to decoder inputs ({"from": "encoder.z", "to": "decoder.z"}),
    by default by equal names. Batch size 1.
    """

    def __init__(self, encoder: str | Path | onnx.ModelProto, decoder: str | Path | onnx.ModelProto,
                 chunk_frames: int = CHUNK_FRAMES, pad_frames: int = PAD_FRAMES, threads: int = 2,
                 chain: list[dict[str, str]] | None = None):
        if chunk_frames < 1 or pad_frames < 0:
            raise PipelineError(f"streaming needs chunk_frames >= 1 and pad_frames >= 0 "
                                f"(got {chunk_frames}, {pad_frames})")
        self.chunk_frames, self.pad_frames = chunk_frames, pad_frames
        # Two sessions take turns: without spinning, the idle one's threads leave the cores to the other
        # (with spinning, time to first audio measured here doubled).
        self.encoder = session(_source(encoder), threads=threads, spinning=False)
        self.decoder = session(_source(decoder), threads=threads, spinning=False)
        self.encoder_inputs = [i.name for i in self.encoder.get_inputs()]
        self.decoder_inputs = [i.name for i in self.decoder.get_inputs()]
        self.handover = self._handover(chain or [])

    @classmethod
    def from_modelset(cls, folder: str | Path, **kwargs) -> PiperStreaming:
        """From a split ModelSet folder (graphs `encoder` and `decoder`, chained by the split pass)."""
        ms = ModelSet.read(Path(folder))
        ms.require_unchanged()
        return cls(ms.path("encoder"), ms.path("decoder"), chain=ms.chain, **kwargs)

    def _handover(self, chain: list[dict[str, str]]) -> dict[str, str]:
        """Encoder output -> decoder input."""
        outputs = [o.name for o in self.encoder.get_outputs()]
        pairs = {e.src_tensor: e.dst_tensor for e in parse_edges(chain, "streaming")
                 if (e.src_graph, e.dst_graph) == ("encoder", "decoder")}
        pairs = pairs or {name: name for name in outputs if name in self.decoder_inputs}
        unfed = [name for name in self.decoder_inputs if name not in pairs.values()]
        if unfed:
            raise PipelineError(f"streaming: decoder input(s) {', '.join(unfed)} come from no encoder output "
                                f"(encoder outputs: {', '.join(outputs)})")
        return pairs

    def encode(self, feeds: Feeds) -> Feeds:
        """Run the encoder; returns the decoder's feeds (z, y_mask, g) for the whole utterance."""
        missing = [n for n in self.encoder_inputs if n not in feeds]
        if missing:
            raise PipelineError(f"streaming: feeds lack encoder input(s) {', '.join(missing)}")
        names = list(self.handover)
        values = self.encoder.run(names, {n: feeds[n] for n in self.encoder_inputs})
        latents = {self.handover[n]: v for n, v in zip(names, values)}
        if next(iter(latents.values())).shape[0] != 1:
            raise PipelineError("streaming synthesis takes one utterance at a time (batch size 1)")
        return latents

    def frames(self, latents: Feeds) -> int:
        """Frames of the utterance: the time axis of z (the first decoder input)."""
        return latents[self.decoder_inputs[0]].shape[-1]

    def decode(self, latents: Feeds) -> np.ndarray:
        """The whole utterance in one decoder run (what the monolithic model gives)."""
        return self.decoder.run(None, latents)[0].reshape(-1)

    def decode_chunks(self, latents: Feeds) -> Iterator[np.ndarray]:
        n = self.frames(latents)
        for chunk in plan_chunks(n, self.chunk_frames, self.pad_frames):
            # Tensors with the utterance's time axis are cut; g ([1, C, 1]) goes whole.
            feeds = {k: v[..., chunk.left:chunk.right] if v.shape[-1] == n else v for k, v in latents.items()}
            audio = self.decoder.run(None, feeds)[0].reshape(-1)
            hop = _hop(audio.size, chunk.right - chunk.left)
            skip = (chunk.start - chunk.left) * hop
            yield audio[skip:skip + (chunk.end - chunk.start) * hop]

    def stream(self, feeds: Feeds) -> Iterator[np.ndarray]:
        """Audio chunks (1-D float32) as they are decoded."""
        yield from self.decode_chunks(self.encode(feeds))

    def synthesize(self, feeds: Feeds) -> np.ndarray:
        return np.concatenate(list(self.stream(feeds)))

    def timed(self, feeds: Feeds) -> tuple[np.ndarray, StreamTiming]:
        """Stream the utterance and time it: time to first audio, total, encoder."""
        t0 = time.perf_counter()
        latents = self.encode(feeds)
        encoder_s = time.perf_counter() - t0
        chunks, first = [], None
        for audio in self.decode_chunks(latents):
            first = first if first is not None else time.perf_counter() - t0
            chunks.append(audio)
        total = time.perf_counter() - t0
        audio = np.concatenate(chunks)
        return audio, StreamTiming(first, total, encoder_s, len(chunks), audio.size)


def _source(model: str | Path | onnx.ModelProto) -> str | Path | onnx.ModelProto:
    if not isinstance(model, onnx.ModelProto) and not Path(model).is_file():
        raise PipelineError(f"streaming: model file not found: {model}")
    return model


def _hop(samples: int, frames: int) -> int:
    if frames <= 0 or samples % frames:
        raise PipelineError(f"streaming: decoder gave {samples} samples for {frames} frames, not a whole hop per frame")
    return samples // frames
