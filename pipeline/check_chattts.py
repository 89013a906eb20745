"""Per-block error for ChatTTS GPT model sets, where every graph is a block, plus token metrics.

For each prompt the FP32 model first continues it greedily for `steps` tokens;
that whole sequence is then run as one prefill through both model sets:
- **isolated**: each candidate graph fed the reference's input to that graph;
- **accumulated**: the candidate's own chain;
for every graph's outputs (a layer's hidden state and its present key/value),
pooled over prompts like `pipeline.check`. Token metrics on the same run:
teacher-forced top-1 agreement and KL(reference || candidate) of the next-token
distribution at every generated position, and, decoding freely and greedily
with the candidate, the first step whose token differs from the reference's.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .blocks import BlockPartition
from .check import BlockReport, CheckResult, Pooled, _precision_mix
from .onnx_io import tensor_types
from .procinfo import peak_rss_mb
from .recipe import BlockSpec
from .runtime.chattts import ChatTTSRuntime


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _chain(rt: ChatTTSRuntime, ids: np.ndarray, feed_from: dict[str, np.ndarray] | None = None):
    """Run embed -> layers -> norm -> text head; with `feed_from`, every graph gets that input instead
    of its predecessor's output (isolated mode). Returns {graph: [outputs]} and {graph: input}."""
    empty = rt._empty_cache(1)[0][0]
    outs, ins = {}, {}
    outs["embed_text"] = rt.sessions["embed_text"].run(None, {"input_ids": ids})
    h = outs["embed_text"][0]
    for name in rt.layers:
        ins[name] = h = feed_from[name] if feed_from else h
        outs[name] = rt.sessions[name].run(None, {"hidden": h, "past_key": empty, "past_value": empty})
        h = outs[name][0]
    for name in ("norm", "lm_head_text"):
        ins[name] = h = feed_from[name] if feed_from else h
        outs[name] = rt.sessions[name].run(None, {"hidden": h})
        h = outs[name][0]
    return outs, ins


def _graph_facts(rt: ChatTTSRuntime, name: str) -> tuple[int, int, dict[str, int], dict[str, int]]:
    path = rt.ms.path(name)
    model = onnx.load(str(path))
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    weights: dict[str, int] = {}
    for t in model.graph.initializer:
        kind = onnx.TensorProto.DataType.Name(t.data_type).lower()
        weights[kind] = weights.get(kind, 0) + numpy_helper.to_array(t).nbytes
    mix = _precision_mix(model, BlockPartition(model, BlockSpec(patterns=[r"^"])), tensor_types(model)).get("", {})
    return params, path.stat().st_size, mix, weights


def compare_chattts(reference: Path, candidate: Path, prompts: list[list[int]], steps: int = 16,
                    threads: int = 2, progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    t0 = time.perf_counter()
    ref, cand = ChatTTSRuntime(reference, threads), ChatTTSRuntime(candidate, threads)
    blocks = ["embed_text", *ref.layers, "norm", "lm_head_text"]
    iso = {b: Pooled() for b in blocks}
    acc = {b: Pooled() for b in blocks}
    agree: list[bool] = []
    kls: list[float] = []
    divergence: list[int | None] = []
    for i, prompt in enumerate(prompts):
        progress(f"prompt {i + 1}/{len(prompts)}")
        continuation = ref.generate_text(prompt, steps).ids
        ids = np.array([prompt + continuation], np.int64)
        ref_out, ref_in = _chain(ref, ids)
        iso_out, _ = _chain(cand, ids, feed_from=ref_in)
        acc_out, _ = _chain(cand, ids)
        for b in blocks:
            for r, c_iso, c_acc in zip(ref_out[b], iso_out[b], acc_out[b]):
                iso[b].update(r, c_iso)
                acc[b].update(r, c_acc)
        # Positions len(prompt)-1 .. end-1 predict the generated tokens.
        lr = _log_softmax(ref_out["lm_head_text"][0][0, len(prompt) - 1:-1])
        lc = _log_softmax(acc_out["lm_head_text"][0][0, len(prompt) - 1:-1])
        agree += (lr.argmax(-1) == lc.argmax(-1)).tolist()
        kls += (np.exp(lr) * (lr - lc)).sum(-1).tolist()
        free = cand.generate_text(prompt, steps).ids
        divergence.append(next((k for k, (a, b) in enumerate(zip(continuation, free)) if a != b), None))
    reports = []
    for b in blocks:
        params, bytes_ref, _, _ = _graph_facts(ref, b)
        _, bytes_cand, mix, weights = _graph_facts(cand, b)
        r = BlockReport(b, params, bytes_ref, bytes_cand, mix, weights, outputs=[o.name for o in
                        cand.sessions[b].get_outputs()], matched=True, unmatched_tensors=[])
        r.isolated, r.accumulated = iso[b], acc[b]
        reports.append(r)
    meta = ref.ms.meta
    notes = []
    if meta.get("seeded"):
        notes.append(f"SEEDED RANDOM WEIGHTS ({meta.get('source')}): ChatTTS's exact config, untrained; logits are "
                     f"near-uniform, so token agreement only means something on trained weights")
    result = CheckResult(len(prompts), str(reference), str(candidate), reports, [], peak_rss_mb(),
                         time.perf_counter() - t0, notes)
    report = result.to_json()
    report["outputs"] = [{"name": "lm_head_text.logits", **acc["lm_head_text"].to_json()}]
    diverged = [d for d in divergence if d is not None]
    report["tokens"] = {
        "decode_steps": steps,
        "teacher_forced_top1_agreement": float(np.mean(agree)) if agree else None,
        "teacher_forced_kl_mean": float(np.mean(kls)) if kls else None,
        "teacher_forced_kl_max": float(np.max(kls)) if kls else None,
        "first_divergence_steps": divergence,
        "prompts_diverged": len(diverged),
        "first_divergence_min": min(diverged) if diverged else None,
    }
    return report
