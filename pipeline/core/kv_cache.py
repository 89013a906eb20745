"""The in-place KV cache convention: layer graphs whose past and present share one preallocated buffer.

`fuse_attention` with `kv_cache: in_place` turns a layer's attention into ONNX
Runtime's GroupQueryAttention. Such a graph takes, besides its hidden state:

- `past_key` / `past_value` [B, H, capacity, D]: a buffer for every position of
  the generation, of which the first `seqlens_k + 1 - S` are the cache so far;
  `present_key` / `present_value` are the same buffer (bind both to one
  OrtValue), and a step writes only its S new positions into it;
- `seqlens_k` int32 [B]: total length after this step, minus one;
- `total_sequence_length` int32 scalar: the same total (batch 1);
- `cos_cache` / `sin_cache` [positions, D/2]: the rotary tables of every
  position, computed once per generation instead of in every layer every step
  (when the attention had a rotary embedding).

The graph's metadata says it (`kv_cache.layout`), and holds the rotary inverse
frequencies the tables are built from (`kv_cache.rotary_inv_freq`), read off
the graph by the pass, so a runtime needs no model config to build them.

A graph of the other convention (present = past ++ new, a new tensor each
call) is what exporters write and checks compare against. `contract_feeds`
feeds an in-place graph the other convention's inputs (a buffer exactly the
size of past + new, so its presents come out as past + new too), so
calibration capture and the per-block check run either kind alike.

`KVBuffers` and `InPlaceKV` hold a generation's cache, of either convention,
for a runtime that chains graphs with io_binding: preallocated once per
generation, no cache allocated per step.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from pipeline.core.errors import PipelineError
from pipeline.core.onnx_io import parse_graph

LAYOUT_KEY = "kv_cache.layout"
INV_FREQ_KEY = "kv_cache.rotary_inv_freq"
IN_PLACE = "in_place"
SEQLENS, TOTAL, COS, SIN = "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"
STEP_INPUTS = (SEQLENS, TOTAL, COS, SIN)


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def is_in_place(input_names) -> bool:
    """A graph of the in-place convention, told by its inputs (as a session or a proto lists them)."""
    return SEQLENS in set(input_names)


def inv_freq_of(model: onnx.ModelProto | Path) -> np.ndarray | None:
    """The rotary inverse frequencies an in-place graph's tables are built from; None without rotary."""
    if not isinstance(model, onnx.ModelProto):
        model = parse_graph(model)
    value = metadata(model).get(INV_FREQ_KEY)
    return None if value is None else np.array(json.loads(value), np.float32)


def rotary_tables(inv_freq: np.ndarray, positions: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [positions, D/2] of angle position * inv_freq, computed in float32 as the exported graphs do."""
    angles = np.arange(positions, dtype=np.float32)[:, None] * inv_freq[None, :].astype(np.float32)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def step_inputs(total: int, batch: int = 1) -> dict[str, np.ndarray]:
    """seqlens_k and total_sequence_length for a step that brings the cache to `total` positions."""
    return {SEQLENS: np.full(batch, total - 1, np.int32), TOTAL: np.array(total, np.int32)}


def contract_feeds(feeds: dict[str, np.ndarray], inv_freq: np.ndarray | None,
                   hidden: str | None = None) -> dict[str, np.ndarray]:
    """An in-place graph's inputs for a step given as {hidden [B, S, ...], past_key [B, H, P, D], past_value}
    (or, for a graph of many layers, past_key_N / past_value_N each): buffers of exactly P + S positions
    holding the past, and the step's lengths and tables. `hidden` names the input whose first two axes are
    batch and the step's tokens (default: the first other input of rank 2 or more)."""
    pasts = [k for k in feeds if k.startswith(("past_key", "past_value"))]
    if hidden is None:
        hidden = next(k for k, v in feeds.items() if k not in pasts and np.ndim(v) >= 2)
    batch, new = feeds[hidden].shape[:2]
    past = feeds[pasts[0]].shape[2]
    if batch != 1 and past and new > 1:
        # ORT's GroupQueryAttention: "batch_size must be 1 when sequence_length > 1 and past context is given"
        raise ValueError("in-place KV graphs take a multi-token step on a cache at batch 1 only")
    total = past + new
    out = {k: v for k, v in feeds.items() if k not in pasts}
    for name in pasts:
        value = feeds[name]
        buf = np.zeros((*value.shape[:2], total, value.shape[3]), value.dtype)
        buf[:, :, :past] = value
        out[name] = buf
    out.update(step_inputs(total, batch))
    if inv_freq is not None:
        out[COS], out[SIN] = rotary_tables(inv_freq, total, feeds[pasts[0]].dtype)
    return out


def feed_adapter(graph: Path):
    """feeds -> feeds for `graph`: `contract_feeds` when it is an in-place graph, else unchanged."""
    model = parse_graph(graph)
    if not is_in_place(i.name for i in model.graph.input):
        return lambda feeds: feeds
    inv_freq = inv_freq_of(model)
    return lambda feeds: feeds if SEQLENS in feeds else contract_feeds(feeds, inv_freq)


class KVBuffers:
    """The KV cache of one generation, for up to `max_len` positions: per layer and per K/V, two flat buffers
    used in turn (the past in one, the present written into the other)."""

    def __init__(self, layers: int, heads: int, head_dim: int, max_len: int, batch: int = 1):
        self.dims = (batch, heads, head_dim)
        self.max_len = max_len
        # np.empty, not zeros: the OS commits the pages only as the cache grows into them. One array, so
        # one allocation; each [layer, kv, side] row is a flat, contiguous buffer.
        self.data = np.empty((layers, 2, 2, batch * heads * max_len * head_dim), np.float32)
        self.length = 0
        self.side = 0  # which of each pair holds the cache so far
        self.past = [self._values(layer, 0, 0) for layer in range(layers)]

    def _values(self, layer: int, side: int, length: int) -> tuple[ort.OrtValue, ort.OrtValue]:
        """(key, value) over the first `length` positions of one buffer of each pair, as [B, H, length, D]."""
        b, h, d = self.dims
        views = (self.data[layer, kv, side, :b * h * length * d].reshape(b, h, length, d) for kv in (0, 1))
        return tuple(ort.OrtValue.ortvalue_from_numpy(v) for v in views)

    def grow(self, new: int) -> list[tuple[tuple[ort.OrtValue, ort.OrtValue], tuple[ort.OrtValue, ort.OrtValue]]]:
        """Per layer ((past_key, past_value), (present_key, present_value)) for a step adding `new` positions;
        the cache counts as grown from here on."""
        if self.length + new > self.max_len:
            raise PipelineError(f"KV cache full: {self.length} + {new} positions exceed the {self.max_len} "
                                f"allocated for this generation")
        present = [self._values(layer, 1 - self.side, self.length + new) for layer in range(len(self.past))]
        pairs = list(zip(self.past, present))
        self.past, self.side, self.length = present, 1 - self.side, self.length + new
        return pairs

    def pointers(self) -> set[int]:
        """Addresses of all the buffers: every cache a step binds lies at one of them."""
        layers = self.data.shape[0]
        return {self.data[i, kv, s].ctypes.data for i in range(layers) for kv in (0, 1) for s in (0, 1)}


class InPlaceKV:
    """The KV cache of one generation for layers that keep it in place: per layer one key and one value
    buffer for `max_len` positions, bound once as both past and present; a step writes only its new
    positions. The step's lengths and the rotary tables are shared by every layer: the lengths are two
    small arrays updated in place, the tables computed once here."""

    def __init__(self, layers: int, heads: int, head_dim: int, max_len: int, inv_freq: np.ndarray | None):
        self.max_len, self.length = max_len, 0
        # np.empty: pages are committed as the cache grows into them.
        self.data = np.empty((layers, 2, 1, heads, max_len, head_dim), np.float32)
        self.lengths = step_inputs(1)
        self.shared = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self.lengths.items()}
        if inv_freq is not None:
            self.tables = dict(zip((COS, SIN), rotary_tables(inv_freq, max_len)))
            self.shared.update({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self.tables.items()})

    def layer_values(self) -> list[tuple[ort.OrtValue, ort.OrtValue]]:
        """Per layer, its (key, value) buffer: bound as its past and as its present."""
        return [tuple(ort.OrtValue.ortvalue_from_numpy(self.data[i, kv]) for kv in (0, 1))
                for i in range(self.data.shape[0])]

    def advance(self, new: int) -> None:
        """Set the step's lengths for `new` positions; the cache counts as grown from here on."""
        total = self.length + new
        if total > self.max_len:
            raise PipelineError(f"KV cache full: {self.length} + {new} positions exceed the {self.max_len} "
                                f"allocated for this generation")
        self.lengths[SEQLENS][:] = total - 1
        self.lengths[TOTAL][...] = total
        self.length = total
