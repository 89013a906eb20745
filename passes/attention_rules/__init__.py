"""fuse_attention's rewrite rules (the contract is pipeline/core/rewrite.py): RoPE -> RotaryEmbedding
(`rotary`), then attention -> MultiHeadAttention (`attention`) or, with an in-place KV cache,
GroupQueryAttention (`group_query`); and ONNX Runtime's fusions that run after them (`ort_fusions`).
A helper package of the pass, not a pass: the registry (passes/__init__.py) does not list it."""
from __future__ import annotations

from pipeline.core.rewrite import Rule

from .attention import MultiHeadAttentionRule
from .group_query import GroupQueryAttentionRule
from .ort_fusions import ort_fusions, unfused_norms
from .rotary import MS, RotaryRule

__all__ = ["MS", "GroupQueryAttentionRule", "MultiHeadAttentionRule", "RotaryRule", "attention_rules",
           "ort_fusions", "unfused_norms"]


def attention_rules(num_heads: int = 0, in_place: bool = False) -> list[Rule]:
    """RoPE first (the attention rule then finds RotaryEmbedding on Q and K), then attention: over a shared
    past/present buffer when `in_place`. `num_heads`: 0 reads them off the graph."""
    attention = GroupQueryAttentionRule if in_place else MultiHeadAttentionRule
    return [RotaryRule(), attention(num_heads)]
