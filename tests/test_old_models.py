"""Old ONNX models (low opset, IR 3) get one clear "too old" line naming the recipe step and the file, never an
invalid graph: every pass declares the oldest model its output is valid for (`Pass.min_opset_for`,
`Pass.takes_weights_as_inputs`), and the runner refuses older ones at plan time and when a step runs."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny
import yaml
from conftest import cli, one_line, sha256, tree
from onnx import TensorProto, helper, numpy_helper

from passes import PASSES, get_pass
from passes.base import PassContext
from pipeline.core.blocks import BlockPartition
from pipeline.core.errors import PipelineError
from pipeline.core.onnx_io import check_loads

RECIPE = """name: old
model: {{path: {model}}}
calibration: {{source: npz, params: {{folder: {feeds}}}}}
steps:
{steps}"""

# One step of each pass (quantize in each of its modes), as recipe YAML.
STEPS = {
    "simplify": "{pass: simplify}",
    "dequantize": "{pass: dequantize}",
    "fp16": "{pass: fp16}",
    "compress_weights int8": "{pass: compress_weights, params: {dtype: int8, min_elements: 16}}",
    "compress_weights fp16": "{pass: compress_weights, params: {dtype: fp16, min_elements: 16}}",
    "quantize dynamic": "{pass: quantize, params: {mode: dynamic}}",
    "quantize static qdq per-channel": "{pass: quantize, params: {mode: static}}",
    "quantize static qdq per-tensor": "{pass: quantize, params: {mode: static, per_channel: false}}",
    "quantize static qoperator": "{pass: quantize, params: {mode: static, format: qoperator}}",
    "quantize weight_only rtn": "{pass: quantize, params: {mode: weight_only, block_size: 32}}",
    "quantize weight_only hqq": "{pass: quantize, params: {mode: weight_only, method: hqq, bits: 4, block_size: 32}}",
    "quantize weight_only gptq": "{pass: quantize, params: {mode: weight_only, method: gptq, bits: 4, block_size: 16}}",
    "fuse_matmuls": "{pass: fuse_matmuls}",
    "convtranspose_to_conv": "{pass: convtranspose_to_conv}",
    "fuse_attention": "{pass: fuse_attention}",
    "split": "{pass: split}",
    "pin": "{pass: pin, params: {tensors: [/enc_p/Relu_output_0]}}",
}


def old_net(opset: int = 7, ir: int = 3) -> onnx.ModelProto:
    """x [1, 4, T] -> /enc_p Conv+Relu -> Transpose -> /flow q and k MatMuls (siblings) -> Add -> /dec MatMul -> y.

    Ops every opset from 7 on defines alike; named so split finds a flow and a generator. Below IR 4 the weights are
    also graph inputs, as the IR requires."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
             for name, shape in [("conv.weight", (64, 4, 3)), ("conv.bias", (64,)), ("q.weight", (64, 64)),
                                 ("k.weight", (64, 64)), ("proj.weight", (64, 64))]]
    node = helper.make_node
    nodes = [node("Conv", ["x", "conv.weight", "conv.bias"], ["/enc_p/conv/Conv_output_0"], name="/enc_p/conv/Conv",
                  pads=[1, 1]),
             node("Relu", ["/enc_p/conv/Conv_output_0"], ["/enc_p/Relu_output_0"], name="/enc_p/Relu"),
             node("Transpose", ["/enc_p/Relu_output_0"], ["h"], name="/enc_p/Transpose", perm=[0, 2, 1]),
             node("MatMul", ["h", "q.weight"], ["q"], name="/flow/flows.0/q/MatMul"),
             node("MatMul", ["h", "k.weight"], ["k"], name="/flow/flows.0/k/MatMul"),
             node("Add", ["q", "k"], ["/flow/flows.0/Add_output_0"], name="/flow/flows.0/Add"),
             node("MatMul", ["/flow/flows.0/Add_output_0", "proj.weight"], ["y"], name="/dec/proj/MatMul")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, "T"])]
    if ir < 4:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "old", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                   [1, "T", 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
    onnx.checker.check_model(model, full_check=True)
    return model


def write_recipe(tmp_path: Path, model: Path, *steps: str) -> Path:
    feeds = tiny.write_npz_feeds(tmp_path / "feeds", count=3)
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(model=model, feeds=feeds, steps="".join(f"  - {s}\n" for s in steps)))
    return path


WEIGHTS = {"conv.weight", "conv.bias", "q.weight", "k.weight", "proj.weight"}


def assert_valid(folder: Path) -> None:
    """Every graph in `folder` passes the full ONNX check, loads in ONNX Runtime, and wants no weight fed: a pass
    that drops a weight listed as a graph input leaves an input both of them accept."""
    graphs = sorted(folder.glob("*.onnx"))
    assert graphs
    for path in graphs:
        onnx.checker.check_model(str(path), full_check=True)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert not WEIGHTS & {i.name for i in session.get_inputs()}, path


def test_the_reported_model_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    """The report: an IR 3 / opset 7 model made compress_weights write an invalid graph."""
    model = tiny.save(old_net(7, 3), tmp_path / "models" / "old.onnx")
    recipe = write_recipe(tmp_path, model, STEPS["compress_weights int8"])
    before, digest = tree(tmp_path), sha256(model)
    res = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert res.exit_code == 2, res.output
    line = one_line(res.stderr)
    assert f"{recipe}: steps.0 (compress_weights): {model} is too old for pass 'compress_weights': IR 3 with its " \
           f"weights among the graph inputs, needs IR >= 4 with them apart" in line
    assert "Traceback" not in res.output
    assert sha256(model) == digest
    assert {p for p in tree(tmp_path) - before if not p.startswith("run")} == set()


def test_the_suggested_upgrade_makes_the_recipe_run(tmp_path):
    model = tiny.save(old_net(7, 3), tmp_path / "models" / "old.onnx")
    recipe = write_recipe(tmp_path, model, STEPS["fuse_matmuls"])
    line = one_line(cli("validate", str(recipe)).stderr)
    assert "is too old for pass 'fuse_matmuls': opset 7, needs >= 13; IR 3 with its weights among the graph " \
           "inputs" in line
    command = re.search(r'python -c "(.*)"\)$', line).group(1)
    subprocess.run([sys.executable, "-c", command], check=True)
    upgraded = model.with_suffix(".opset13.onnx")
    recipe = write_recipe(tmp_path, upgraded, STEPS["fuse_matmuls"])
    res = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert res.exit_code == 0, res.output
    assert_valid(tmp_path / "run" / "final")


@pytest.mark.parametrize("ir", [3, 4])
@pytest.mark.parametrize("step", list(STEPS))
def test_every_pass_at_opset_7_writes_a_valid_graph_or_refuses_in_one_line(tmp_path, step, ir):
    model = tiny.save(old_net(7, ir), tmp_path / "models" / "old.onnx")
    recipe = write_recipe(tmp_path, model, STEPS[step])
    pass_name = step.split()[0]
    res = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    if res.exit_code == 0:
        assert_valid(tmp_path / "run" / "final")
    else:
        assert res.exit_code == 2, res.output
        line = one_line(res.stderr)
        assert f"steps.0 ({pass_name}): {model} is too old for pass '{pass_name}': " in line, line
    # Refused exactly where the pass declares it: at IR 3 all but simplify (which rewrites the layout), at IR 4
    # the passes whose output needs opset 13.
    declared = {"fuse_matmuls", "quantize static qdq per-channel"}
    assert (res.exit_code == 2) == ((ir == 3 and pass_name != "simplify") or (ir == 4 and step in declared))


def test_a_step_after_an_upgrading_one_is_checked_when_it_runs(tmp_path):
    """quantize raises opset 7 to 11 (ONNX Runtime's converter), still short of fuse_matmuls' 13: the plan lets it
    through, the step refuses it naming the file it would have read."""
    model = tiny.save(old_net(7, 4), tmp_path / "models" / "old.onnx")
    recipe = write_recipe(tmp_path, model, STEPS["quantize dynamic"], STEPS["fuse_matmuls"])
    res = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert res.exit_code == 2, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]  # (after the step log)
    steps = tmp_path / "run" / "steps"
    assert len(errors) == 1 and "Traceback" not in res.output
    assert f"steps.1 (fuse_matmuls): {steps / '01-quantize' / 'old.onnx'} is too old for pass 'fuse_matmuls': " \
           f"opset 11, needs >= 13 (" in errors[0]
    assert not (steps / "02-fuse_matmuls").exists()


def test_simplify_first_takes_an_ir_3_model(tmp_path):
    """onnxsim writes IR 4 without weight inputs, so the steps after it run on what it wrote."""
    model = tiny.save(old_net(7, 3), tmp_path / "models" / "old.onnx")
    recipe = write_recipe(tmp_path, model, STEPS["simplify"], STEPS["compress_weights int8"])
    res = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert res.exit_code == 0, res.output
    assert_valid(tmp_path / "run" / "final")


@pytest.mark.parametrize("step", ["fuse_matmuls", "quantize static qdq per-channel"])
def test_one_opset_below_the_declared_floor_the_pass_writes_an_invalid_graph(tmp_path, step):
    """The floor is measured, not cautious: run without the runner's check, the pass writes what check_loads
    (onnx.checker) refuses."""
    name, params = pass_and_params(step)
    pass_ = get_pass(name)
    below = pass_.min_opset_for(params) - 1
    model = old_net(below, 7)
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 4, 16)).astype(np.float32)} for i in range(2)]
    ctx = PassContext("model", BlockPartition(model), None, tmp_path, calibration=lambda: iter(feeds))
    result = pass_.apply(model, params, ctx)
    path = tiny.save(result.model, tmp_path / "out.onnx")
    with pytest.raises(PipelineError, match="fails the ONNX checker"):
        check_loads(path, step)


def test_a_current_model_is_never_refused():
    model = tiny.conv_net()
    for step in STEPS:
        name, params = pass_and_params(step)
        assert get_pass(name).opset_problem(model, params) is None, step
    shipped = {name for name, cls in PASSES.items() if cls.__module__.startswith("passes.")}
    assert {s.split()[0] for s in STEPS} == shipped  # every pass that ships is covered here


def pass_and_params(step: str):
    spec = yaml.safe_load(STEPS[step])
    pass_ = get_pass(spec["pass"])
    return spec["pass"], pass_.Params.model_validate(spec.get("params", {}))
