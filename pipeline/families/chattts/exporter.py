"""chattts_gpt: ChatTTS's GPT, loaded from its real asset layout and exported block by block.

Assets (the layout ChatTTS ships):
    asset/gpt/config.json, asset/gpt/model.safetensors   the LlamaModel (no embed_tokens)
    asset/Embed.safetensors                              emb_text, emb_code.0-3, and the
                                                         weight-normed head_text, head_code.0-3
                                                         (`parametrizations.weight.original0/1`)
gpt/ may instead hold a sharded checkpoint (model.safetensors.index.json and its shards), as
`save_pretrained(max_shard_size=...)` writes it. Config fields, tensors and shards the exporter does
not model are refused, never ignored.
With no asset folder the weights are seeded random with ChatTTS's exact config;
`ChatTTSWeights.seeded` says so, and reports must say it first.

The ModelSet: embed_text, embed_code (sum of the codebook embeddings),
layer_00..layer_NN (each with past/present KV, one graph for prefill and
decode), norm, lm_head_text, lm_head_code, sample_head (ChatTTS's logits
processors and a draw from a uniform-noise input, or greedy).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from pipeline.core import progress
from pipeline.core.errors import PipelineError, few
from .layers import DecoderLayer, RMSNorm


@dataclass
class GPTConfig:
    """ChatTTS's GPT (ChatTTS/config/config.py) and the LlamaConfig values it implies."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_hidden_layers: int = 20
    max_position_embeddings: int = 4096
    num_audio_tokens: int = 626
    num_text_tokens: int = 21178
    num_vq: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class ChatTTSWeights:
    config: GPTConfig
    gpt: dict[str, torch.Tensor]  # LlamaModel state dict: layers.N.*, norm.weight
    embed: dict[str, torch.Tensor]  # emb_text.weight, emb_code.N.weight, head_text.weight, head_code.N.weight
    seeded: bool
    source: str


def expected_gpt_keys(c: GPTConfig) -> dict[str, tuple[int, ...]]:
    h, i = c.hidden_size, c.intermediate_size
    keys: dict[str, tuple[int, ...]] = {"norm.weight": (h,)}
    for n in range(c.num_hidden_layers):
        p = f"layers.{n}."
        keys.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
                     p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
                     p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                     p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                     p + "post_attention_layernorm.weight": (h,)})
    return keys


def expected_embed_keys(c: GPTConfig) -> dict[str, tuple[int, ...]]:
    h = c.hidden_size
    keys: dict[str, tuple[int, ...]] = {
        "emb_text.weight": (c.num_text_tokens, h),
        "head_text.parametrizations.weight.original0": (c.num_text_tokens, 1),
        "head_text.parametrizations.weight.original1": (c.num_text_tokens, h)}
    for q in range(c.num_vq):
        keys[f"emb_code.{q}.weight"] = (c.num_audio_tokens, h)
        keys[f"head_code.{q}.parametrizations.weight.original0"] = (c.num_audio_tokens, 1)
        keys[f"head_code.{q}.parametrizations.weight.original1"] = (c.num_audio_tokens, h)
    return keys


def _check_keys(found: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: Path) -> None:
    missing = sorted(set(expected) - set(found))
    if missing:
        raise PipelineError(f"{where}: missing keys {few(missing)}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:  # a bias, a different layer layout: weights the exporter would otherwise drop silently
        raise PipelineError(f"{where}: unexpected keys (not modelled by the exporter) {few(unexpected)}")
    misshaped = [f"{k} {list(found[k].shape)} (expected {list(v)})" for k, v in expected.items()
                 if tuple(found[k].shape) != v]
    if misshaped:
        raise PipelineError(f"{where}: misshaped keys: {few(misshaped, 4, '; ')}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise PipelineError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own errors on bad headers
        raise PipelineError(f"{path}: not a readable safetensors file: {e}") from None


GPT_FILE, GPT_INDEX = "model.safetensors", "model.safetensors.index.json"


def _read_gpt(gpt_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The LlamaModel state dict from gpt/: one model.safetensors, or the shards its index names."""
    single, index = gpt_dir / GPT_FILE, gpt_dir / GPT_INDEX
    if single.exists() and index.exists():
        raise PipelineError(f"{gpt_dir}: has both {GPT_FILE} and {GPT_INDEX}; keep only one checkpoint")
    if index.exists():
        return _read_sharded(index), index
    if not single.exists():
        raise PipelineError(f"{gpt_dir}: no GPT checkpoint: neither {GPT_FILE} nor {GPT_INDEX} is there")
    return _read_safetensors(single), single


def _read_sharded(index: Path) -> dict[str, torch.Tensor]:
    """Every shard that the index's weight_map names, each tensor in exactly the shard the index says."""
    def unique(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise PipelineError(f"{index}: lists {k} twice")
            seen.add(k)
        return dict(pairs)

    try:
        data = json.loads(index.read_text(), object_pairs_hook=unique)
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(f"cannot read shard index {index}: {e}") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise PipelineError(f"{index}: no weight_map (a non-empty object of tensor name -> shard file)")
    shards = list(dict.fromkeys(wm.values()))
    outside = [s for s in shards if Path(s).name != s or s in ("", ".", "..")]
    if outside:
        raise PipelineError(f"{index}: shard names must be files next to the index: {few(outside, 4)}")
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise PipelineError(f"{index}: lists shards that are missing: {few(missing, 4)}")
    out: dict[str, torch.Tensor] = {}
    home: dict[str, str] = {}
    for s in shards:
        for k, v in _read_safetensors(index.parent / s).items():
            if k in home:
                raise PipelineError(f"{index}: tensor {k} is in two shards, {home[k]} and {s}")
            home[k], out[k] = s, v
    misplaced = [f"{k} (in {s}, index says {wm.get(k, 'nothing')})" for k, s in home.items() if wm.get(k) != s]
    absent = [f"{k} (index says {wm[k]})" for k in wm if k not in home]
    if misplaced or absent:
        raise PipelineError(f"{index}: shards do not match the weight_map: {few(misplaced + absent, 4, '; ')}")
    return out


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's weight_norm with dim=0: w = g * v / ||v|| per output row."""
    return g * v / v.norm(dim=1, keepdim=True)


# gpt/config.json fields (LlamaConfig's, transformers 4.x and 5), by what the exporter does with them.
# Modelled: GPTConfig's own fields, and rope_theta (top level or in rope_parameters, which wins, as in
# transformers 5). Checked (the table in _unmodelled): a value other than the one layers.py implements is refused;
# absent/null means transformers' default, which is the modelled one. Accepted as irrelevant to the
# forward pass (_IRRELEVANT): see the comments there. Anything else is refused as unknown: a field this
# list does not know may be an architecture change (sliding_window, qk_norm, ...) that ignoring would
# silently get wrong.
_IRRELEVANT = frozenset({
    # ChatTTS's own GPT config (ChatTTS/config/config.py): speaker embedding (applied outside the GPT), cache use
    "spk_emb_dim", "spk_KL", "use_cache",
    # the token embedding and LM head that LlamaModel would have: ChatTTS deletes embed_tokens and uses
    # its own emb_*/head_* from Embed.safetensors
    "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    # training only: init, dropout (the export runs in eval mode)
    "initializer_range", "attention_dropout",
    # storage dtype (the loader casts every tensor to float32) and the attention kernel (same math)
    "torch_dtype", "dtype", "attn_implementation", "_attn_implementation", "_attn_implementation_autoset",
    # PretrainedConfig bookkeeping, output switches, task heads, generation defaults (ChatTTS samples itself)
    "_name_or_path", "_commit_hash", "architectures", "transformers_version", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "finetuning_task", "id2label", "label2id",
    "problem_type", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
})


def _default_rope(v) -> bool:
    """rope_scaling / rope_parameters that mean plain RoPE: null, or only a "default" type and rope_theta."""
    if v is None:
        return True
    return (isinstance(v, dict) and set(v) <= {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
            and all(v.get(t, "default") == "default" for t in ("rope_type", "type"))
            and v.get("partial_rotary_factor", 1.0) == 1.0)


def _unmodelled(data: dict, c: GPTConfig) -> list[str]:
    """`field=value` for each config value that would change the computation in a way layers.py does not."""
    ok = {  # field: (accepted?, what the exporter models)
        "model_type": (lambda v: v in (None, "llama"), '"llama"'),
        "attention_bias": (lambda v: v in (None, False), "false"),  # q/k/v/o biases
        "mlp_bias": (lambda v: v in (None, False), "false"),  # gate/up/down biases
        "hidden_act": (lambda v: v in (None, "silu"), '"silu"'),
        "head_dim": (lambda v: v in (None, c.head_dim), f"hidden_size/num_attention_heads = {c.head_dim}"),
        "num_key_value_heads": (lambda v: v in (None, c.num_attention_heads),  # grouped-query attention
                                f"num_attention_heads = {c.num_attention_heads}"),
        "pretraining_tp": (lambda v: v in (None, 1), "1"),
        # rope_scaling is the 4.x spelling; rope_theta inside it is ambiguous (4.x ignores it, 5 reads it)
        "rope_scaling": (lambda v: v is None or (_default_rope(v) and "rope_theta" not in v), "null"),
        "rope_parameters": (_default_rope, 'rope_type "default"'),
    }
    modelled = {f.name for f in fields(GPTConfig)} | {"rope_theta"}
    bad = [f"{k}={json.dumps(data[k])} (modelled: {want})" for k, (test, want) in ok.items()
           if k in data and not test(data[k])]
    bad += [f"{k} (unknown field)" for k in data if k not in ok and k not in modelled and k not in _IRRELEVANT]
    return bad


def config_from_hf(path: Path) -> GPTConfig:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(f"cannot read GPT config {path}: {e}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"cannot read GPT config {path}: not a JSON object")
    base = GPTConfig()
    names = {f.name for f in fields(GPTConfig)}
    values = {k: v for k, v in data.items() if k in names}
    if isinstance(data.get("rope_parameters"), dict) and "rope_theta" in data["rope_parameters"]:
        values["rope_theta"] = data["rope_parameters"]["rope_theta"]
    if values.get("hidden_size", base.hidden_size) % values.get("num_attention_heads", base.num_attention_heads):
        raise PipelineError(f"{path}: hidden_size is not a multiple of num_attention_heads")
    c = GPTConfig(**{**asdict(base), **values})
    bad = _unmodelled(data, c)
    if bad:
        raise PipelineError(f"{path}: config the exporter does not implement: {', '.join(bad)}")
    return c


def load_weights(asset_dir: Path | None, config: GPTConfig | None = None, seed: int = 0) -> ChatTTSWeights:
    """Real ChatTTS assets, or seeded random weights with the exact config when `asset_dir` is None."""
    if asset_dir is None:
        c = config or GPTConfig()
        gen = torch.Generator().manual_seed(seed)
        gpt = {k: _init(k, s, gen) for k, s in expected_gpt_keys(c).items()}
        raw = {k: _init(k, s, gen) for k, s in expected_embed_keys(c).items()}
        return ChatTTSWeights(c, gpt, _fold_embed(raw, c), True, f"seeded random weights (seed {seed})")
    asset_dir = Path(asset_dir)
    c = config_from_hf(asset_dir / "gpt" / "config.json")
    if config is not None and config != c:
        raise PipelineError(f"{asset_dir}: gpt/config.json does not match the requested config")
    found, where = _read_gpt(asset_dir / "gpt")
    gpt: dict[str, torch.Tensor] = {}
    for k, v in found.items():
        name = k.removeprefix("model.")
        if name == "embed_tokens.weight":  # LlamaModel's token embedding: ChatTTS deletes it and never uses it
            continue
        if name in gpt:
            raise PipelineError(f"{where}: {name} is there twice (with and without the 'model.' prefix)")
        gpt[name] = v
    expected = expected_gpt_keys(c)
    _check_keys(gpt, expected, where)
    raw = _read_safetensors(asset_dir / "Embed.safetensors")
    _check_keys(raw, expected_embed_keys(c), asset_dir / "Embed.safetensors")
    gpt = {k: gpt[k].float() for k in expected}  # the same order whatever the file or shard layout
    return ChatTTSWeights(c, gpt, _fold_embed({k: v.float() for k, v in raw.items()}, c), False, str(asset_dir))


def _init(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if key.endswith("layernorm.weight") or key == "norm.weight":
        return torch.ones(shape)
    if key.endswith("original0"):  # weight-norm magnitude
        return torch.ones(shape)
    return torch.randn(shape, generator=gen) * 0.02


def _fold_embed(raw: dict[str, torch.Tensor], c: GPTConfig) -> dict[str, torch.Tensor]:
    out = {"emb_text.weight": raw["emb_text.weight"],
           "head_text.weight": fold_weight_norm(raw["head_text.parametrizations.weight.original0"],
                                                raw["head_text.parametrizations.weight.original1"])}
    for q in range(c.num_vq):
        out[f"emb_code.{q}.weight"] = raw[f"emb_code.{q}.weight"]
        out[f"head_code.{q}.weight"] = fold_weight_norm(raw[f"head_code.{q}.parametrizations.weight.original0"],
                                                        raw[f"head_code.{q}.parametrizations.weight.original1"])
    return out


class EmbedText(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.emb_text = nn.Embedding.from_pretrained(weight, freeze=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, S, H]
        return self.emb_text(ids)


class EmbedCode(nn.Module):
    """Audio-code embedding: the sum over the codebooks, as ChatTTS's Embed does."""

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.emb_code = nn.ModuleList(nn.Embedding.from_pretrained(w, freeze=True) for w in weights)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, S, num_vq] -> [B, S, H]
        return torch.stack([emb(ids[..., q]) for q, emb in enumerate(self.emb_code)], dim=2).sum(dim=2)


class Head(nn.Module):
    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(w.shape[1], w.shape[0], bias=False) for w in weights)
        for head, w in zip(self.heads, weights):
            head.weight.data.copy_(w)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if len(self.heads) == 1:  # text: [B, S, V]
            return self.heads[0](hidden)
        return torch.stack([h(hidden) for h in self.heads], dim=3)  # codes: [B, S, V, num_vq], as ChatTTS stacks


class ChatTTSGPT(nn.Module):
    """The whole stack in PyTorch, from our modules: the reference the ONNX graphs are checked against."""

    def __init__(self, w: ChatTTSWeights):
        super().__init__()
        c = w.config
        self.config = c
        self.embed_text = EmbedText(w.embed["emb_text.weight"])
        self.embed_code = EmbedCode([w.embed[f"emb_code.{q}.weight"] for q in range(c.num_vq)])
        self.layers = nn.ModuleList()
        for n in range(c.num_hidden_layers):
            layer = DecoderLayer(c.hidden_size, c.intermediate_size, c.num_attention_heads, c.rms_norm_eps,
                                 c.rope_theta)
            layer.load_state_dict({k[len(f"layers.{n}."):]: v for k, v in w.gpt.items()
                                   if k.startswith(f"layers.{n}.")})
            self.layers.append(layer)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.norm.weight.data.copy_(w.gpt["norm.weight"])
        self.lm_head_text = Head([w.embed["head_text.weight"]])
        self.lm_head_code = Head([w.embed[f"head_code.{q}.weight"] for q in range(c.num_vq)])
        self.eval()

    def empty_cache(self, batch: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.config
        z = torch.zeros(batch, c.num_attention_heads, 0, c.head_dim)
        return [(z, z) for _ in range(c.num_hidden_layers)]

    @torch.no_grad()
    def step(self, hidden: torch.Tensor, cache):
        new = []
        for layer, (k, v) in zip(self.layers, cache):
            hidden, k, v = layer(hidden, k, v)
            new.append((k, v))
        return self.norm(hidden), new


def build_on_meta(c: GPTConfig) -> None:
    """Build the whole stack from `c` and run a prefill and a decode step, all on torch's meta device: shapes
    only, no memory and no weights, so `pipeline validate` finds a config the modules cannot be built from."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a probe: what torch warns about shows up in the real export
        gpt = {k: torch.empty(s) for k, s in expected_gpt_keys(c).items()}
        raw = {k: torch.empty(s) for k, s in expected_embed_keys(c).items()}
        model = ChatTTSGPT(ChatTTSWeights(c, gpt, _fold_embed(raw, c), True, "meta"))
        hidden = model.embed_text(torch.zeros(1, 3, dtype=torch.long))
        hidden, cache = model.step(hidden, model.empty_cache())
        model.lm_head_text(hidden)
        hidden, _ = model.step(model.embed_code(torch.zeros(1, 1, c.num_vq, dtype=torch.long)), cache)
        model.lm_head_code(hidden)


GRAPH_NAMES = ("embed_text", "embed_code", "norm", "lm_head_text", "lm_head_code")


def layer_name(n: int) -> str:
    return f"layer_{n:02d}"


def export_modelset(w: ChatTTSWeights, dest: Path, opset: int = 17):
    """Write every block as its own ONNX graph into `dest`, with modelset.json saying how they chain."""
    from pipeline.core.modelset import GraphFile, ModelSet, file_sha256

    c = w.config
    model = ChatTTSGPT(w)
    dest.mkdir(parents=True, exist_ok=True)
    h, nh, hd = c.hidden_size, c.num_attention_heads, c.head_dim
    seq = {0: "batch", 1: "seq"}
    specs = [
        ("embed_text", model.embed_text, (torch.zeros(1, 3, dtype=torch.long),), ["input_ids"], ["hidden"],
         {"input_ids": seq, "hidden": seq}),
        ("embed_code", model.embed_code, (torch.zeros(1, 3, c.num_vq, dtype=torch.long),), ["input_ids"], ["hidden"],
         {"input_ids": seq, "hidden": seq}),
    ]
    cache = {0: "batch", 2: "past"}
    for n, layer in enumerate(model.layers):
        specs.append((layer_name(n), layer, (torch.randn(1, 3, h), torch.randn(1, nh, 2, hd), torch.randn(1, nh, 2, hd)),
                      ["hidden", "past_key", "past_value"], ["hidden_out", "present_key", "present_value"],
                      {"hidden": seq, "past_key": cache, "past_value": cache, "hidden_out": seq,
                       "present_key": {0: "batch", 2: "total"}, "present_value": {0: "batch", 2: "total"}}))
    specs += [
        ("norm", model.norm, (torch.randn(1, 3, h),), ["hidden"], ["hidden_out"], {"hidden": seq, "hidden_out": seq}),
        ("lm_head_text", model.lm_head_text, (torch.randn(1, 3, h),), ["hidden"], ["logits"],
         {"hidden": seq, "logits": seq}),
        ("lm_head_code", model.lm_head_code, (torch.randn(1, 3, h),), ["hidden"], ["logits"],
         {"hidden": seq, "logits": seq}),
    ]
    graphs = []
    from .sample_head import export_sample_head

    export_sample_head(dest / "sample_head.onnx", c.num_text_tokens, opset)
    for name, module, args, inputs, outputs, axes in progress.track(specs, "export: graphs"):
        path = dest / f"{name}.onnx"
        with torch.no_grad():
            torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
        graphs.append(GraphFile(name, path.name, file_sha256(path)))
    graphs.append(GraphFile("sample_head", "sample_head.onnx", file_sha256(dest / "sample_head.onnx")))
    layers = [layer_name(n) for n in range(c.num_hidden_layers)]
    chain = [{"from": "embed_text.hidden|embed_code.hidden", "to": f"{layers[0]}.hidden"}]
    chain += [{"from": f"{a}.hidden_out", "to": f"{b}.hidden"} for a, b in zip(layers, layers[1:])]
    chain += [{"from": f"{layers[-1]}.hidden_out", "to": "norm.hidden"},
              {"from": "norm.hidden_out", "to": "lm_head_text.hidden|lm_head_code.hidden"},
              {"from": "lm_head_text.logits[:, -1]|lm_head_code.logits[:, -1] as [B*num_vq, V]",
               "to": "sample_head.logits"}]
    chain += [{"kv": f"{n}.present_key->{n}.past_key, {n}.present_value->{n}.past_value"} for n in layers]
    ms = ModelSet(dest, graphs, chain=chain,
                  meta={"exporter": "chattts_gpt", "config": asdict(c), "seeded": w.seeded, "source": w.source,
                        "layers": layers})
    ms.write_manifest()
    return ms


def gpt_weights(params, resolve):
    """The GPT's PyTorch weights these params name: the export's, and every target's."""
    asset = resolve(params.asset) if params.asset else None
    config = GPTConfig(**params.config.model_dump()) if params.config.model_fields_set else None
    return load_weights(asset, config, seed=params.seed)
