"""Calibration capture and the check of a Tortoise ModelSet: per-layer error inside the graphs, code-head
metrics and the latents the diffusion decoder would see.

Every sample is a real sentence with the voice's latent, continued by the FP32
model's own greedy codes, then teacher-forced:
- **blocks**: the core's per-block comparison (isolated and accumulated, blocks
  `/gpt/h.N`, embeddings, norms, heads) inside `prefill`, fed the prompt and
  `[start_mel, c1, ..., c_{N-1}]` in one pass, inside `decode`, fed its last
  step with the real decode-time cache, and inside `conditioning`, fed the
  reference mels. Block ids are `graph/block` (`prefill/gpt/h.13`);
- **code head**: teacher-forced top-1 agreement and KL of the decode-time
  logits (the FP32 codes fed to the candidate's prefill and decode), and where
  the candidate's own greedy codes first diverge;
- **latents**: the candidate's latents of the FP32 codes (the second forward
  pass) against the FP32 model's: what the diffusion decoder would see.
The candidate is fed the FP32 conditioning latent, so the GPT's error is not
mixed with the conditioning encoder's (whose error is its own block).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from calibration.tortoise_texts import reference_mels
from pipeline.core import progress as progress_display
from pipeline.core.errors import PipelineError
from pipeline.core.feeds import Feeds
from pipeline.core.procinfo import peak_rss_mb
from pipeline.evaluation.blockwise import Pooled, compare_models
from pipeline.evaluation.metrics import HeadMetrics
from pipeline.evaluation.results import BlockResult, CheckReport, OutputResult

from .exporter import kv_names
from .runtime import TortoiseRuntime


def teacher_forced(rt: TortoiseRuntime, text_ids: list[int], latent: np.ndarray, codes: list[int]
                   ) -> tuple[np.ndarray, Feeds]:
    """Decode-time logits [N, V] predicting c1..cN with `codes` fed back (plain runs), and the decode graph's
    feeds of the last step (the real cache of everything before it)."""
    c = rt.config
    out = rt.prefill(text_ids, latent, [c["start_mel_token"]])
    logits, kv = [out[0][0, -1]], out[2:]
    feeds: Feeds = {}
    for k, code in enumerate(codes[:-1], start=1):
        feeds = {"mel_id": np.array([[code]], np.int64), "position": np.array([k + 1], np.int64),
                 **dict(zip(kv_names(c["layers"], "past"), kv))}
        out = rt.run_decode(feeds)
        logits.append(out[0][0, -1])
        kv = out[2:]
    return np.stack(logits), feeds


def sample_inputs(feeds: Feeds) -> tuple[list[int], np.ndarray]:
    return feeds["text_ids"][0].tolist(), np.asarray(feeds["cond_latent"], np.float32)


def capture_tortoise(reference: Path, entry_feeds: list[Feeds], steps: int = 16) -> dict[str, list[Feeds]]:
    """Every graph's calibration inputs from the FP32 model, in one sweep: for each sentence the prefill fed
    the prompt and its own greedy codes (teacher-forced), the decode graph's last step with its real cache,
    and the conditioning graph the reference mels."""
    rt = TortoiseRuntime(reference)
    start = rt.config["start_mel_token"]
    captured: dict[str, list[Feeds]] = {"conditioning": [{"mels": reference_mels()}], "prefill": [], "decode": []}
    for f in entry_feeds:
        text, latent = sample_inputs(f)
        codes = rt.generate(text, latent, steps).codes
        captured["prefill"].append({"text_ids": f["text_ids"], "cond_latent": latent,
                                    "mel_ids": np.array([[start, *codes[:-1]]], np.int64)})
        if len(codes) > 1:
            captured["decode"].append(teacher_forced(rt, text, latent, codes)[1])
    return captured




def compare_tortoise(reference: Path, candidate: Path, samples: list[Feeds], steps: int = 32, threads: int = 2,
                     progress: Callable[[str], None] = lambda m: None) -> CheckReport:
    t0 = time.perf_counter()
    # The reference's runs first, then the candidate's: one model's sessions in memory at a time (at full size
    # each holds its weights twice, prefill and decode).
    ref = TortoiseRuntime(reference, threads)
    start = ref.config["start_mel_token"]
    runs, prefill_feeds, decode_feeds = [], [], []
    for i, f in enumerate(samples):
        progress(f"sentence {i + 1}/{len(samples)}: FP32")
        progress_display.update("check: FP32 sentences", i, len(samples))
        text, latent = sample_inputs(f)
        codes = ref.generate(text, latent, steps).codes
        if not codes:
            continue
        ref_logits, last = teacher_forced(ref, text, latent, codes)
        runs.append((text, latent, codes, ref_logits, ref.latents(text, latent, codes)))
        prefill_feeds.append({"text_ids": f["text_ids"], "cond_latent": latent,
                              "mel_ids": np.array([[start, *codes[:-1]]], np.int64)})
        if last:
            decode_feeds.append(last)
    progress_display.finish("check: FP32 sentences")
    if not prefill_feeds:
        raise PipelineError("check: the FP32 model stopped at once on every sentence; nothing to compare")
    ref_in_place = ref.decode_in_place()
    del ref
    cand = TortoiseRuntime(candidate, threads)
    codes_head, latents = HeadMetrics(), Pooled()
    for i, (text, latent, codes, ref_logits, ref_latents) in enumerate(runs):
        progress(f"sentence {i + 1}/{len(runs)}: candidate")
        progress_display.update("check: candidate sentences", i, len(runs))
        codes_head.add(ref_logits, teacher_forced(cand, text, latent, codes)[0])
        codes_head.diverged(codes, cand.generate(text, latent, steps).codes)
        latents.update(ref_latents, cand.latents(text, latent, codes))
    progress_display.finish("check: candidate sentences")
    notes = []
    if cand.decode_in_place() and not ref_in_place:
        notes.append("decode's blocks are not compared one by one: the candidate keeps its KV cache in place, "
                     "so its graph takes other inputs; its error is in the code-head metrics, and prefill's "
                     "blocks hold the same layers")
        decode_feeds = []
    del cand  # the per-block comparison loads the graphs again, with their boundary tensors exposed
    graphs = [("conditioning", [{"mels": reference_mels()}]), ("prefill", prefill_feeds), ("decode", decode_feeds)]
    blocks: list[BlockResult] = []
    outputs = [OutputResult.measured("latents", latents.stats())]
    for graph, feeds in graphs:
        if not feeds:
            continue
        progress(f"blocks of {graph}")
        result = _compare_graph(reference, candidate, graph, feeds, threads)
        for b in result.blocks:
            b.block = f"{graph}{b.block}" if b.block.startswith("/") else f"{graph}/{b.block}"
        blocks += result.blocks
        for o in result.outputs:
            if "present_" not in o.name:
                o.name = f"{graph}.{o.name}"
                outputs.append(o)
    from pipeline.core.modelset import ModelSet

    meta = ModelSet.read(reference).meta
    if meta.get("seeded"):
        notes.insert(0, f"SEEDED RANDOM WEIGHTS ({meta.get('source')}): Tortoise's released config, untrained; the "
                     f"code head's agreement only means something on trained weights")
    notes.append("the candidate is fed the FP32 conditioning latent; the conditioning graph is checked on its own")
    tokens = {"decode_steps": steps, "head": "mel head (codes)", **codes_head.to_json()}
    return CheckReport.new(samples=len(prefill_feeds), reference=str(reference), candidate=str(candidate),
                           notes=notes, peak_rss_mb=peak_rss_mb(), wall_s=time.perf_counter() - t0, blocks=blocks,
                           outputs=outputs, tokens=tokens)


def _compare_graph(reference: Path, candidate: Path, graph: str, feeds: list[Feeds], threads: int) -> CheckReport:
    from pipeline.core.modelset import ModelSet

    from pipeline.core.onnx_io import external_files, load_light

    # At full size a graph is 1.6 GB: its weights stay in their file, which the sessions map.
    paths = [ModelSet.read(root).path(graph) for root in (reference, candidate)]
    dirs = tuple(p.parent if external_files(p) else None for p in paths)
    return compare_models(load_light(paths[0]), load_light(paths[1]), feeds, None, threads=threads,
                          weights_dirs=dirs)
