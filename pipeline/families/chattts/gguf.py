"""The `gguf` target of ChatTTS's GPT: the PyTorch weights (exporter params) as GGUF files, `chattts-gpt-<type>.gguf`.

`general.architecture` is `chattts`, which is not a llama.cpp architecture: llama.cpp will not load these files
as they are. They hold what a GGML runtime of ChatTTS needs, named the llama.cpp way, without a tokenizer.

Tensors (numpy shapes; matrices [out, in], so GGUF's ne is [in, out] as llama.cpp stores them):

    token_embd_text.weight      [num_text_tokens, hidden]     Embed.emb_text
    token_embd_code.K.weight    [num_audio_tokens, hidden]    Embed.emb_code.K, K = 0..num_vq-1
    blk.N.attn_norm.weight      [hidden]                      layers.N.input_layernorm (RMSNorm)
    blk.N.attn_q.weight         [hidden, hidden]              layers.N.self_attn.q_proj
    blk.N.attn_k.weight         [hidden, hidden]              layers.N.self_attn.k_proj
    blk.N.attn_v.weight         [hidden, hidden]              layers.N.self_attn.v_proj
    blk.N.attn_output.weight    [hidden, hidden]              layers.N.self_attn.o_proj
    blk.N.ffn_norm.weight       [hidden]                      layers.N.post_attention_layernorm
    blk.N.ffn_gate.weight       [intermediate, hidden]        layers.N.mlp.gate_proj
    blk.N.ffn_up.weight         [intermediate, hidden]        layers.N.mlp.up_proj
    blk.N.ffn_down.weight       [hidden, intermediate]        layers.N.mlp.down_proj
    output_norm.weight          [hidden]                      norm
    output_text.weight          [num_text_tokens, hidden]     Embed.head_text, weight norm folded
    output_code.K.weight        [num_audio_tokens, hidden]    Embed.head_code.K, weight norm folded

RoPE layout: Q and K are stored as Hugging Face has them (not permuted, unlike llama.cpp's convert script for
`llama`): rotation pairs are (i, i + head_dim/2), `rotate_half`, which is GGML's NEOX rope mode
(`chattts.rope.layout` = "neox"). Audio-code input is the sum of the num_vq code embeddings; the code logits
are one head per codebook.

Metadata: general.architecture, general.name, general.file_type (the type with most matrix parameters),
general.quantization_version (when quantized), general.description (seeded weights only: they are untrained);
chattts.context_length, embedding_length, block_count, feed_forward_length, attention.head_count,
attention.head_count_kv, attention.layer_norm_rms_epsilon, rope.freq_base, rope.dimension_count, rope.layout,
num_vq, num_audio_tokens, num_text_tokens.

Types (`pipeline.formats.gguf`): 1-D tensors F32; f32/f16/q8_0 put every matrix in that type; `auto` carries over
the ONNX steps' choice per graph: blk.N from `layer_NN`, token_embd_text from `embed_text`, token_embd_code.K
from `embed_code`, output_text from `lm_head_text`, output_code.K from `lm_head_code` (int8 -> Q8_0,
int4 -> Q4_0, fp16 -> F16, fp32 -> F32).

Check (`check_gguf`, the run's check): each decoder layer of each file as a numpy forward pass from the file's
dequantized tensors alone (`chattts_layer`, float64), fed the FP32 ONNX `layer_NN`'s captured inputs (two a prompt:
the teacher-forced prefill, and its last position as a decode step with the cache); the layer's hidden output and
present key and value against the ONNX layer's, pooled over the prompts; a file's SQNR is its lowest layer's.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.formats.gguf import (Case, GGUFParams, Picker, Tensors, Written, attend, check_layers,
                          config_mismatch, graph_proto, matrix_groups, plan_from_precisions, rms_norm, write_files, write_grouped)
from pipeline.evaluation.results import FormatResult
from pipeline.core.precision import weight_precision
from pipeline.formats.targets import FormatInputs, Target, TargetJob, require_module

if TYPE_CHECKING:  # the exporter (and torch) load when a file is written, not when the family is
    from .exporter import ChatTTSWeights

__all__ = ["GGUFParams", "GGUF_TARGET", "gguf_tensors", "gguf_metadata", "write_chattts_gguf", "write_gguf",
           "chattts_layer", "check_gguf"]

ARCH = "chattts"
STEM = "chattts-gpt"
# (LlamaDecoderLayer's name, llama.cpp's)
LAYER_TENSORS = (("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                 ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                 ("post_attention_layernorm", "ffn_norm"), ("mlp.gate_proj", "ffn_gate"),
                 ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"))


def gguf_tensors(w: ChatTTSWeights) -> Iterator[tuple[str, np.ndarray, str]]:
    """(GGUF name, float32 array, the ONNX graph whose precision `auto` carries over), in file order."""
    from .exporter import layer_name

    c = w.config
    yield "token_embd_text.weight", w.embed["emb_text.weight"].detach().numpy(), "embed_text"
    for q in range(c.num_vq):
        yield f"token_embd_code.{q}.weight", w.embed[f"emb_code.{q}.weight"].detach().numpy(), "embed_code"
    for n in range(c.num_hidden_layers):
        for src, dst in LAYER_TENSORS:
            yield f"blk.{n}.{dst}.weight", w.gpt[f"layers.{n}.{src}.weight"].detach().numpy(), layer_name(n)
    yield "output_norm.weight", w.gpt["norm.weight"].detach().numpy(), "norm"
    yield "output_text.weight", w.embed["head_text.weight"].detach().numpy(), "lm_head_text"
    for q in range(c.num_vq):
        yield f"output_code.{q}.weight", w.embed[f"head_code.{q}.weight"].detach().numpy(), "lm_head_code"


def gguf_metadata(w: ChatTTSWeights) -> dict[str, Any]:
    c, a = w.config, ARCH
    meta: dict[str, Any] = {
        "general.name": "ChatTTS GPT",
        f"{a}.context_length": c.max_position_embeddings, f"{a}.embedding_length": c.hidden_size,
        f"{a}.block_count": c.num_hidden_layers, f"{a}.feed_forward_length": c.intermediate_size,
        f"{a}.attention.head_count": c.num_attention_heads, f"{a}.attention.head_count_kv": c.num_attention_heads,
        f"{a}.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), f"{a}.rope.freq_base": float(c.rope_theta),
        f"{a}.rope.dimension_count": c.head_dim, f"{a}.rope.layout": "neox",
        f"{a}.num_vq": c.num_vq, f"{a}.num_audio_tokens": c.num_audio_tokens, f"{a}.num_text_tokens": c.num_text_tokens,
    }
    if w.seeded:  # a file of random weights must say so wherever it goes
        meta["general.description"] = f"untrained: {w.source}, ChatTTS's config"
    return meta


def write_chattts_gguf(weights: ChatTTSWeights, path: Path, qtype_for: str | Picker) -> Written:
    """Write one GGUF file; `qtype_for` is a type or a function of the tensor's ONNX graph giving one."""
    return write_grouped(path, ARCH, gguf_metadata(weights), gguf_tensors(weights), qtype_for)


def auto_plan(gguf: Any, w: ChatTTSWeights, final: Any) -> tuple[dict[str, str], list[str]]:
    """Graph -> GGUF type from the ONNX result's weight precision, graph by graph."""
    if final.meta.get("config") not in (None, asdict(w.config)):
        raise PipelineError("gguf: the ONNX result was exported with another ChatTTS config than the target's "
                            "weights; its precision choices do not apply")
    groups = matrix_groups(gguf_tensors(w))
    missing = [g for g in groups if g not in final.names()]
    if missing:
        raise PipelineError(f"gguf: types 'auto' reads each graph's precision, but the ONNX result has no "
                            f"{', '.join(missing)} (graphs: {', '.join(final.names())})")
    return plan_from_precisions(gguf, {g: weight_precision(graph_proto(final, g)) for g in groups})


def write_gguf(job: TargetJob) -> None:
    from .exporter import gpt_weights

    write_files(job, STEM, gpt_weights(job.model, job.resolve), write_chattts_gguf, auto_plan)


def chattts_layer(f: Tensors, n: int, x: np.ndarray, past_k: np.ndarray, past_v: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Llama decoder layer N from the file's tensors: x [S, hidden], past [heads, P, head_dim] -> (x', present key,
    present value), the keys after RoPE at positions P..P+S-1 (NEOX pairs (i, i + head_dim/2))."""
    a = ARCH
    eps, theta = f.meta(f"{a}.attention.layer_norm_rms_epsilon"), f.meta(f"{a}.rope.freq_base")
    heads = f.meta(f"{a}.attention.head_count")
    W = lambda t: f(f"blk.{n}.{t}.weight")  # noqa: E731
    s, h = x.shape
    d, p = h // heads, past_k.shape[1]
    split = lambda v: v.reshape(s, heads, d).transpose(1, 0, 2)  # noqa: E731
    y = rms_norm(x, W("attn_norm"), eps)
    q, k, v = (split(y @ W(t).T) for t in ("attn_q", "attn_k", "attn_v"))
    angles = np.arange(p, p + s)[:, None] * theta ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(np.tile(angles, 2)), np.sin(np.tile(angles, 2))
    rotate = lambda t: np.concatenate([-t[..., d // 2:], t[..., :d // 2]], -1)  # noqa: E731
    q, k = q * cos + rotate(q) * sin, k * cos + rotate(k) * sin
    out, key, value = attend(q, k, v, past_k, past_v)
    x = x + out @ W("attn_output").T
    y = rms_norm(x, W("ffn_norm"), eps)
    gate = y @ W("ffn_gate").T
    return x + (gate / (1 + np.exp(-gate)) * (y @ W("ffn_up").T)) @ W("ffn_down").T, key, value


LAYER_OUTPUTS = ("hidden_out", "present_key", "present_value")  # what chattts_layer returns, in its order


def _layer_cases(inputs: FormatInputs, layers: list[str]) -> Iterator[tuple[int, list[Case]]]:
    """Each reference layer graph in turn, run in ONNX Runtime on its captured inputs: (n, cases)."""
    from pipeline.core.onnx_io import session

    for graph in layers:
        feeds = inputs.capture(graph)
        sess = session(inputs.reference.path(graph), arena=False)
        cases: list[Case] = []
        for feed in feeds:
            outs = sess.run(list(LAYER_OUTPUTS), feed)
            for b in range(feed["hidden"].shape[0]):
                args = (feed["hidden"][b].astype(np.float64), feed["past_key"][b], feed["past_value"][b])
                cases.append((args, [o[b] for o in outs]))
        del sess
        yield int(graph.rsplit("_", 1)[1]), cases


def check_gguf(inputs: FormatInputs) -> list[FormatResult]:
    """Each file's decoder layers, isolated, against the FP32 ONNX layers on the check's prompts (see the module)."""
    gguf = require_module("gguf", "gguf", "format 'gguf'")
    layers = sorted(g for g in inputs.reference.names() if re.fullmatch(r"layer_\d+", g))
    c = inputs.reference.meta.get("config") or {}
    wanted = {"block_count": len(layers), "embedding_length": c.get("hidden_size"),
              "attention.head_count": c.get("num_attention_heads")}
    compared = (f"decoder layers from the file, each fed the FP32 ONNX layer's inputs (isolated), "
                f"on {len(inputs.feeds)} prompts")
    return check_layers(gguf, inputs, compared, len(layers), _layer_cases(inputs, layers), chattts_layer,
                        lambda f: config_mismatch(f, ARCH, {k: v for k, v in wanted.items() if v is not None}))


GGUF_TARGET = Target(
    "gguf", GGUFParams, write_gguf, needs=(("gguf", "gguf"),), check=check_gguf,
    description="GGUF files of the GPT (arch 'chattts', llama.cpp tensor names, no tokenizer): f32, f16, q8_0, "
                "or auto (each layer, embedding and head in the precision the ONNX steps chose)")
