"""Per-block error for ChatTTS GPT model sets, where every graph is a block, plus token metrics.

For each prompt the FP32 model continues it greedily twice: `steps` text
tokens, and `steps` audio-code frames. Each continuation is then run as one
teacher-forced prefill through both model sets:
- **isolated**: each candidate graph fed the reference's input to that graph;
- **accumulated**: the candidate's own chain;
for every graph's outputs (a layer's hidden state and its present key/value),
pooled over prompts like `pipeline.evaluation.blockwise`. Token metrics, for the text head and
for the code head (one distribution per codebook): teacher-forced top-1
agreement and KL(reference || candidate) at every generated position, and,
decoding freely and greedily with the candidate, the first step whose token
(or frame) differs from the reference's.

`chattts_graph_feeds` captures calibration inputs for one graph the same way,
from the FP32 model's own sampled audio codes.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.core import progress as progress_display
from pipeline.core.feeds import Feeds
from pipeline.core.onnx_io import tensor_types
from pipeline.core.precision import compute_mix
from pipeline.core.procinfo import peak_rss_mb
from pipeline.evaluation import loops
from pipeline.evaluation.blockwise import BlockReport, Pooled
from pipeline.evaluation.metrics import HeadMetrics
from pipeline.evaluation.results import CheckReport, OutputResult

from .runtime import ChatTTSRuntime


def _embed(rt: ChatTTSRuntime, prompt: list[int], frames: list[list[int]] | None = None) -> dict[str, np.ndarray]:
    """Embedding graphs' outputs for a text prompt, then (audio mode) its code frames."""
    outs = {"embed_text": rt.sessions["embed_text"].run(None, {"input_ids": np.array([prompt], np.int64)})[0]}
    if frames:
        outs["embed_code"] = rt.sessions["embed_code"].run(None, {"input_ids": np.array([frames], np.int64)})[0]
    return outs


def _chain(rt: ChatTTSRuntime, prompt: list[int], frames: list[list[int]] | None,
           feed_from: dict[str, np.ndarray] | None = None):
    """One teacher-forced prefill of prompt (+ frames): embeddings -> layers -> norm -> the text head, or the
    code head when frames are given. With `feed_from`, every graph gets that input instead of its
    predecessor's output (isolated mode). Returns {graph: [outputs]} and {graph: its hidden input}."""
    outs = {k: [v] for k, v in _embed(rt, prompt, frames).items()}
    h = np.concatenate([v[0] for v in outs.values()], axis=1)
    empty = rt.empty_kv()
    ins = {}
    for name in rt.layers:
        ins[name] = h = feed_from[name] if feed_from else h
        outs[name] = rt.run_layer(name, h, empty, empty)
        h = outs[name][0]
    for name in ("norm", "lm_head_code" if frames else "lm_head_text"):
        ins[name] = h = feed_from[name] if feed_from else h
        outs[name] = rt.sessions[name].run(None, {"hidden": h})
        h = outs[name][0]
    return outs, ins


def capture_chattts(reference: Path, entry_feeds: list[Feeds], frames: int = 16) -> dict[str, list[Feeds]]:
    """Calibration inputs of every graph of a ChatTTS model set (but the sample head), captured in one
    sweep from the FP32 model on real prompts.

    Each prompt is continued by the FP32 model's own audio-code generation (infer_code's sampling,
    seeded), then prompt + codes run as one teacher-forced prefill, so decode-path activations are the
    model's own. A layer gets two feeds a prompt: that prefill (empty cache), and the last position as a
    decode step with the cache of all before it, which causality makes equal to a real decode step."""
    from .runtime import infer_code_sampling

    rt = ChatTTSRuntime(reference)
    captured: dict[str, list[Feeds]] = {g: [] for g in ("embed_text", "embed_code", *rt.layers, "norm",
                                                        "lm_head_text", "lm_head_code")}
    empty = rt.empty_kv()
    for i, f in enumerate(entry_feeds):
        prompt = f["input_ids"][0].tolist()
        codes, _ = rt.generate_codes(prompt, frames, infer_code_sampling(seed=i))
        captured["embed_text"].append({"input_ids": f["input_ids"]})
        if codes:
            captured["embed_code"].append({"input_ids": np.array([codes], np.int64)})
        outs, ins = _chain(rt, prompt, codes)
        captured["norm"].append({"hidden": ins["norm"]})
        captured["lm_head_text"].append({"hidden": outs["norm"][0][:, :len(prompt)]})  # the prompt's positions
        captured["lm_head_code"].append({"hidden": ins.get("lm_head_code", outs["norm"][0])})
        for layer in rt.layers:
            k, v = outs[layer][1], outs[layer][2]
            captured[layer].append({"hidden": ins[layer], "past_key": empty, "past_value": empty})
            captured[layer].append({"hidden": ins[layer][:, -1:], "past_key": k[:, :, :-1], "past_value": v[:, :, :-1]})
    return captured


def chattts_graph_feeds(reference: Path, entry_feeds: list[Feeds], graph: str, frames: int = 16) -> list[Feeds]:
    """Calibration inputs of one graph (see `capture_chattts`)."""
    return loops.captured_feeds(capture_chattts(reference, entry_feeds, frames), graph, "ChatTTS", "prompts")


def _graph_facts(rt: ChatTTSRuntime, name: str) -> tuple[int, int, dict[str, int], dict[str, int]]:
    path = rt.ms.path(name)
    model = onnx.load(str(path))
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    weights: dict[str, int] = {}
    for t in model.graph.initializer:
        kind = onnx.TensorProto.DataType.Name(t.data_type).lower()
        weights[kind] = weights.get(kind, 0) + numpy_helper.to_array(t).nbytes
    return params, path.stat().st_size, compute_mix(model, tensor_types(model)), weights


def compare_chattts(reference: Path, candidate: Path, prompts: list[list[int]], steps: int = 16,
                    threads: int = 2, progress: Callable[[str], None] = lambda m: None) -> CheckReport:
    """Each prompt twice: continued by FP32 greedy text, and by FP32 greedy audio codes (teacher forcing
    on the model's own output), so both heads and both embeddings are measured."""
    t0 = time.perf_counter()
    ref, cand = ChatTTSRuntime(reference, threads), ChatTTSRuntime(candidate, threads)
    blocks = ["embed_text", "embed_code", *ref.layers, "norm", "lm_head_text", "lm_head_code"]
    iso = {b: Pooled() for b in blocks}
    acc = {b: Pooled() for b in blocks}
    text, code = HeadMetrics(), HeadMetrics()
    for i, prompt in enumerate(prompts):
        progress(f"prompt {i + 1}/{len(prompts)}")
        progress_display.update("check: prompts", i, len(prompts))
        continuation = ref.generate_text(prompt, steps).ids
        frames, _ = ref.generate_codes(prompt, steps)
        runs = [(prompt + continuation, None)] + ([(prompt, frames)] if frames else [])
        for seq, frames_ in runs:
            ref_out, ref_in = _chain(ref, seq, frames_)
            iso_out, _ = _chain(cand, seq, frames_, feed_from=ref_in)
            acc_out, _ = _chain(cand, seq, frames_)
            for b in ref_out:
                for r, c_iso, c_acc in zip(ref_out[b], iso_out[b], acc_out[b]):
                    iso[b].update(r, c_iso)
                    acc[b].update(r, c_acc)
            head, metrics = ("lm_head_code", code) if frames_ else ("lm_head_text", text)
            if head in ref_out:  # positions len(prompt)-1 .. end-1 predict the generated tokens
                metrics.add(ref_out[head][0][0, len(prompt) - 1:-1], acc_out[head][0][0, len(prompt) - 1:-1])
        text.diverged(continuation, cand.generate_text(prompt, steps).ids)
        code.diverged(frames, cand.generate_codes(prompt, steps)[0])
    progress_display.finish("check: prompts")
    reports = []
    for b in blocks:
        params, bytes_ref, _, _ = _graph_facts(ref, b)
        _, bytes_cand, mix, weights = _graph_facts(cand, b)
        reports.append(BlockReport(b, params, bytes_ref, bytes_cand, mix, weights,
                                   outputs=[o.name for o in cand.sessions[b].get_outputs()], matched=True,
                                   unmatched_tensors=[], isolated=iso[b], accumulated=acc[b]).result())
    meta = ref.ms.meta
    notes = []
    if meta.get("seeded"):
        notes.append(f"SEEDED RANDOM WEIGHTS ({meta.get('source')}): ChatTTS's exact config, untrained; logits are "
                     f"near-uniform, so token agreement only means something on trained weights")
    outputs = [OutputResult.measured(f"{h}.logits", acc[h].stats()) for h in ("lm_head_text", "lm_head_code")]
    # Text-head metrics stay at the top level (thresholds and earlier reports read them there).
    tokens = {"decode_steps": steps, **text.to_json(), "code_head": code.to_json()}
    return CheckReport.new(samples=len(prompts), reference=str(reference), candidate=str(candidate), notes=notes,
                           peak_rss_mb=peak_rss_mb(), wall_s=time.perf_counter() - t0, blocks=reports,
                           outputs=outputs, tokens=tokens)
