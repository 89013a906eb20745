"""ONNX Runtime GenAI as a peer of our ChatTTS GPT: the same Llama, built by GenAI's model builder.

Used by benchmarks/bench_chattts.py (pip install -e '.[genai]'):
- `write_hf_folder(dest)`: a Hugging Face `LlamaForCausalLM` folder from our seeded weights
  (embed_tokens = emb_text, lm_head = the folded head_text, layers and norm from the GPT) with
  ChatTTS's config, and a stub tokenizer (the builder insists on one; nothing here tokenizes);
- `build(root, name, log)`: runs the builder into root/<name> (`fp32`, `int8`, `int4`, and the same
  with `_hidden` for the accuracy run: an extra `hidden_states` output, the final norm's output),
  skipped when the folder was already built with the same options;
- `decode_step`, `prompt_logits`, `greedy`, `prefill_outputs`: an og.Generator with `threads`
  intra-op threads, greedy, EOS suppressed.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

# Extra options per precision, each as our recipe of that precision: INT8 in blocks of 128, int8 compute, FP32
# text head (chattts_int8: the same bytes read); INT4 in blocks of 32 (the builder's default), accuracy level 4,
# the LM head in INT8 (chattts_int4's heads; the builder's default would make it INT4). `block_size`,
# `accuracy_level` are 0.18's names (`int4_*` are deprecated aliases).
OPTIONS = {"fp32": [], "int8": ["block_size=128", "accuracy_level=4", "nodes_to_exclude=/lm_head/MatMul"],
           "int4": ["block_size=32", "accuracy_level=4", "matmul_mixed_precision=last_matmul:int8"]}
HIDDEN = "include_hidden_states=1"  # GenAI's graph has no pre-norm tensor: the final SkipSimplifiedLayerNorm fuses it
EOS = 2  # the stub tokenizer's </s>; generation suppresses it (min_length = max_length), ours never stops


def version() -> str | None:
    """onnxruntime-genai's version, or None when it is not installed."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    return og.__version__


def write_hf_folder(dest: Path, seed: int = 0) -> None:
    """Our seeded ChatTTS GPT as a transformers LlamaForCausalLM folder (config, safetensors, tokenizer)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from pipeline.families.chattts.exporter import load_weights

    w = load_weights(None, seed=seed)
    c = w.config
    dest.mkdir(parents=True, exist_ok=True)
    LlamaConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_attention_heads,
                num_hidden_layers=c.num_hidden_layers, max_position_embeddings=c.max_position_embeddings,
                rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, vocab_size=c.num_text_tokens,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
                architectures=["LlamaForCausalLM"]).save_pretrained(dest)
    state = {"model.embed_tokens.weight": w.embed["emb_text.weight"], "lm_head.weight": w.embed["head_text.weight"],
             **{f"model.{k}": v for k, v in w.gpt.items()}}
    save_file({k: v.contiguous() for k, v in state.items()}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": EOS}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(dest)
    (dest / "bench.json").write_text(json.dumps({"seed": seed}))


def build_options(name: str) -> tuple[str, list[str]]:
    """(precision, extra options) of a build name such as `int8` or `int4_hidden`."""
    precision, _, suffix = name.partition("_")
    return precision, OPTIONS[precision] + ([HIDDEN] if suffix == "hidden" else [])


def _stamp(name: str) -> dict:
    precision, extra = build_options(name)
    return {"precision": precision, "extra_options": extra, "genai": version()}


def is_built(root: Path, name: str) -> bool:
    """root/<name> was built by this onnxruntime-genai with the options `name` stands for."""
    done = root / name / "bench_build.json"
    return done.is_file() and json.loads(done.read_text()) == _stamp(name)


def build(root: Path, name: str) -> Path:
    """root/<name> from root/hf through the model builder, unless already built with these options.
    Raises RuntimeError with the builder's last line when it fails (its whole log: root/<name>.log)."""
    dest, stamp = root / name, _stamp(name)
    if is_built(root, name):
        return dest
    precision, extra = stamp["precision"], stamp["extra_options"]
    tmp = root / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(root / "hf"), "-o", str(tmp),
           "-p", precision, "-e", "cpu", "-c", str(root / "cache")] + (["--extra_options", *extra] if extra else [])
    log = root / f"{name}.log"
    with open(log, "w") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode or not (tmp / "genai_config.json").is_file():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] or ["no output"]
        raise RuntimeError(f"model builder failed ({log}): {lines[-1][-300:]}")
    (tmp / "bench_build.json").write_text(json.dumps(stamp))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def generator(folder: Path, threads: int, max_length: int):
    """A greedy og.Generator over `max_length` positions, with `threads` intra-op threads; EOS suppressed."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, min_length=max_length, do_sample=False)
    return og.Generator(model, params)


def decode_step(folder: Path, threads: int, prompt: np.ndarray, steps: int):
    """Prefill `prompt` [1, P] (untimed); the returned call runs one decode step (one token through the
    model, then the greedy pick), as our runtime's forward + argmax does."""
    gen = generator(folder, threads, prompt.shape[1] + steps + 8)
    gen.append_tokens(prompt.astype(np.int32))  # the prefill's forward pass
    gen.generate_next_token()  # picks the first token from the prefill's logits: no forward pass
    return gen.generate_next_token


def prompt_logits(folder: Path, threads: int, prompt: np.ndarray) -> np.ndarray:
    """Logits [V] at the prompt's last position."""
    gen = generator(folder, threads, prompt.shape[1] + 8)
    gen.append_tokens(prompt.astype(np.int32))
    return np.array(gen.get_logits())[0, -1]


def greedy(folder: Path, threads: int, prompt: np.ndarray, steps: int) -> list[int]:
    gen = generator(folder, threads, prompt.shape[1] + steps)
    gen.append_tokens(prompt.astype(np.int32))
    for _ in range(steps):
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)[prompt.shape[1]:]]


def prefill_outputs(folder: Path, threads: int, ids: np.ndarray) -> dict[str, np.ndarray]:
    """One teacher-forced prefill of `ids` [1, S]: logits [S, V], and hidden_states [S, H] (after the
    final norm) when the model was built with include_hidden_states."""
    gen = generator(folder, threads, ids.shape[1] + 8)
    gen.append_tokens(ids.astype(np.int32))
    out = {"logits": np.array(gen.get_output("logits"))[0]}
    try:
        out["hidden_states"] = np.array(gen.get_output("hidden_states"))[0]
    except Exception:  # noqa: BLE001 - a build without the output
        pass
    return out

