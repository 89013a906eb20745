"""ChatTTS's sampling as a graph: the logits processors in ChatTTS's order, then a draw.

Per row of logits [N, V] (text: one row per sequence; codes: one per sequence and
codebook, as ChatTTS reshapes them):
1. divide by the temperature;
2. repetition penalty over the last tokens of that row (`past_ids`, -1 = none):
   alpha = penalty ** count, scores < 0 ? scores * alpha : scores / alpha;
3. top-p, as transformers' TopPLogitsWarper with min_tokens_to_keep=3;
4. top-k, as transformers' TopKLogitsWarper with min_tokens_to_keep=3;
5. softmax, then the token whose cumulative probability first passes the
   uniform `noise` in [0, 1): the inverse-CDF draw, reproducible from the noise
   (torch.multinomial's generator cannot be carried into a graph).
`greedy` (a bool input) returns the argmax of the processed logits instead.
"""
from __future__ import annotations

import torch
from torch import nn

MIN_TOKENS_TO_KEEP = 3
NEG_INF = float("-inf")


class SampleHead(nn.Module):
    def forward(self, logits: torch.Tensor, past_ids: torch.Tensor, temperature: torch.Tensor,
                penalty: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, noise: torch.Tensor,
                greedy: torch.Tensor):
        scores = logits / temperature
        vocab = scores.shape[-1]
        valid = (past_ids >= 0).to(scores.dtype)
        onehot = nn.functional.one_hot(past_ids.clamp(min=0), vocab).to(scores.dtype) * valid[..., None]
        alpha = torch.pow(penalty, onehot.sum(1))
        scores = torch.where(scores < 0, scores * alpha, scores / alpha)
        # top-p: ascending sort, drop the low tail whose mass is <= 1 - top_p, keep the last 3.
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        ranks = torch.arange(vocab)[None, :]
        remove = remove & (ranks < vocab - MIN_TOKENS_TO_KEEP)
        remove = remove.scatter(1, order, remove)
        scores = scores.masked_fill(remove, NEG_INF)
        # top-k: below the k-th largest goes.
        k = torch.clamp(top_k, min=MIN_TOKENS_TO_KEEP, max=vocab)
        desc, _ = torch.sort(scores, descending=True, dim=-1)
        kth = torch.gather(desc, 1, (k - 1).expand(scores.shape[0], 1))
        scores = scores.masked_fill(scores < kth, NEG_INF)
        probs = scores.softmax(dim=-1)
        drawn = (probs.cumsum(dim=-1) <= noise).sum(dim=-1).clamp(max=vocab - 1)
        return torch.where(greedy, scores.argmax(dim=-1), drawn), probs


def export_sample_head(path, vocab: int, opset: int = 17) -> None:
    head = SampleHead().eval()
    args = (torch.randn(2, vocab), torch.tensor([[1, -1]] * 2), torch.tensor([[0.7]]), torch.tensor([[1.05]]),
            torch.tensor([[0.7]]), torch.tensor([[20]]), torch.rand(2, 1), torch.tensor(False))
    names = ["logits", "past_ids", "temperature", "penalty", "top_p", "top_k", "noise", "greedy"]
    with torch.no_grad():
        torch.onnx.export(head, args, str(path), input_names=names, output_names=["next_ids", "probs"],
                          dynamic_axes={"logits": {0: "rows", 1: "vocab"}, "past_ids": {0: "rows", 1: "window"},
                                        "noise": {0: "rows"}, "next_ids": {0: "rows"},
                                        "probs": {0: "rows", 1: "vocab"}},
                          opset_version=opset, dynamo=False)
