"""Tortoise's sampling as a graph: Hugging Face generate's processors as Tortoise runs them.

Tortoise calls `generate(do_sample=True, temperature=0.8, top_p=0.8,
repetition_penalty=2.0)` on transformers 4.x, whose defaults add top-k 50.
Per row of logits [N, V], in generate's order:
1. repetition penalty over every token id already in the sequence (`seen`
   [N, V], 1 where present; Tortoise's sequence starts with its placeholder
   ids 1 and start_mel, so those count too): scores < 0 ? scores * penalty :
   scores / penalty, once per id whatever its count;
2. divide by the temperature;
3. top-k (TopKLogitsWarper, min_tokens_to_keep 1);
4. top-p (TopPLogitsWarper, min_tokens_to_keep 1);
5. softmax, then the token whose cumulative probability first passes the
   uniform `noise` in [0, 1): the inverse-CDF draw, reproducible from the noise
   (torch.multinomial's generator cannot be carried into a graph).
`greedy` (a bool input) returns the argmax of the raw logits instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NEG_INF = float("-inf")


@dataclass(frozen=True)
class TortoiseSampling:
    """api.py's autoregressive settings ('standard' preset) and transformers 4.x's top-k default."""

    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 50
    repetition_penalty: float = 2.0


class SampleHead(nn.Module):
    def forward(self, logits: torch.Tensor, seen: torch.Tensor, temperature: torch.Tensor, penalty: torch.Tensor,
                top_k: torch.Tensor, top_p: torch.Tensor, noise: torch.Tensor, greedy: torch.Tensor):
        scores = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
        scores = scores / temperature
        vocab = scores.shape[-1]
        desc, _ = torch.sort(scores, descending=True, dim=-1)
        k = torch.clamp(top_k, min=1, max=vocab)
        kth = torch.gather(desc, 1, (k - 1).expand(scores.shape[0], 1))
        scores = scores.masked_fill(scores < kth, NEG_INF)
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove = remove & (torch.arange(vocab)[None, :] < vocab - 1)  # min_tokens_to_keep = 1
        scores = scores.masked_fill(remove.scatter(1, order, remove), NEG_INF)
        probs = scores.softmax(dim=-1)
        drawn = (probs.cumsum(dim=-1) <= noise).sum(dim=-1).clamp(max=vocab - 1)
        return torch.where(greedy, logits.argmax(dim=-1), drawn), probs


def export_sample_head(path, vocab: int, opset: int = 17) -> None:
    head = SampleHead().eval()
    seen = torch.zeros(2, vocab, dtype=torch.bool)
    seen[:, 1] = True
    args = (torch.randn(2, vocab), seen, torch.tensor([[0.8]]), torch.tensor([[2.0]]), torch.tensor([[50]]),
            torch.tensor([[0.8]]), torch.rand(2, 1), torch.tensor(False))
    names = ["logits", "seen", "temperature", "penalty", "top_k", "top_p", "noise", "greedy"]
    with torch.no_grad():
        torch.onnx.export(head, args, str(path), input_names=names, output_names=["next_ids", "probs"],
                          dynamic_axes={"logits": {0: "rows", 1: "vocab"}, "seen": {0: "rows", 1: "vocab"},
                                        "noise": {0: "rows"}, "next_ids": {0: "rows"},
                                        "probs": {0: "rows", 1: "vocab"}},
                          opset_version=opset, dynamo=False)
