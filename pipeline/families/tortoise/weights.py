"""Tortoise's `autoregressive.pth`, or seeded weights with the released config.

The checkpoint is a plain state_dict, loaded with `torch.load(weights_only=True)`:
a pickle that would run code is refused. Every key is checked against the
modules (model.py): a missing, misshaped or unknown key is named, never ignored.
The only extras accepted are the legacy causal-mask buffers that releases
carry and current transformers no longer has (`gpt.h.N.attn.bias`,
`gpt.h.N.attn.masked_bias`): buffers, not weights.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.core.errors import PipelineError, few
from .model import TortoiseConfig, UnifiedVoiceGPT

LEGACY_BUFFER = re.compile(r"^gpt\.h\.\d+\.attn\.(bias|masked_bias)$")


@dataclass
class TortoiseWeights:
    config: TortoiseConfig
    state: dict[str, torch.Tensor]  # UnifiedVoiceGPT's state dict
    seeded: bool
    source: str

    def model(self) -> UnifiedVoiceGPT:
        with torch.device("meta"):  # no random init only to overwrite it
            m = UnifiedVoiceGPT(self.config)
        m.load_state_dict({k: v.clone() for k, v in self.state.items()}, assign=True)
        return m.eval()


def expected_keys(c: TortoiseConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no 1.7 GB allocated
        return {k: tuple(v.shape) for k, v in UnifiedVoiceGPT(c).state_dict().items()}


def seeded_weights(c: TortoiseConfig | None = None, seed: int = 0) -> TortoiseWeights:
    """GPT2's initialisation (normal 0.02, zero biases, unit norms) from one seeded generator."""
    c = c or TortoiseConfig()
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in expected_keys(c).items():
        if re.search(r"(ln_\d|ln_f|final_norm|\.norm)\.weight$", k):
            state[k] = torch.ones(shape)
        elif k.endswith(".bias"):
            state[k] = torch.zeros(shape)
        else:
            state[k] = torch.randn(shape, generator=gen) * 0.02
    return TortoiseWeights(c, state, True, f"seeded random weights (seed {seed})")


def load_checkpoint(path: Path, c: TortoiseConfig | None = None) -> TortoiseWeights:
    """A real autoregressive.pth, checked key by key against `c` (default: the released config)."""
    c = c or TortoiseConfig()
    if not path.is_file():
        raise PipelineError(f"checkpoint not found: {path}")
    try:
        found = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses globals it does not know: code, not tensors
        raise PipelineError(f"{path}: refused: the pickle asks to run code or build objects other than tensors "
                            f"({str(e).splitlines()[-1][:160]})") from None
    except Exception as e:  # truncated zip, not a torch file at all
        raise PipelineError(f"{path}: not a readable PyTorch checkpoint: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''}") from None
    if isinstance(found, dict) and isinstance(found.get("state_dict"), dict):
        found = found["state_dict"]
    if not isinstance(found, dict) or not all(isinstance(v, torch.Tensor) for v in found.values()):
        raise PipelineError(f"{path}: not a state_dict (a dict of tensor name -> tensor)")
    state = {k: v for k, v in found.items() if not LEGACY_BUFFER.match(k)}
    check_keys(state, expected_keys(c), path)
    return TortoiseWeights(c, {k: v.float() for k, v in state.items()}, False, str(path))


def check_keys(found: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (not in Tortoise's UnifiedVoice with this config) {few(unexpected)}")
    if not problems:
        misshaped = [f"{k} {list(found[k].shape)} (expected {list(v)})" for k, v in expected.items()
                     if tuple(found[k].shape) != v]
        if misshaped:
            problems.append(f"misshaped keys {few(misshaped, 4, '; ')}")
    if problems:
        raise PipelineError(f"{where}: checkpoint does not fit the config: {'; '.join(problems)}")


def tortoise_config(params) -> TortoiseConfig:
    """The model config a recipe's params name."""
    return TortoiseConfig(**params.config.model_dump())


def gpt_weights(params, resolve):
    """The UnifiedVoice weights these params name: the export's, and every target's."""
    c = tortoise_config(params)
    return load_checkpoint(resolve(params.checkpoint), c) if params.checkpoint else seeded_weights(c, params.seed)
