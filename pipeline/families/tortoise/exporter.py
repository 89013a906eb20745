"""tortoise_gpt: Tortoise's autoregressive model as a ModelSet of three stages and a sample head.

- `conditioning`: reference mels [B, clips, 80, frames] -> `cond_latent` [B, dim]
  (get_conditioning: the conditioning encoder per clip, then the mean).
- `prefill`: `text_ids` [B, T] (raw, without start/stop), `cond_latent`, `mel_ids`
  [B, M] at mel positions 0..M-1 -> `logits` [B, M, mel vocab], `hidden`
  [B, M, dim] and `present_key_N`/`present_value_N` [B, H, 1+T+2+M, D]. For
  generation `mel_ids` is `[[start_mel]]` and the last logits give the first
  code; with `[start_mel, c1, ..., c_{N-1}]` the hidden states are the
  diffusion latents of codes c1..cN (Tortoise's second forward pass).
- `decode`: `mel_id` [B, 1] at mel `position` [1], `past_key_N`/`past_value_N`
  -> `logits`, `hidden`, presents one position longer.
- `sample_head`: Tortoise's sampling (sample_head.py).

`hidden` is final_norm(ln_f(h)), what the mel head reads and the diffusion
decoder takes. Nodes are named by module (`/gpt/h.7/attn/MatMul`), so the
default blocks are the GPT2 layers, embeddings, norms and heads.

prefill and decode hold the same weights: they are written with one shared
external-data file (`weights.bin`), so the pair costs one model's bytes.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import onnx
import torch

from pipeline.core import progress
from pipeline.core.modelset import GraphFile, ModelSet, graph_sha256
from pipeline.core.onnx_io import save_sharing_weights
from .model import UnifiedVoiceGPT
from .sample_head import export_sample_head
from .weights import TortoiseWeights

EXPORTER = "tortoise_gpt"
WEIGHTS_FILE = "weights.bin"
STAGES = ("conditioning", "prefill", "decode")


def kv_names(layers: int, kind: str) -> list[str]:
    """`past`/`present` key and value names, layer by layer: key_0, value_0, key_1, ..."""
    return [f"{kind}_{kv}_{n}" for n in range(layers) for kv in ("key", "value")]


class _Stage(UnifiedVoiceGPT):
    """The model with one stage as its forward, so the exported node names are the module paths."""

    stage = "prefill"

    def forward(self, *args):
        if self.stage == "conditioning":
            return self.conditioning(args[0])
        if self.stage == "prefill":
            text_ids, cond_latent, mel_ids = args
            x = torch.cat([self.prompt(text_ids, cond_latent), self.mel_inputs(mel_ids, 0)], dim=1)
            cache = self.empty_cache(x.shape[0])
        else:
            mel_ids, position, *flat = args
            x = self.mel_inputs(mel_ids, position)
            cache = list(zip(flat[0::2], flat[1::2]))
        h, presents = self.gpt(x, cache)
        logits, latent = self.head(h[:, -mel_ids.shape[1]:])  # the mel positions only
        return (logits, latent, *[t for kv in presents for t in kv])


def _export_stage(model: _Stage, stage: str, path: Path, opset: int) -> None:
    c = model.config
    model.stage = stage
    batch_seq = {0: "batch", 1: "seq"}
    if stage == "conditioning":
        args = (torch.randn(1, 2, c.mel_channels, 40),)
        inputs, outputs = ["mels"], ["cond_latent"]
        axes = {"mels": {0: "batch", 1: "clips", 3: "frames"}, "cond_latent": {0: "batch"}}
    else:
        presents = kv_names(c.layers, "present")
        outputs = ["logits", "hidden", *presents]
        axes = {"logits": batch_seq, "hidden": batch_seq, **{p: {0: "batch", 2: "total"} for p in presents}}
        if stage == "prefill":
            args = (torch.ones(1, 5, dtype=torch.long), torch.randn(1, c.model_dim),
                    torch.full((1, 2), c.start_mel_token, dtype=torch.long))
            inputs = ["text_ids", "cond_latent", "mel_ids"]
            axes.update({"text_ids": {0: "batch", 1: "text"}, "cond_latent": {0: "batch"},
                         "mel_ids": {0: "batch", 1: "mel"}})
        else:
            past = kv_names(c.layers, "past")
            kv = torch.randn(1, c.heads, 7, c.head_dim)
            args = (torch.ones(1, 1, dtype=torch.long), torch.tensor([3]), *[kv] * len(past))
            inputs = ["mel_id", "position", *past]
            axes.update({"mel_id": {0: "batch"}, **{p: {0: "batch", 2: "past"} for p in past}})
    with torch.no_grad():
        torch.onnx.export(model, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=opset, dynamo=False)


def export_modelset(w: TortoiseWeights, dest: Path, opset: int = 17) -> ModelSet:
    c = w.config
    with torch.device("meta"):  # no random init of 1.7 GB only to overwrite it
        model = _Stage(c)
    model.load_state_dict(w.state, assign=True)  # the weights' own tensors, not a second copy
    model.eval()
    dest.mkdir(parents=True, exist_ok=True)
    progress.update("export: graphs", 0, 3)
    _export_stage(model, "conditioning", dest / "conditioning.onnx", opset)
    with tempfile.TemporaryDirectory(prefix="tortoise_export_", dir=dest) as tmp:
        paths = {s: Path(tmp) / f"{s}.onnx" for s in ("prefill", "decode")}
        for done, (stage, path) in enumerate(paths.items(), start=1):
            progress.update("export: graphs", done, 3)
            _export_stage(model, stage, path, opset)
        progress.update("export: graphs", 3, 3)
        del model
        models = {dest / p.name: onnx.load(str(p)) for p in paths.values()}
    save_sharing_weights(models, dest / WEIGHTS_FILE)
    del models
    export_sample_head(dest / "sample_head.onnx", c.number_mel_codes, opset)
    graphs = [GraphFile(n, f"{n}.onnx", graph_sha256(dest / f"{n}.onnx")) for n in (*STAGES, "sample_head")]
    chain = [{"from": "conditioning.cond_latent", "to": "prefill.cond_latent"},
             {"kv": ", ".join(f"prefill.{p}->decode.{q}" for p, q in zip(kv_names(c.layers, "present"),
                                                                         kv_names(c.layers, "past")))},
             {"kv": ", ".join(f"decode.{p}->decode.{q}" for p, q in zip(kv_names(c.layers, "present"),
                                                                        kv_names(c.layers, "past")))},
             {"from": "prefill.logits[:, -1]|decode.logits[:, -1]", "to": "sample_head.logits"}]
    ms = ModelSet(dest, graphs, chain=chain, meta={"exporter": EXPORTER, "family": "tortoise", "config": asdict(c),
                                                    "seeded": w.seeded, "source": w.source})
    ms.write_manifest()
    return ms
