"""Formats beside ONNX (a recipe's `targets:`): TorchScript and Core ML of the trained HiFi-GAN, and every bad
input the issue names. Real weights, real speech (the Piper voice speaks evaluation sentences), real converters.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import cli, one_line
from pydantic import BaseModel

from pipeline.core.audio import sqnr_db
from pipeline.core.errors import PipelineError
from pipeline.core.precision import weight_precision
from pipeline.formats.targets import PlannedTarget, Target, TargetJob, write_target

FRAMES = (8, 2048, 64)


class NoParams(BaseModel):
    pass


def write_recipe(folder: Path, targets: list[dict], steps: list | None = None, model: dict | None = None,
                 check: dict | None = None) -> Path:
    recipe = {"name": "vocoder_targets", "model": model or {"exporter": "hifigan", "params": {"checkpoint": "universal"}},
              "steps": steps or [], "targets": targets, **({"check": check} if check else {})}
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def vocoder_run(tmp_path_factory) -> Path:
    """The universal vocoder, FP16-stored weights in the ONNX steps, with TorchScript and Core ML beside it: a
    full-size run and two conversions (a minute or more), so the tests on it are end to end (e2e)."""
    folder = tmp_path_factory.mktemp("targets")
    recipe = write_recipe(folder, [{"format": "torchscript"}, {"format": "coreml"}],
                          steps=[{"pass": "compress_weights", "params": {"dtype": "fp16"}}],
                          check={"samples": 2, "on_fail": "warn"})
    res = cli("run", str(recipe), "--out", str(folder / "run"))
    assert res.exit_code == 0, res.output
    return folder / "run"


@pytest.fixture(scope="module")
def real_mels() -> list[np.ndarray]:
    """Mels of real Piper speech, two lengths, neither the 64 frames the modules were traced on."""
    from calibration.piper_mels import eval_sentences, speech_mels

    return [feeds["mel"] for _, _, feeds in speech_mels(eval_sentences(2))]


@pytest.mark.e2e
def test_torchscript_loads_and_matches_the_exporters_module_on_real_mels(vocoder_run, real_mels):
    from pipeline.families.hifigan.exporter import load_model

    files = json.loads((vocoder_run / "final" / "torchscript" / ".target.json").read_text())["files"]
    assert list(files) == ["hifigan_universal.pt"]
    extra = {"pipeline.json": ""}
    scripted = torch.jit.load(str(vocoder_run / "final" / "torchscript" / "hifigan_universal.pt"), _extra_files=extra)
    meta = json.loads(extra["pipeline.json"])
    assert meta["sample_rate"] == 22050 and meta["hop_size"] == 256
    eager, _ = load_model("universal")
    assert len({m.shape[2] for m in real_mels}) == 2
    for mel in real_mels:
        with torch.no_grad():
            got, want = scripted(torch.from_numpy(mel)), eager(torch.from_numpy(mel))
        assert got.shape == (1, 1, mel.shape[2] * 256)
        assert sqnr_db(want.numpy(), got.numpy()) >= 60


@pytest.mark.e2e
def test_coreml_package_specs_and_ops(vocoder_run):
    import coremltools as ct

    package = vocoder_run / "final" / "coreml" / "hifigan_universal.mlpackage"
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()  # Linux: Core ML cannot run it
    (mel,), (audio,) = spec.description.input, spec.description.output
    assert mel.name == "mel" and audio.name == "audio"
    array = mel.type.multiArrayType
    assert array.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    ranges = [(r.lowerBound, r.upperBound) for r in array.shapeRange.sizeRanges]
    assert ranges == [(1, 1), (80, 80), (FRAMES[0], FRAMES[1])] and list(array.shape) == [1, 80, FRAMES[2]]
    assert audio.type.multiArrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    main = spec.mlProgram.functions["main"]
    ops = [op for block in main.block_specializations.values() for op in block.operations]
    types = Counter(op.type for op in ops)
    # conv_pre + 12 resblocks x 6 convs + conv_post; 4 upsamplers; one tanh at the end
    assert types["conv"] == 74 and types["conv_transpose"] == 4 and types["tanh"] == 1
    assert types["cast"] >= 2  # FP32 in, FP16 compute, FP32 out
    fp16 = ct.proto.MIL_pb2.DataType.FLOAT16
    conv_weights = [op for op in ops if op.type == "const" and op.outputs[0].type.tensorType.rank == 3]
    assert conv_weights and all(op.outputs[0].type.tensorType.dataType == fp16 for op in conv_weights)


@pytest.mark.e2e
def test_run_reports_the_formats_and_what_did_not_carry_over(vocoder_run):
    manifest = json.loads((vocoder_run / "manifest.json").read_text())
    targets = manifest["final"]["targets"]
    assert set(targets) == {"torchscript", "coreml"}
    assert any("fp16 in /conv_pre" in n and "written in FP32" in n for n in targets["torchscript"]["notes"])
    assert any("74 conv" in n for n in targets["coreml"]["notes"])
    formats = {f["format"]: f for f in json.loads((vocoder_run / "report.json").read_text())["formats"]}
    # checked the same way as the ONNX result: its audio against the FP32 ONNX vocoder on the check's mels
    assert formats["torchscript"]["file"] == "hifigan_universal.pt" and formats["torchscript"]["sqnr_db"] >= 60
    assert formats["torchscript"]["log_mel_max"] < 0.001 and "on 2 samples" in formats["torchscript"]["compared"]
    assert formats["coreml"].get("sqnr_db") is None and "only on Apple systems" in formats["coreml"]["note"]
    res = cli("inspect", str(vocoder_run))
    assert res.exit_code == 0, res.output
    assert "torchscript/hifigan_universal.pt" in res.output and "coreml/hifigan_universal.mlpackage" in res.output
    assert "fp16" in res.output  # the ONNX graph's weights
    again = cli("run", str(vocoder_run.parent / "r.yaml"), "--out", str(vocoder_run))
    assert again.exit_code == 0 and "target torchscript: cached" in again.output and "target coreml: cached" in again.output


def test_weight_precision_reads_the_narrowest_weights():
    from onnx import TensorProto, helper, numpy_helper

    w8 = numpy_helper.from_array(np.ones((4, 4), np.int8), "w8")
    w16 = numpy_helper.from_array(np.ones((4, 4), np.float16), "w16")
    nodes = [helper.make_node("DequantizeLinear", ["w8", "s"], ["w"], name="/a/dq"),
             helper.make_node("Cast", ["w16"], ["c"], to=TensorProto.FLOAT, name="/b/cast"),
             helper.make_node("MatMulNBits", ["x", "q", "s2"], ["y"], domain="com.microsoft", bits=4, name="/c/mm")]
    graph = helper.make_graph(nodes, "g", [], [], initializer=[w8, w16])
    model = helper.make_model(graph)
    assert weight_precision(model) == "int4"
    assert weight_precision(model, nodes[:2]) == "int8"
    assert weight_precision(model, nodes[1:2]) == "fp16"
    assert weight_precision(model, []) == "fp32"


@pytest.mark.parametrize("targets, model, message", [
    ([{"format": "gguf"}], None, "targets.0.format: family 'hifigan' cannot make 'gguf' (it makes: torchscript, coreml)"),
    ([{"format": "torchscript"}, {"format": "torchscript"}], None, "'torchscript' is listed twice"),
    ([{"format": "coreml", "params": {"frames": 10}}], None, "unknown key 'frames' (valid keys: compute_precision, "
                                                              "default_frames, deployment_target, max_frames, min_frames)"),
    ([{"format": "coreml", "params": {"min_frames": 100, "default_frames": 64}}], None, "need min_frames <= default_frames"),
])
def test_bad_targets_get_one_line(tmp_path, targets, model, message):
    res = cli("validate", str(write_recipe(tmp_path, targets, model=model)))
    assert res.exit_code == 2 and message in one_line(res.output), res.output


def test_a_voice_as_onnx_has_no_pytorch_form(tmp_path, piper_model):
    res = cli("validate", str(write_recipe(tmp_path, [{"format": "torchscript"}], model={"path": str(piper_model)})))
    assert res.exit_code == 2
    assert "family 'piper' cannot make 'torchscript' (it makes: no format beside ONNX: a Piper voice comes as ONNX" \
        in one_line(res.output)


@pytest.mark.e2e
def test_an_onnx_vocoder_file_has_no_pytorch_model_to_convert(tmp_path, vocoder_run):
    onnx_file = next((vocoder_run / "steps" / "00-base").glob("*.onnx"))
    res = cli("validate", str(write_recipe(tmp_path, [{"format": "coreml"}], model={"path": str(onnx_file)})))
    assert res.exit_code == 2
    assert "format 'coreml' is written from the family's PyTorch model, but this recipe's model is an ONNX file" \
        in one_line(res.output)


@pytest.mark.parametrize("module, fmt", [("coremltools", "coreml"), ("gguf", "gguf")])
def test_a_missing_optional_package_is_named(tmp_path, monkeypatch, module, fmt):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: find_spec answers None
    model = {"exporter": "chattts_gpt", "params": {"seed": 0}} if fmt == "gguf" else None
    res = cli("validate", str(write_recipe(tmp_path, [{"format": fmt}], model=model)))
    assert res.exit_code == 2
    assert f"needs the optional package '{module}', which is not installed: pip install " \
           f"'tts-onnx-pipeline[{fmt}]'" in one_line(res.output)


def test_a_converter_failure_names_the_op(tmp_path):
    """An op coremltools has no conversion for: the one line names it (not a traceback)."""
    from pipeline.formats.torch import coreml_convert, trace

    class Unconvertible(torch.nn.Module):
        def forward(self, x):
            return torch.erfinv(torch.tanh(x) * 0.5)

    def write(job):
        traced = trace(Unconvertible(), torch.randn(1, 4, 16), "format 'coreml'")
        coreml_convert(traced, "x", (1, 4), (8, 64, 16), "y", True, "iOS16")

    job = TargetJob(NoParams(), NoParams(), Path, None, tmp_path)
    with pytest.raises(PipelineError, match=r"format 'coreml': op 'erfinv' failed to convert: .*erfinv"):
        write_target(PlannedTarget(0, Target("coreml", NoParams, write), NoParams()), job)


def test_a_converter_library_error_becomes_one_line(tmp_path):
    def write(job):
        raise RuntimeError("unsupported\ntensor layout at node 'x'")

    job = TargetJob(NoParams(), NoParams(), Path, None, tmp_path)
    with pytest.raises(PipelineError) as e:
        write_target(PlannedTarget(0, Target("torchscript", NoParams, write), NoParams()), job)
    assert str(e.value) == "format 'torchscript': the converter failed: unsupported tensor layout at node 'x'"
