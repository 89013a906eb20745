"""The `gguf` target of Tortoise's GPT2 (UnifiedVoice): the PyTorch weights as `tortoise-gpt2-<type>.gguf`.

`general.architecture` is `tortoise-gpt2`, which is not a llama.cpp architecture (llama.cpp's `gpt2` has one
token embedding, one position table and one head): llama.cpp will not load these files as they are. They hold
what a GGML runtime of Tortoise's autoregressive model needs, named the llama.cpp way, without a tokenizer.

Tensors (numpy shapes; matrices [out, in], so GGUF's ne is [in, out] as llama.cpp stores them; the GPT2
Conv1D weights, stored [in, out] in the checkpoint, are transposed):

    token_embd_text.weight        [number_text_tokens+1, dim]   text_embedding
    token_embd_mel.weight         [number_mel_codes, dim]       mel_embedding
    position_embd_text.weight     [max_text_tokens+2, dim]      text_pos_embedding.emb
    position_embd_mel.weight      [max_mel_tokens+2+max_conditioning_inputs, dim]   mel_pos_embedding.emb
    blk.N.attn_norm.weight/bias   [dim]                         gpt.h.N.ln_1 (LayerNorm)
    blk.N.attn_qkv.weight         [3*dim, dim]                  gpt.h.N.attn.c_attn (rows: q, then k, then v)
    blk.N.attn_qkv.bias           [3*dim]
    blk.N.attn_output.weight/bias [dim, dim], [dim]             gpt.h.N.attn.c_proj
    blk.N.ffn_norm.weight/bias    [dim]                         gpt.h.N.ln_2
    blk.N.ffn_up.weight/bias      [4*dim, dim], [4*dim]         gpt.h.N.mlp.c_fc (gelu_new after it)
    blk.N.ffn_down.weight/bias    [dim, 4*dim], [dim]           gpt.h.N.mlp.c_proj
    output_norm.weight/bias       [dim]                         gpt.ln_f
    final_norm.weight/bias        [dim]                         final_norm (after ln_f: the diffusion latent)
    output_text.weight/bias       [number_text_tokens+1, dim]   text_head
    output_mel.weight/bias        [number_mel_codes, dim]       mel_head

No rope: positions are the learned tables, added to the token embeddings outside the GPT2 (text at 0..T+1,
mel code k at k+1 with the KV cache). The conditioning encoder is left out: the voice's latent is computed
once per voice, by the ONNX result's `conditioning` graph, and is the prompt's first input row.

Metadata: general.architecture, general.name, general.file_type (the type with most matrix parameters),
general.quantization_version (when quantized), general.description (seeded weights only: they are untrained);
tortoise-gpt2.context_length (text + mel positions, GPT2's n_positions), embedding_length, block_count,
feed_forward_length, attention.head_count, attention.head_count_kv, attention.layer_norm_epsilon,
start_text_token, stop_text_token, start_mel_token, stop_mel_token, number_text_tokens, number_mel_codes,
text_positions, mel_positions, max_text_tokens, max_mel_tokens, max_conditioning_inputs.

Types (`pipeline.formats.gguf`): 1-D tensors F32; f32/f16/q8_0 put every matrix in that type; `auto` carries over
the ONNX steps' choice per block of the `prefill` and `decode` graphs (nodes named `/gpt/h.N/...`,
`/mel_embedding/...`, `/mel_head/...`: `pipeline.core.blocks.default_block_id`): blk.N from `/gpt/h.N`, each
embedding, position table and head from its own block. Both graphs hold the same weights; where the steps
chose differently for them, the wider precision is kept, with a note. text_head is in neither graph (inference
reads only the mel head), so `auto` keeps it F32.

Check (`check_gguf`, the run's check): each GPT2 block of each file as a numpy forward pass from the file's
dequantized tensors alone (`tortoise_layer`, float64, causal, no cache), fed the block's input inside the FP32 ONNX
`prefill` graph (`layer_boundaries`: every block's input and output exposed, one run a sentence); the block's output
and present key and value against the graph's, pooled over the sentences; a file's SQNR is its lowest block's. The
decode graph holds the same weights and is not run again.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from pipeline.core.errors import PipelineError
from pipeline.formats.gguf import (Case, GGUFParams, Picker, Tensors, Written, attend, check_layers, config_mismatch,
                          graph_proto, layer_norm, matrix_groups, plan_from_precisions, write_files, write_grouped)
from pipeline.evaluation.results import FormatResult
from pipeline.core.precision import PRECISIONS
from pipeline.formats.targets import FormatInputs, Target, TargetJob, block_precisions, require_module

if TYPE_CHECKING:  # the weights' module (and torch) load when a file is written, not when the family is
    from .weights import TortoiseWeights

__all__ = ["GGUFParams", "GGUF_TARGET", "gguf_tensors", "gguf_metadata", "write_tortoise_gguf", "write_gguf",
           "tortoise_layer", "norm", "layer_boundaries", "check_gguf"]

ARCH = "tortoise-gpt2"
STEM = "tortoise-gpt2"
GRAPHS = ("prefill", "decode")
# (Tortoise's module, GGUF name, transposed?: HF Conv1D stores [in, out])
BLOCK_TENSORS = (("ln_1", "attn_norm", False), ("attn.c_attn", "attn_qkv", True), ("attn.c_proj", "attn_output", True),
                 ("ln_2", "ffn_norm", False), ("mlp.c_fc", "ffn_up", True), ("mlp.c_proj", "ffn_down", True))
# (Tortoise's module, GGUF name, ONNX block): outside the GPT2 blocks
EMBEDDINGS = (("text_embedding", "token_embd_text", "/text_embedding"),
              ("mel_embedding", "token_embd_mel", "/mel_embedding"),
              ("text_pos_embedding.emb", "position_embd_text", "/text_pos_embedding"),
              ("mel_pos_embedding.emb", "position_embd_mel", "/mel_pos_embedding"))
TAIL = (("gpt.ln_f", "output_norm", "/gpt"), ("final_norm", "final_norm", "/final_norm"),
        ("text_head", "output_text", "/text_head"), ("mel_head", "output_mel", "/mel_head"))


def gguf_tensors(w: TortoiseWeights) -> Iterator[tuple[str, np.ndarray, str]]:
    """(GGUF name, float32 array, the ONNX block whose precision `auto` carries over), in file order."""
    s = {k: v.detach().numpy() for k, v in w.state.items()}
    for src, dst, block in EMBEDDINGS:
        yield f"{dst}.weight", s[f"{src}.weight"], block
    for n in range(w.config.layers):
        for src, dst, transposed in BLOCK_TENSORS:
            weight = s[f"gpt.h.{n}.{src}.weight"]
            yield f"blk.{n}.{dst}.weight", weight.T if transposed else weight, f"/gpt/h.{n}"
            yield f"blk.{n}.{dst}.bias", s[f"gpt.h.{n}.{src}.bias"], f"/gpt/h.{n}"
    for src, dst, block in TAIL:
        yield f"{dst}.weight", s[f"{src}.weight"], block
        yield f"{dst}.bias", s[f"{src}.bias"], block


def gguf_metadata(w: TortoiseWeights) -> dict[str, Any]:
    from .model import LN_EPS

    c, a = w.config, ARCH
    meta: dict[str, Any] = {
        "general.name": "Tortoise-TTS autoregressive GPT2",
        f"{a}.context_length": c.text_positions + c.mel_positions, f"{a}.embedding_length": c.model_dim,
        f"{a}.block_count": c.layers, f"{a}.feed_forward_length": c.inner,
        f"{a}.attention.head_count": c.heads, f"{a}.attention.head_count_kv": c.heads,
        f"{a}.attention.layer_norm_epsilon": float(LN_EPS),
        f"{a}.start_text_token": c.start_text_token, f"{a}.stop_text_token": c.stop_text_token,
        f"{a}.start_mel_token": c.start_mel_token, f"{a}.stop_mel_token": c.stop_mel_token,
        f"{a}.number_text_tokens": c.number_text_tokens, f"{a}.number_mel_codes": c.number_mel_codes,
        f"{a}.text_positions": c.text_positions, f"{a}.mel_positions": c.mel_positions,
        f"{a}.max_text_tokens": c.max_text_tokens, f"{a}.max_mel_tokens": c.max_mel_tokens,
        f"{a}.max_conditioning_inputs": c.max_conditioning_inputs,
    }
    if w.seeded:  # a file of random weights must say so wherever it goes
        meta["general.description"] = f"untrained: {w.source}"
    return meta


def write_tortoise_gguf(weights: TortoiseWeights, path: Path, qtype_for: str | Picker) -> Written:
    """Write one GGUF file; `qtype_for` is a type or a function of the tensor's ONNX block giving one."""
    return write_grouped(path, ARCH, gguf_metadata(weights), gguf_tensors(weights), qtype_for)


def auto_plan(gguf: Any, w: TortoiseWeights, final: Any) -> tuple[dict[str, str], list[str]]:
    """Block -> GGUF type from the weight precision of the block's nodes in prefill and decode (the wider of
    the two where they differ: that choice was made for accuracy, and one file serves both)."""
    if final.meta.get("config") not in (None, asdict(w.config)):
        raise PipelineError("gguf: the ONNX result was exported with another Tortoise config than the target's "
                            "weights; its precision choices do not apply")
    missing = [g for g in GRAPHS if g not in final.names()]
    if missing:
        raise PipelineError(f"gguf: types 'auto' reads the precision of the {' and '.join(GRAPHS)} graphs, but the "
                            f"ONNX result has no {', '.join(missing)} (graphs: {', '.join(final.names())})")
    groups = matrix_groups(gguf_tensors(w))
    found = [block_precisions(graph_proto(final, g)) for g in GRAPHS]
    precisions, notes = {}, []
    for group in groups:
        seen = {f[group] for f in found if group in f} or {"fp32"}  # in no graph: no choice was made
        precisions[group] = max(seen, key=PRECISIONS.index)
        if len(seen) > 1:
            prefill, decode = (f.get(group, "absent") for f in found)
            notes.append(f"gguf: {group} is {prefill} in prefill, {decode} in decode; the file keeps the wider, "
                         f"{precisions[group]}")
    plan, lost = plan_from_precisions(gguf, precisions)
    return plan, notes + lost


def write_gguf(job: TargetJob) -> None:
    from .weights import gpt_weights

    write_files(job, STEM, gpt_weights(job.model, job.resolve), write_tortoise_gguf, auto_plan)


def norm(f: Tensors, name: str, x: np.ndarray) -> np.ndarray:
    """The file's LayerNorm `name` (blk.N.attn_norm, output_norm, final_norm, ...) applied to x."""
    return layer_norm(x, f(f"{name}.weight"), f(f"{name}.bias"), f.meta(f"{ARCH}.attention.layer_norm_epsilon"))


def tortoise_layer(f: Tensors, n: int, x: np.ndarray, past_k: np.ndarray, past_v: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPT2 block N from the file's tensors: x [S, dim], past [heads, P, head_dim] -> (x', present key, value)."""
    heads = f.meta(f"{ARCH}.attention.head_count")
    linear = lambda v, t: v @ f(f"blk.{n}.{t}.weight").T + f(f"blk.{n}.{t}.bias")  # noqa: E731
    s, dim = x.shape
    split = lambda v: v.reshape(s, heads, dim // heads).transpose(1, 0, 2)  # noqa: E731
    q, k, v = (split(t) for t in np.split(linear(norm(f, f"blk.{n}.attn_norm", x), "attn_qkv"), 3, -1))
    out, key, value = attend(q, k, v, past_k, past_v)
    x = x + linear(out, "attn_output")
    u = linear(norm(f, f"blk.{n}.ffn_norm", x), "ffn_up")
    gelu = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))  # gelu_new
    return x + linear(gelu, "ffn_down"), key, value


def layer_boundaries(model: onnx.ModelProto, layers: int) -> list[tuple[str, str]]:
    """Each block /gpt/h.N's input and output tensors inside a Tortoise graph (prefill or decode, as exported):
    ln_1's input and the block's last Add."""
    nodes = {node.name: node for node in model.graph.node}
    found = []
    for n in range(layers):
        ln, add = f"/gpt/h.{n}/ln_1/LayerNormalization", f"/gpt/h.{n}/Add_1"
        missing = [name for name in (ln, add) if name not in nodes]
        if missing:
            raise PipelineError(f"gguf check: the FP32 graph {model.graph.name!r} has no node {missing[0]} (a graph "
                                f"this exporter did not write?)")
        found.append((nodes[ln].input[0], nodes[add].output[0]))
    return found


def _layer_cases(inputs: FormatInputs, layers: int) -> Iterator[tuple[int, list[Case]]]:
    """The FP32 prefill run once a sentence with every block's input and output exposed; then (n, cases) block by
    block, each block's tensors dropped once it has been checked."""
    from pipeline.core.graph import with_outputs
    from pipeline.core.onnx_io import parse_graph, session
    from .exporter import kv_names

    feeds = inputs.capture("prefill")
    path = inputs.reference.path("prefill")
    model = parse_graph(path)  # the weights stay in their file: ORT maps them
    bounds = layer_boundaries(model, layers)
    presents = kv_names(layers, "present")
    names = list(dict.fromkeys([t for pair in bounds for t in pair] + presents))
    sess = session(with_outputs(model, names), arena=False, weights_dir=path.parent)
    del model
    runs = [dict(zip(names, sess.run(names, feed))) for feed in feeds]
    del sess
    for n, (x, y) in enumerate(bounds):
        key, value = f"present_key_{n}", f"present_value_{n}"
        cases: list[Case] = []
        for r in runs:
            past = np.zeros((r[key].shape[1], 0, r[key].shape[3]))  # presents are [batch, heads, S, head_dim]
            for b in range(r[x].shape[0]):
                cases.append(((r[x][b].astype(np.float64), past, past), [r[y][b], r[key][b], r[value][b]]))
        yield n, cases
        for r in runs:  # block n's input (block n-1's output) and cache are done with
            for name in (x, key, value):
                r.pop(name, None)


def check_gguf(inputs: FormatInputs) -> list[FormatResult]:
    """Each file's GPT2 blocks, isolated inside the FP32 prefill, on the check's sentences (see the module)."""
    gguf = require_module("gguf", "gguf", "format 'gguf'")
    c = inputs.reference.meta.get("config") or {}
    compared = (f"decoder layers from the file, each fed the FP32 ONNX layer's inputs (isolated, inside prefill), "
                f"on {len(inputs.feeds)} sentences")
    wanted = {"block_count": c.get("layers"), "embedding_length": c.get("model_dim"),
              "attention.head_count": c.get("heads")}
    if None in wanted.values():
        return [FormatResult(format="gguf", file=name, compared=compared,
                             note="the FP32 reference has no Tortoise config in its manifest")
                for name in inputs.files if name.endswith(".gguf")]
    return check_layers(gguf, inputs, compared, wanted["block_count"], _layer_cases(inputs, wanted["block_count"]),
                        tortoise_layer, lambda f: config_mismatch(f, ARCH, wanted))


GGUF_TARGET = Target(
    "gguf", GGUFParams, write_gguf, needs=(("gguf", "gguf"),), check=check_gguf,
    description="GGUF files of the GPT2 (arch 'tortoise-gpt2', llama.cpp tensor names, no tokenizer, no "
                "conditioning encoder): f32, f16, q8_0, or auto (each layer, embedding and head in the precision "
                "the ONNX steps chose)")
