"""HiFi-GAN beside ONNX: TorchScript for LibTorch, Core ML for Apple devices (Amphion's deployment routes).

Both come from the same Generator the ONNX exporter writes (the checkpoint's weights, weight norm folded),
traced on a log-mel of `example_frames` frames with the time axis left free: input `mel` [batch, 80,
frames], output `audio` [batch, 1, frames * hop]. Neither format takes over the ONNX steps' INT8 (static
QDQ or weight-only) per block; the run says which blocks had it. Core ML computes in FP16 by default,
which is what the Neural Engine runs.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Literal

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ...targets import Target, TargetJob, narrowed_blocks, uncarried_note

if TYPE_CHECKING:
    from .exporter import Generator


class TorchScriptParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    example_frames: int = Field(64, ge=8, le=4096, description="mel frames of the example the module is traced "
                                                                "on; any length runs afterwards")


class CoreMLParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_frames: int = Field(8, ge=1, description="shortest mel (frames) the model accepts")
    max_frames: int = Field(2048, ge=1, description="longest mel (frames) the model accepts (2048 at hop 256 "
                                                     "is 23.8 s at 22.05 kHz)")
    default_frames: int = Field(64, ge=1, description="the length the model is traced and specialised for")
    compute_precision: Literal["fp16", "fp32"] = Field("fp16", description="precision Core ML computes in "
                                                                          "(inputs and outputs stay FP32)")
    deployment_target: Literal["iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15"] = Field(
        "iOS16", description="oldest OS the ML program must run on")

    @model_validator(mode="after")
    def _range(self) -> CoreMLParams:
        if not self.min_frames <= self.default_frames <= self.max_frames:
            raise ValueError(f"need min_frames <= default_frames <= max_frames (got {self.min_frames}, "
                             f"{self.default_frames}, {self.max_frames})")
        return self


def generator_of(job: TargetJob) -> tuple[Generator, dict]:
    """The exporter's PyTorch module for this recipe's checkpoint, and the facts a runtime needs."""
    from .exporter import checkpoint_path, load_generator, read_config, shipped_file

    model = job.model
    config_path = job.resolve(model.config) if model.config else shipped_file("config.json")
    config = read_config(config_path)
    generator = load_generator(checkpoint_path(model.checkpoint, job.resolve), config)
    meta = {"checkpoint": model.checkpoint, "sample_rate": config.sampling_rate, "hop_size": config.hop_size,
            "num_mels": config.num_mels, "config": asdict(config),
            "input": "mel: log(clamp(magnitude mel, 1e-5)) [batch, num_mels, frames]",
            "output": "audio: [batch, 1, frames * hop_size] in [-1, 1]"}
    return generator, meta


def file_stem(job: TargetJob) -> str:
    """The same stem as the ONNX file in final/ (hifigan_universal), so the formats sit side by side."""
    from .exporter import GRAPH

    return Path(job.final.graph(GRAPH).file).stem


def _note_precision(job: TargetJob, fmt: str, written: str, carries: tuple[str, ...] = ()) -> None:
    from .exporter import GRAPH

    note = uncarried_note(fmt, narrowed_blocks(job.final.load(GRAPH)), written, carries)
    if note:
        job.notes.append(note)


def _example(frames: int, mels: int):
    import torch

    return torch.randn(1, mels, frames, generator=torch.Generator().manual_seed(0))


def write_torchscript(job: TargetJob) -> None:
    from ...torch_formats import save_torchscript, trace

    generator, meta = generator_of(job)
    example = _example(job.params.example_frames, meta["num_mels"])
    traced = trace(generator, example, "format 'torchscript'")
    save_torchscript(traced, job.dest / f"{file_stem(job)}.pt", meta)
    _note_precision(job, "TorchScript", "FP32")


def write_coreml(job: TargetJob) -> None:
    from ...torch_formats import coreml_convert, coreml_ops, trace

    p: CoreMLParams = job.params
    generator, meta = generator_of(job)
    example = _example(p.default_frames, meta["num_mels"])
    traced = trace(generator, example, "format 'coreml'")
    mlmodel = coreml_convert(traced, "mel", (1, meta["num_mels"]), (p.min_frames, p.max_frames, p.default_frames),
                             "audio", p.compute_precision == "fp16", p.deployment_target)
    mlmodel.short_description = f"HiFi-GAN V1 vocoder ({meta['checkpoint']}): log-mel in, audio out"
    mlmodel.user_defined_metadata.update({k: str(meta[k]) for k in ("sample_rate", "hop_size", "num_mels")})
    mlmodel.save(str(job.dest / f"{file_stem(job)}.mlpackage"))
    ops = coreml_ops(mlmodel)
    compute = sum(n for op, n in ops.items() if op != "const")
    job.notes.append(f"ML program: {compute} ops ({', '.join(f'{n} {op}' for op, n in ops.most_common(4) if op != 'const')}"
                     f"), frames {p.min_frames}-{p.max_frames}, {p.compute_precision.upper()} compute; "
                     f"Core ML runs it only on Apple systems")
    fp16 = p.compute_precision == "fp16"
    _note_precision(job, "Core ML", f"{p.compute_precision.upper()} compute", ("fp16",) if fp16 else ())


TORCHSCRIPT = Target("torchscript", TorchScriptParams, write_torchscript,
                     description="a traced TorchScript module (.pt) for LibTorch, time axis free")
COREML = Target("coreml", CoreMLParams, write_coreml, needs=(("coremltools", "coreml"),),
                description="a Core ML ML program (.mlpackage), a range of frames, FP16 compute")
