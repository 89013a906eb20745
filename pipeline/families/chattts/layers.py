"""ChatTTS's GPT decoder layer as a small module with explicit KV-cache inputs and outputs.

The weights keep Hugging Face's LlamaDecoderLayer names (`self_attn.q_proj`,
`mlp.gate_proj`, `input_layernorm`, ...), so a `layers.N.*` slice of ChatTTS's
`asset/gpt/model.safetensors` loads as it is. Writing the layer out, instead of
exporting transformers' LlamaModel, gives one graph per layer with named
cache tensors and clean node names, and avoids the TorchScript exporter's
failure on LlamaModel (`aten::diff`) with transformers 5.

One graph serves prefill and decode: `past_key`/`past_value` have a dynamic
length P (0 for prefill), the new tokens take positions P..P+S-1 and attend
to every cached position and causally among themselves.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, rope_theta: float):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor):
        b, s, h = x.shape
        past = past_key.shape[2]
        q, k, v = self._split(self.q_proj(x)), self._split(self.k_proj(x)), self._split(self.v_proj(x))
        positions = torch.arange(s, dtype=torch.float32) + past
        freqs = positions[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        half = self.head_dim // 2  # a Python int: the export slices at a constant, as RoPE fusions expect
        q = q * cos + _rotate_half(q, half) * sin
        k = k * cos + _rotate_half(k, half) * sin
        key = torch.cat([past_key, k], dim=2)
        value = torch.cat([past_value, v], dim=2)
        scores = torch.matmul(q, key.transpose(2, 3)) / math.sqrt(self.head_dim)
        q_pos = torch.arange(s) + past
        k_pos = torch.arange(past + s)
        future = k_pos[None, :] > q_pos[:, None]
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, value).transpose(1, 2).reshape(b, s, h)
        return self.o_proj(out), key, value


def _rotate_half(x: torch.Tensor, half: int) -> torch.Tensor:
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm Llama layer: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, hidden: int, intermediate: int, heads: int, eps: float, rope_theta: float):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = Attention(hidden, heads, rope_theta)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = MLP(hidden, intermediate)

    def forward(self, hidden: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor):
        attn, key, value = self.self_attn(self.input_layernorm(hidden), past_key, past_value)
        hidden = hidden + attn
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden, key, value
