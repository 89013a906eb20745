"""A small Tortoise GPT, seeded, built in the tests (tests/test_tortoise.py, test_gguf.py)."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.families.tortoise.model import TortoiseConfig
from pipeline.families.tortoise.weights import TortoiseWeights, seeded_weights

SMALL = {"layers": 3, "model_dim": 64, "heads": 4, "max_text_tokens": 120, "max_mel_tokens": 80}
TEXT = [26, 59, 20, 127, 33, 2, 178, 159, 49, 2, 51]  # text token ids, a sentence's worth


def decisive(c: TortoiseConfig, seed: int = 0) -> TortoiseWeights:
    """Seeded weights with every parameter random (biases and norms too, so a wrong layout shows) and a mel head
    whose logits are far apart, so greedy codes do not hinge on float rounding."""
    w = seeded_weights(c, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for k, v in w.state.items():
        if k.endswith(".bias") or "norm" in k or "ln_" in k:
            w.state[k] = v + 0.1 * torch.randn(v.shape, generator=gen)
    w.state["mel_head.weight"] = w.state["mel_head.weight"] * 50
    return w


def latent_of(w: TortoiseWeights, seed: int = 0) -> np.ndarray:
    """A conditioning latent from seeded random mels (two clips of 50 frames)."""
    mels = torch.randn(1, 2, 80, 50, generator=torch.Generator().manual_seed(seed))
    return w.model().conditioning(mels).detach().numpy()
