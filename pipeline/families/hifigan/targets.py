"""HiFi-GAN beside ONNX: TorchScript for LibTorch, Core ML for Apple devices (Amphion's deployment routes).

Both come from the same Generator the ONNX exporter writes (the checkpoint's weights, weight norm folded),
traced on a log-mel of `example_frames` frames with the time axis left free: input `mel` [batch, 80,
frames], output `audio` [batch, 1, frames * hop]. Neither format takes over the ONNX steps' INT8 (static
QDQ or weight-only) per block; the run says which blocks had it. Core ML computes in FP16 by default,
which is what the Neural Engine runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.evaluation.results import FormatResult
from pipeline.formats.targets import FormatInputs, Target, TargetJob, narrowed_blocks, uncarried_note


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


def generator_of(job: TargetJob):
    """The exporter's PyTorch module for this recipe's checkpoint, and the facts a runtime needs."""
    from .exporter import generator

    return generator(job.model, job.resolve)


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
    from pipeline.formats.torch import save_torchscript, trace

    generator, meta = generator_of(job)
    example = _example(job.params.example_frames, meta["num_mels"])
    traced = trace(generator, example, "format 'torchscript'")
    save_torchscript(traced, job.dest / f"{file_stem(job)}.pt", meta)
    _note_precision(job, "TorchScript", "FP32")


def write_coreml(job: TargetJob) -> None:
    from pipeline.formats.torch import coreml_convert, coreml_ops, trace

    p: CoreMLParams = job.params
    generator, meta = generator_of(job)
    example = _example(p.default_frames, meta["num_mels"])
    traced = trace(generator, example, "format 'coreml'")
    fp16 = p.compute_precision == "fp16"
    mlmodel = coreml_convert(traced, "mel", (1, meta["num_mels"]), (p.min_frames, p.max_frames, p.default_frames),
                             "audio", fp16, p.deployment_target)
    mlmodel.short_description = f"HiFi-GAN V1 vocoder ({meta['checkpoint']}): log-mel in, audio out"
    mlmodel.user_defined_metadata.update({k: str(meta[k]) for k in ("sample_rate", "hop_size", "num_mels")})
    mlmodel.save(str(job.dest / f"{file_stem(job)}.mlpackage"))
    ops = coreml_ops(mlmodel)
    compute = sum(n for op, n in ops.items() if op != "const")
    job.notes.append(f"ML program: {compute} ops ({', '.join(f'{n} {op}' for op, n in ops.most_common(4) if op != 'const')}"
                     f"), frames {p.min_frames}-{p.max_frames}, {p.compute_precision.upper()} compute; "
                     f"Core ML runs it only on Apple systems")
    _note_precision(job, "Core ML", f"{p.compute_precision.upper()} compute", ("fp16",) if fp16 else ())


def check_torchscript(inputs: FormatInputs) -> list[FormatResult]:
    """The saved module, loaded as LibTorch would, on the check's mels: its audio against the FP32 ONNX's."""
    import numpy as np
    import torch

    from pipeline.core.audio import compare_audio, sqnr_db
    from pipeline.core.onnx_io import session
    from pipeline.formats.torch import load_torchscript
    from .. import family_of
    from .exporter import GRAPH

    mel_settings = family_of(inputs.reference).audio(inputs.reference).mel
    reference = session(inputs.reference.load(GRAPH))
    wanted = [reference.run(None, feeds)[0] for feeds in inputs.feeds]
    results = []
    for name in inputs.files:
        module = load_torchscript(inputs.folder / name)
        with torch.no_grad():
            got = [module(torch.from_numpy(feeds["mel"])).numpy() for feeds in inputs.feeds]
        log_mel = max(compare_audio(r, c, mel=mel_settings).log_mel_distance for r, c in zip(wanted, got))
        pooled = sqnr_db(np.concatenate([r.ravel() for r in wanted]), np.concatenate([c.ravel() for c in got]))
        results.append(FormatResult(format="torchscript", file=name, sqnr_db=pooled, log_mel_max=log_mel,
                                    compared=f"audio of the loaded module vs the FP32 ONNX on {len(got)} samples"))
    return results


def check_coreml(inputs: FormatInputs) -> list[FormatResult]:
    return [FormatResult(format="coreml", file=name, compared="-",
                         note="Core ML runs only on Apple systems; on this machine the conversion, the input and "
                              "output specs and the op count were checked when it was written")
            for name in inputs.files]


TORCHSCRIPT = Target("torchscript", TorchScriptParams, write_torchscript, check=check_torchscript,
                     description="a traced TorchScript module (.pt) for LibTorch, time axis free")
COREML = Target("coreml", CoreMLParams, write_coreml, needs=(("coremltools", "coreml"),), check=check_coreml,
                description="a Core ML ML program (.mlpackage), a range of frames, FP16 compute")
