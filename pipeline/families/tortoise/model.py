"""Tortoise-TTS's autoregressive model (`UnifiedVoice`, tortoise-tts 3.0.0) as PyTorch modules of our own.

The module tree and parameter names are Tortoise's, so a real
`autoregressive.pth` loads as it is:
    conditioning_encoder.init / .attn.N.{norm,qkv,proj_out}   1x1 conv, then attention blocks
    text_embedding, mel_embedding                             token embeddings
    text_pos_embedding.emb, mel_pos_embedding.emb             learned positions, added outside the GPT2
    gpt.h.N.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj}, gpt.ln_f
                                                              the GPT2 stack (HF Conv1D: weights [in, out])
    final_norm, text_head, mel_head
Tortoise's GPT2 has no positions of its own (wpe is zeros) and no token
embedding (wte is unused), so the stack is only its blocks and ln_f.

Writing the layers out, instead of exporting transformers' GPT2Model, gives one
graph per stage with named cache tensors and nodes named `/gpt/h.N/...` (the
check's blocks), and does not tie the export to a transformers version: the
tests prove `GPT2Stack` equal to transformers' GPT2Model with the same weights.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TortoiseConfig:
    """`UnifiedVoice`'s constructor arguments; the defaults are the released model's (api.py)."""

    layers: int = 30
    model_dim: int = 1024
    heads: int = 16
    max_text_tokens: int = 402
    max_mel_tokens: int = 604
    max_conditioning_inputs: int = 2
    number_text_tokens: int = 255
    start_text_token: int = 255
    number_mel_codes: int = 8194
    start_mel_token: int = 8192
    stop_mel_token: int = 8193
    conditioning_blocks: int = 6  # ConditioningEncoder's attn_blocks (fixed in UnifiedVoice)
    mel_channels: int = 80

    stop_text_token = 0  # UnifiedVoice sets it, not a constructor argument

    @property
    def text_vocab(self) -> int:
        return self.number_text_tokens + 1  # types=1

    @property
    def mel_positions(self) -> int:
        return self.max_mel_tokens + 2 + self.max_conditioning_inputs

    @property
    def text_positions(self) -> int:
        return self.max_text_tokens + 2

    @property
    def inner(self) -> int:
        return 4 * self.model_dim  # GPT2Config's n_inner default

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.heads


LN_EPS = 1e-5  # GPT2Config.layer_norm_epsilon and nn.LayerNorm's default


class Conv1D(nn.Module):
    """Hugging Face's GPT2 Conv1D: a linear layer whose weight is stored [in, out]."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias  # MatMul + Add: what the quantizers look for


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT2's `gelu_new` (transformers' NewGELUActivation), the tanh approximation."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPT2Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.c_attn = Conv1D(dim, 3 * dim)
        self.c_proj = Conv1D(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor):
        b, s, _ = x.shape
        past = past_key.shape[2]
        q, k, v = self.c_attn(x).split(self.dim, dim=2)  # a Python int: the export splits at a constant
        q, k, v = self._split(q), self._split(k), self._split(v)
        key = torch.cat([past_key, k], dim=2)
        value = torch.cat([past_value, v], dim=2)
        scores = torch.matmul(q, key.transpose(2, 3)) / math.sqrt(self.head_dim)
        future = torch.arange(past + s)[None, :] > (torch.arange(s) + past)[:, None]
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, value).transpose(1, 2).reshape(b, s, self.dim)
        return self.c_proj(out), key, value


class GPT2MLP(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.c_fc = Conv1D(dim, inner)
        self.c_proj = Conv1D(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(gelu_new(self.c_fc(x)))


class GPT2Block(nn.Module):
    """Pre-norm GPT2 block: x + attn(ln_1(x)), then + mlp(ln_2(.)); past/present KV [B, H, P, D]."""

    def __init__(self, dim: int, heads: int, inner: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = GPT2Attention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = GPT2MLP(dim, inner)

    def forward(self, hidden: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor):
        attn, key, value = self.attn(self.ln_1(hidden), past_key, past_value)
        hidden = hidden + attn
        return hidden + self.mlp(self.ln_2(hidden)), key, value


class GPT2Stack(nn.Module):
    """Tortoise's `gpt`: the blocks and ln_f of a GPT2Model without wpe/wte (positions come from outside)."""

    def __init__(self, c: TortoiseConfig):
        super().__init__()
        self.h = nn.ModuleList(GPT2Block(c.model_dim, c.heads, c.inner) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.model_dim, eps=LN_EPS)

    def forward(self, hidden: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]]):
        presents = []
        for block, (k, v) in zip(self.h, cache):
            hidden, k, v = block(hidden, k, v)
            presents.append((k, v))
        return self.ln_f(hidden), presents


class PositionTable(nn.Module):
    """Tortoise's LearnedPositionEmbeddings: a table `emb` of learned positions."""

    def __init__(self, positions: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(positions, dim)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.emb(positions)


class QKVAttentionLegacy(nn.Module):
    """Tortoise's (arch_util) attention: heads split before q/k/v, both scaled by dim^-1/4."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads, self.ch = heads, channels // heads  # Python ints: the export reshapes at constants

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, _, length = qkv.shape
        ch = self.ch
        q, k, v = qkv.reshape(bs * self.heads, ch * 3, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


def _groups(channels: int) -> int:
    """arch_util.normalization's group count."""
    groups = 32 if channels > 64 else 16 if channels > 16 else 8
    while channels % groups:
        groups //= 2
    return groups


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.attention = QKVAttentionLegacy(channels, heads)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj_out(self.attention(self.qkv(self.norm(x))))


class ConditioningEncoder(nn.Module):
    """Reference mels [B, 80, frames] -> latent [B, dim]: 1x1 conv, attention blocks, the first frame."""

    def __init__(self, c: TortoiseConfig):
        super().__init__()
        self.init = nn.Conv1d(c.mel_channels, c.model_dim, kernel_size=1)
        self.attn = nn.Sequential(*(AttentionBlock(c.model_dim, c.heads) for _ in range(c.conditioning_blocks)))

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        return self.attn(self.init(mels))[:, :, 0]


class UnifiedVoiceGPT(nn.Module):
    """UnifiedVoice's inference path (no training heads beyond its Linear layers, no MelEncoder)."""

    def __init__(self, c: TortoiseConfig):
        super().__init__()
        self.config = c
        self.conditioning_encoder = ConditioningEncoder(c)
        self.text_embedding = nn.Embedding(c.text_vocab, c.model_dim)
        self.mel_embedding = nn.Embedding(c.number_mel_codes, c.model_dim)
        self.gpt = GPT2Stack(c)
        self.mel_pos_embedding = PositionTable(c.mel_positions, c.model_dim)
        self.text_pos_embedding = PositionTable(c.text_positions, c.model_dim)
        self.final_norm = nn.LayerNorm(c.model_dim, eps=LN_EPS)
        self.text_head = nn.Linear(c.model_dim, c.text_vocab)
        self.mel_head = nn.Linear(c.model_dim, c.number_mel_codes)
        self.eval()

    # -- the three stages the ONNX graphs export -------------------------------------
    def conditioning(self, mels: torch.Tensor) -> torch.Tensor:
        """get_conditioning: [B, clips, 80, frames] -> the clips' latents' mean [B, dim]."""
        b, clips, ch, frames = mels.shape
        latents = self.conditioning_encoder(mels.reshape(b * clips, ch, frames))
        return latents.reshape(b, clips, -1).mean(dim=1)

    def prompt(self, text_ids: torch.Tensor, cond_latent: torch.Tensor) -> torch.Tensor:
        """[cond latent | start_text, text..., stop_text] embedded, text at positions 0..T+1 (inference_speech)."""
        c = self.config
        b = text_ids.shape[0]
        start = torch.full((b, 1), c.start_text_token, dtype=text_ids.dtype)
        stop = torch.full((b, 1), c.stop_text_token, dtype=text_ids.dtype)
        text = torch.cat([start, text_ids, stop], dim=1)
        positions = self.text_pos_embedding(torch.arange(text.shape[1]))
        return torch.cat([cond_latent[:, None], self.text_embedding(text) + positions], dim=1)

    def mel_inputs(self, mel_ids: torch.Tensor, first_position: torch.Tensor | int) -> torch.Tensor:
        """Mel codes embedded at mel positions first_position, first_position + 1, ..."""
        positions = torch.arange(mel_ids.shape[1]) + first_position
        return self.mel_embedding(mel_ids) + self.mel_pos_embedding(positions)

    def head(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ln_f's output -> (mel logits, hidden state): the hidden state is final_norm(ln_f(h)), the
        diffusion decoder's latent, and the mel head reads it."""
        latent = self.final_norm(hidden)
        return self.mel_head(latent), latent

    def empty_cache(self, batch: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.config
        z = torch.zeros(batch, c.heads, 0, c.head_dim)
        return [(z, z) for _ in range(c.layers)]

    @torch.no_grad()
    def prefill(self, text_ids: torch.Tensor, cond_latent: torch.Tensor, mel_ids: torch.Tensor):
        """(logits, hidden) at the mel positions 0..M-1 of `mel_ids`, and the cache of the whole sequence."""
        x = torch.cat([self.prompt(text_ids, cond_latent), self.mel_inputs(mel_ids, 0)], dim=1)
        h, cache = self.gpt(x, self.empty_cache(x.shape[0]))
        logits, latent = self.head(h[:, -mel_ids.shape[1]:])
        return logits, latent, cache

    @torch.no_grad()
    def decode(self, mel_id: torch.Tensor, position: torch.Tensor | int, cache):
        """One code at mel `position` (code k of the generation sits at k + 1) after `cache`."""
        h, cache = self.gpt(self.mel_inputs(mel_id, position), cache)
        logits, latent = self.head(h)
        return logits, latent, cache

    @torch.no_grad()
    def greedy(self, text_ids: torch.Tensor, cond_latent: torch.Tensor, steps: int) -> list[int]:
        """Greedy codes with the KV cache, as inference_speech with do_sample=False (no stop handling)."""
        c = self.config
        logits, _, cache = self.prefill(text_ids, cond_latent, torch.tensor([[c.start_mel_token]]))
        codes = [int(logits[0, -1].argmax())]
        for k in range(1, steps):
            logits, _, cache = self.decode(torch.tensor([[codes[-1]]]), k + 1, cache)
            codes.append(int(logits[0, -1].argmax()))
        return codes

    @torch.no_grad()
    def latents(self, text_ids: torch.Tensor, cond_latent: torch.Tensor, codes: list[int]) -> torch.Tensor:
        """forward(return_latent=True): the hidden states at `[start_mel, c1, ..., c_{N-1}]`, positions 0..N-1."""
        mel = torch.tensor([[self.config.start_mel_token, *codes[:-1]]])
        return self.prefill(text_ids, cond_latent, mel)[1]


def build_on_meta(c: TortoiseConfig) -> None:
    """Build UnifiedVoice from `c` and run the conditioning, a prefill and a decode step on the shapes the export
    traces, all on torch's meta device: no memory and no weights, so `pipeline validate` finds a config the
    modules cannot be built from. (Meta tensors carry no values: an id past a table passes here; the config's
    ranges catch those.)"""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a probe: what torch warns about shows up in the real export
        model = UnifiedVoiceGPT(c)
        latent = model.conditioning(torch.zeros(1, 2, c.mel_channels, 40))
        text = torch.ones(1, 5, dtype=torch.long)
        _, _, cache = model.prefill(text, latent, torch.full((1, 2), c.start_mel_token, dtype=torch.long))
        model.decode(torch.ones(1, 1, dtype=torch.long), 3, cache)
