"""A small ChatTTS GPT in the real asset layout, built in the tests (tests/test_chattts.py, test_gguf.py,
test_report_html.py)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.families.chattts.exporter import GPTConfig

# ChatTTS's config at a size that exports and runs in seconds.
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3,
            max_position_embeddings=256, num_text_tokens=97, num_audio_tokens=211, num_vq=4)


class ChatTTSEmbed(nn.Module):
    """The shape of ChatTTS's Embed module, weight norm applied by torch itself (so its key names are real)."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        from torch.nn.utils.parametrizations import weight_norm

        self.emb_code = nn.ModuleList(nn.Embedding(c.num_audio_tokens, c.hidden_size) for _ in range(c.num_vq))
        self.emb_text = nn.Embedding(c.num_text_tokens, c.hidden_size)
        self.head_text = weight_norm(nn.Linear(c.hidden_size, c.num_text_tokens, bias=False), name="weight")
        self.head_code = nn.ModuleList(weight_norm(nn.Linear(c.hidden_size, c.num_audio_tokens, bias=False),
                                                   name="weight") for _ in range(c.num_vq))


def write_assets(root: Path) -> tuple[Path, nn.Module, ChatTTSEmbed, GPTConfig]:
    """A small asset folder in ChatTTS's layout under `root`: HF LlamaModel without embed_tokens +
    Embed.safetensors. Returns (root, the Llama stack, the Embed module, their config), seeded."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(7)
    c = GPTConfig(**TINY)
    hf = LlamaConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_attention_heads=c.num_attention_heads, num_hidden_layers=c.num_hidden_layers,
                     max_position_embeddings=c.max_position_embeddings, rms_norm_eps=1e-6, vocab_size=8,
                     num_text_tokens=c.num_text_tokens, num_audio_tokens=c.num_audio_tokens, num_vq=c.num_vq)
    llama = LlamaModel(hf).eval()
    for name, p in llama.named_parameters():  # sharper than the default init, so greedy has clear winners
        if "norm" not in name:
            nn.init.normal_(p, std=0.1)
    del llama.embed_tokens
    (root / "gpt").mkdir(parents=True)
    hf.save_pretrained(root / "gpt")
    save_file({k: v.contiguous() for k, v in llama.state_dict().items()}, str(root / "gpt" / "model.safetensors"))
    embed = ChatTTSEmbed(c).eval()
    for p in embed.parameters():
        nn.init.normal_(p, std=0.3)
    save_file({k: v.contiguous() for k, v in embed.state_dict().items()}, str(root / "Embed.safetensors"))
    return root, llama, embed, c
