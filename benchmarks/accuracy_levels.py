"""MatMulNBits accuracy_level 4 (int8 compute) vs 1 (fp32 compute) where greedy decisions are decisive.

    python benchmarks/accuracy_levels.py [--out runs/accuracy_levels] [--prompts 8] [--steps 32]

ONNX Runtime issue 29849: with accuracy_level 4 the CPU kernel quantizes the
activations to int8 per block, which can flip a greedy argmax on models with
activation outliers. Seeded random weights at ChatTTS's init make near-uniform
logits, where every flip is noise; so this builds a real transformers
LlamaModel (4 layers, hidden 256, weights with the parity tests' gain per
layer, heads at std 1, so greedy has clear winners) in ChatTTS's asset layout, runs the shipped
chattts_int8 and chattts_int4 recipes on it with each accuracy level, and
prints from each check report: the last layer's accumulated SQNR, teacher-
forced top-1 agreement of the text and code heads, and how many prompts'
free-running greedy decoding diverged from FP32 (and the first step).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIG = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_hidden_layers=4,
              max_position_embeddings=1024, num_text_tokens=4096, num_audio_tokens=626, num_vq=4)


def write_asset(folder: Path) -> None:
    """A transformers LlamaModel (no embed_tokens) and a weight-normed Embed, as ChatTTS ships them."""
    import torch
    from safetensors.torch import save_file
    from torch import nn
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(3)
    c = CONFIG
    hf = LlamaConfig(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                     num_attention_heads=c["num_attention_heads"], num_hidden_layers=c["num_hidden_layers"],
                     max_position_embeddings=c["max_position_embeddings"], rms_norm_eps=1e-6, vocab_size=8,
                     num_text_tokens=c["num_text_tokens"], num_audio_tokens=c["num_audio_tokens"], num_vq=c["num_vq"])
    llama = LlamaModel(hf).eval()
    for name, p in llama.named_parameters():
        if "norm" not in name:
            nn.init.normal_(p, std=0.1 * (64 / c["hidden_size"]) ** 0.5)  # the parity tests' gain per layer
    del llama.embed_tokens
    (folder / "gpt").mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(folder / "gpt")
    save_file({k: v.contiguous() for k, v in llama.state_dict().items()}, str(folder / "gpt" / "model.safetensors"))
    h = c["hidden_size"]
    embed = {"emb_text.weight": torch.randn(c["num_text_tokens"], h) * 0.3}
    heads = {"head_text": c["num_text_tokens"], **{f"head_code.{q}": c["num_audio_tokens"] for q in range(c["num_vq"])}}
    for q in range(c["num_vq"]):
        embed[f"emb_code.{q}.weight"] = torch.randn(c["num_audio_tokens"], h) * 0.3
    for name, rows in heads.items():
        v = torch.randn(rows, h)  # large logits: the top token leads by a clear margin
        embed[f"{name}.parametrizations.weight.original0"] = v.norm(dim=1, keepdim=True)
        embed[f"{name}.parametrizations.weight.original1"] = v
    save_file(embed, str(folder / "Embed.safetensors"))


def run(recipe: str, level: int, asset: Path, out: Path, prompts: int, steps: int) -> dict:
    spec = yaml.safe_load((REPO / "recipes" / f"{recipe}.yaml").read_text())
    spec["model"]["params"] = {"asset": str(asset)}
    for step in spec["steps"]:
        if step["pass"] == "quantize":
            step["params"]["accuracy_level"] = level
    spec["check"].update(samples=prompts, decode_steps=steps)
    path = out / f"{recipe}_level{level}.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path), "--out", str(out / path.stem)],
                         capture_output=True, text=True, cwd=REPO)
    if res.returncode:
        sys.exit(f"{path}: {res.stderr.strip().splitlines()[-1]}")
    return json.loads((out / path.stem / "report.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "accuracy_levels")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    asset = args.out / "asset"
    if not (asset / "Embed.safetensors").is_file():
        write_asset(asset)
    from pipeline.core.procinfo import machine_line

    print(machine_line())
    print(f"transformers LlamaModel, {CONFIG['num_hidden_layers']} layers, hidden {CONFIG['hidden_size']}, decisive "
          f"heads; {args.prompts} ChatTTS prompts, {args.steps} steps each, text and code heads")
    print(f"{'recipe':14s} {'level':>5s} {'last layer dB':>13s} {'text top-1':>10s} {'code top-1':>10s} "
          f"{'text diverged':>13s} {'code diverged':>13s}")
    for recipe in ("chattts_int8", "chattts_int4"):
        for level in (4, 1):
            r = run(recipe, level, asset, args.out, args.prompts, args.steps)
            last = [b for b in r["blocks"] if b["block"].startswith("layer_")][-1]["accumulated"]["sqnr_db"]
            t, c = r["tokens"], r["tokens"]["code_head"]
            div = [f"{h['prompts_diverged']}/{args.prompts} (first {h['first_divergence_min']})" for h in (t, c)]
            print(f"{recipe:14s} {level:5d} {last:13.2f} {t['teacher_forced_top1_agreement']:10.3f} "
                  f"{c['teacher_forced_top1_agreement']:10.3f} {div[0]:>13s} {div[1]:>13s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
