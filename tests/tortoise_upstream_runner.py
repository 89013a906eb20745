"""Runs unmodified upstream Tortoise-TTS 3.0.0 UnifiedVoice and saves its outputs (child of tortoise_upstream.py).

Needs transformers 4.48.3 + the sdist's `tortoise` on sys.path; imports nothing from our `pipeline` package.
Usage: python tortoise_upstream_runner.py ARGS.json, ARGS being
  checkpoint  plain state_dict .pth, keys as in Tortoise's autoregressive.pth
  config      UnifiedVoice kwargs (checkpointing / train_solo_embeddings default to False, as api.py builds it)
  inputs      .npz: text_ids int64 [1, T] (no start/stop tokens), cond_mels float32 [1, clips, 80, frames]
  steps       max_generate_length for greedy generation
  out         .npz written with
    cond_latent   [1, D]        get_conditioning(cond_mels)
    codes         int64 [1, N]  greedy inference_speech; N < steps only if the stop token 8193 came (then it is last)
    step_logits   [N, 8194]     raw mel-head logits of each generate step (output_logits); first_logits = row 0
    step_scores   [N, 8194]     the processed scores generate ranked (equal to step_logits for plain greedy)
    first_logits  [1, 8194]
    decode_hidden [N, D]        GPT2 last hidden state (after its ln_f, before final_norm) at each step's last position
    latents       [1, N, D]     model(..., return_latent=True, clip_inputs=False) on `codes`, called as api.py does
"""
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from tortoise.models.autoregressive import UnifiedVoice

# Saved by transformers versions whose GPT2Attention buffers were persistent (every released checkpoint);
# 4.48.3 registers them with persistent=False, so strict loading must drop them.
LEGACY_BUFFER = re.compile(r"gpt\.h\.\d+\.attn\.(bias|masked_bias)$")


def main(spec: str) -> None:
    a = json.loads(Path(spec).read_text())
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = UnifiedVoice(**{"checkpointing": False, "train_solo_embeddings": False, **a["config"]})
    sd = torch.load(a["checkpoint"], map_location="cpu", weights_only=True)
    own = model.state_dict()
    dropped = [k for k in sd if LEGACY_BUFFER.match(k) and k not in own]
    for k in dropped:
        del sd[k]
    model.load_state_dict(sd, strict=True)
    model.eval()
    model.post_init_gpt2_config(kv_cache=True)
    print(f"loaded {len(sd)} tensors, dropped {len(dropped)} legacy attn buffers; "
          f"attention: {model.gpt.config._attn_implementation}", file=sys.stderr)

    with np.load(a["inputs"]) as data:
        text = torch.from_numpy(data["text_ids"]).long()
        mels = torch.from_numpy(data["cond_mels"]).float()

    # inference_speech runs unmodified; this wrapper only asks generate for its per-step outputs on the way.
    generate, results = model.inference_model.generate, []

    def generate_with_outputs(*args, **kwargs):
        out = generate(*args, **kwargs, output_scores=True, output_logits=True, output_hidden_states=True,
                       return_dict_in_generate=True)
        results.append(out)
        return out.sequences

    model.inference_model.generate = generate_with_outputs
    with torch.no_grad():
        cond = model.get_conditioning(mels)
        codes = model.inference_speech(cond, text, do_sample=False, num_beams=1, max_generate_length=int(a["steps"]))
        out = results[0]
        # api.py: autoregressive(cond, text, tensor([T]), codes, tensor([N * mel_length_compression]), ...)
        latents = model(cond, text, torch.tensor([text.shape[-1]]), codes.clone(),
                        torch.tensor([codes.shape[-1] * model.mel_length_compression]),
                        return_latent=True, clip_inputs=False)
    step_logits = torch.cat(out.logits)
    np.savez(
        a["out"],
        cond_latent=cond.numpy(),
        codes=codes.numpy().astype(np.int64),
        step_logits=step_logits.numpy(),
        step_scores=torch.cat(out.scores).numpy(),
        first_logits=step_logits[:1].numpy(),
        decode_hidden=torch.cat([h[-1][:, -1] for h in out.hidden_states]).numpy(),
        latents=latents.numpy(),
    )


if __name__ == "__main__":
    main(sys.argv[1])
