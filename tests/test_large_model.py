"""Models too large for one ONNX proto (over 2 GB with their external data) through every stage.

The fast tests lower `onnx_io.LARGE_BYTES` so a model of kilobytes takes the same path a 2.4 GB one does (its
weights left in their files, read from there); the end-to-end test builds a real 2.4 GB model and runs the CLI on it
in a child process, measuring that process's peak RSS.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pipeline.core import onnx_io
from pipeline.core.errors import PipelineError
from pipeline.core.onnx_io import external_files, is_light, load_onnx, save_onnx, session, stage_model
from pipeline.core.recipe import load_recipe
from pipeline.engine.plan import plan_recipe
from pipeline.search.run import run_recipe

def matmul_chain(folder: Path, n: int, layers: int, name: str = "big.onnx", seed: int = 0) -> Path:
    """x [batch, n] -> `layers` x (MatMul by an n x n weight, Add bias, Relu) under /layers.i, its weights written
    straight into `<name>.data` one layer at a time (never the whole model in memory), page-aligned."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data, nodes, inits, x = f"{name}.data", [], [], "x"
    with open(folder / data, "wb") as f:
        for i in range(layers):
            w = rng.standard_normal((n, n), dtype=np.float32) * np.float32(np.sqrt(2.0 / n))
            f.seek(-f.tell() % 4096, os.SEEK_CUR)
            offset = f.tell()
            f.write(w.tobytes())
            weight = TensorProto(name=f"layers.{i}.weight", data_type=TensorProto.FLOAT, dims=[n, n],
                                 data_location=TensorProto.EXTERNAL)
            for k, v in (("location", data), ("offset", str(offset)), ("length", str(w.nbytes))):
                weight.external_data.add(key=k, value=v)
            bias = helper.make_tensor(f"layers.{i}.bias", TensorProto.FLOAT, [n],
                                      (rng.standard_normal(n) * 0.01).astype(np.float32).tobytes(), raw=True)
            inits += [weight, bias]
            s = f"/layers.{i}"
            nodes += [helper.make_node("MatMul", [x, weight.name], [f"{s}/MatMul_output_0"], name=f"{s}/MatMul"),
                      helper.make_node("Add", [f"{s}/MatMul_output_0", bias.name], [f"{s}/Add_output_0"],
                                       name=f"{s}/Add"),
                      helper.make_node("Relu", [f"{s}/Add_output_0"], [f"{s}/Relu_output_0"], name=f"{s}/Relu")]
            x = f"{s}/Relu_output_0"
            del w
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 9
    onnx.save(model, str(folder / name))
    return folder / name


def write_feeds(folder: Path, n: int, count: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        x = np.random.default_rng(100 + i).standard_normal((1, n)).astype(np.float32)
        np.savez(folder / f"sample_{i}.npz", x=x)
    return folder


RECIPE = """
name: large
model: {{path: {model}}}
calibration: {{source: npz, params: {{folder: {feeds}}}}}
steps:
  - pass: simplify
  - pass: fp16
    scope: {{include: ['/layers\\.0']}}
  - pass: quantize
    params: {{mode: static, op_types: [MatMul], expect_min_nodes: 2}}
    scope: {{include: ['/layers\\.[12]']}}
  - pass: compress_weights
    params: {{dtype: int8, expect_min_tensors: 2}}
    scope: {{include: ['/layers\\.[34]']}}
check: {{samples: 2}}
"""


def fingerprint(paths: list[Path]) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in paths}


def run_output(path: Path, x: np.ndarray) -> np.ndarray:
    return session(path, weights_dir=path.parent).run(None, {"x": x})[0]  # (weights mapped, not repacked)


# -- fast: the light path on a small model -----------------------------------------------------------------------

@pytest.fixture
def small_limit(monkeypatch):
    """Models of 20 kB and more count as large: the path a model over 2 GB takes, in a second."""
    monkeypatch.setattr(onnx_io, "LARGE_BYTES", 20_000)


def test_a_proto_of_any_size_gets_a_session(tmp_path):
    """Over its limit, a proto holding its weights goes through a file with external data; same outputs."""
    path = matmul_chain(tmp_path / "m", n=32, layers=3)
    model = onnx.load(str(path))  # the weights in the proto
    x = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    want = session(model).run(None, {"x": x})[0]
    big = session(model, inline_limit=1024)
    assert big._pipeline_scratch is not None  # went through a file
    np.testing.assert_array_equal(big.run(None, {"x": x})[0], want)
    light = onnx.load(str(path), load_external_data=False)  # weights left in their file, plus a bias held inline
    light.graph.initializer[1].raw_data = np.ones(32, np.float32).tobytes()
    mixed = session(light, inline_limit=64, weights_dir=path.parent).run(None, {"x": x})[0]
    assert mixed.shape == want.shape and not np.array_equal(mixed, want)  # the changed bias counts


def test_saving_a_light_model_copies_its_weights_and_leaves_the_source(tmp_path):
    path = matmul_chain(tmp_path / "src", n=32, layers=3)
    before = fingerprint([path, *external_files(path)])
    light = onnx.load(str(path), load_external_data=False)
    (tmp_path / "out").mkdir()
    save_onnx(light, tmp_path / "out" / "m.onnx", weights_dir=path.parent)
    assert external_files(tmp_path / "out" / "m.onnx") == [tmp_path / "out" / "m.onnx.data"]
    x = np.ones((1, 32), np.float32)
    np.testing.assert_array_equal(run_output(tmp_path / "out" / "m.onnx", x), run_output(path, x))
    staged = stage_model(light, path.parent, tmp_path / "out", "staged.onnx")  # links, copies nothing
    assert (tmp_path / "out" / "big.onnx.data").stat().st_ino == external_files(path)[0].stat().st_ino
    np.testing.assert_array_equal(run_output(staged, x), run_output(path, x))
    assert fingerprint([path, *external_files(path)]) == before


def test_load_hands_a_large_model_over_light(tmp_path, small_limit):
    path = matmul_chain(tmp_path, n=64, layers=2)
    model = load_onnx(path)
    assert is_light(model) and model.ByteSize() < 10_000
    (tmp_path / "big.onnx.data").rename(tmp_path / "gone")
    with pytest.raises(PipelineError, match="weights file big.onnx.data is missing"):
        load_onnx(path)


def test_every_stage_runs_on_a_light_model(tmp_path, small_limit):
    """simplify, fp16, static quantize, compress_weights, final/ and the check, with the weights never in a proto."""
    model = matmul_chain(tmp_path / "user", n=64, layers=6)
    inputs = [model, *external_files(model)]
    before = fingerprint(inputs)
    feeds = write_feeds(tmp_path / "feeds", 64)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, feeds=feeds))
    result = run_recipe(plan_recipe(load_recipe(recipe)), tmp_path / "run", log=lambda m: None)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    stats = {s["pass"]: s.get("stats", {}).get("model", {}) for s in manifest["steps"]}
    assert stats["simplify"]["via"] == "files (model over 2 GB)"
    assert stats["fp16"]["weights_converted_from_files"] == 1
    assert stats["quantize"]["nodes_quantized"] == 2 and stats["compress_weights"]["tensors"] == 2
    for step in (tmp_path / "run" / "steps").iterdir():  # every step kept its weights in external data
        assert external_files(step / "big.onnx"), step.name
    final = tmp_path / "run" / "final" / "big.onnx"
    assert external_files(final) == [final.parent / "big.onnx.data"]
    x = np.load(feeds / "sample_0.npz")["x"]
    want, got = run_output(model, x), run_output(final, x)
    assert np.linalg.norm(want - got) / np.linalg.norm(want) < 0.05
    assert result.report is not None and result.report.samples == 2
    assert fingerprint(inputs) == before
    assert not (tmp_path / "run" / "tmp").exists()


def test_a_pass_that_needs_the_model_in_memory_fails_before_any_work(tmp_path, small_limit):
    model = matmul_chain(tmp_path / "user", n=64, layers=2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: large\nmodel: {{path: {model}}}\nsteps:\n  - pass: fuse_matmuls\n")
    with pytest.raises(PipelineError, match=r"steps.0 \(fuse_matmuls\): the model is too large for one ONNX "
                                            r"proto.*protobuf caps a model at 2 GB") as e:
        plan_recipe(load_recipe(recipe))
    assert "\n" not in str(e.value)
    # After a step that may shrink it, the check waits until the step runs, and says the same there.
    recipe.write_text(f"name: large\nmodel: {{path: {model}}}\nsteps:\n"
                      f"  - pass: compress_weights\n    params: {{dtype: fp16, min_elements: 1000000}}\n"
                      f"  - pass: fuse_matmuls\n")
    plan = plan_recipe(load_recipe(recipe))
    with pytest.raises(PipelineError, match=r"step 02 fuse_matmuls: graph 'model' is too large for one ONNX proto"):
        run_recipe(plan, tmp_path / "run", log=lambda m: None)


def test_weight_only_and_dynamic_quantize_a_light_model(tmp_path, small_limit):
    model = matmul_chain(tmp_path / "user", n=64, layers=3)
    x = np.random.default_rng(3).standard_normal((1, 64)).astype(np.float32)
    for mode in ("dynamic", "weight_only"):
        recipe = tmp_path / f"{mode}.yaml"
        recipe.write_text(f"name: large\nmodel: {{path: {model}}}\nsteps:\n  - pass: quantize\n"
                          f"    params: {{mode: {mode}, op_types: [MatMul], block_size: 32, expect_min_nodes: 3}}\n")
        run_recipe(plan_recipe(load_recipe(recipe)), tmp_path / mode, log=lambda m: None)
        got = run_output(tmp_path / mode / "final" / "big.onnx", x)
        want = run_output(model, x)
        assert np.linalg.norm(want - got) / np.linalg.norm(want) < 0.05, mode


# -- end to end (e2e): a real model over 2 GB, through the CLI ------------------------------------------------

def _cli(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """The CLI in a child process; returns it (output as text) and that child's own peak RSS in bytes.

    `os.wait4` gives the rusage of that one child: RUSAGE_CHILDREN would be the largest of every child this
    pytest worker ever waited for, so a bigger child of an earlier test would hide this one's."""
    env = dict(os.environ, COLUMNS="200", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=out, stderr=err, cwd=cwd,
                                 env=env)
        timer = threading.Timer(3600, child.kill)  # a hung run fails the test instead of holding CI
        timer.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        finally:
            timer.cancel()
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        proc = subprocess.CompletedProcess(child.args, child.returncode, out.read().decode(), err.read().decode())
    return proc, usage.ru_maxrss * 1024


@pytest.fixture
def big_folder(tmp_path):
    """tmp_path, emptied after the test whatever happens: it holds about 15 GB."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.e2e
@pytest.mark.alone  # about 15 GB on disk: beside the other end-to-end tests the disk can run out
def test_a_model_over_2_gb_runs_end_to_end_under_3x_its_size_in_memory(big_folder):
    tmp_path = big_folder
    n, layers = 6144, 16  # 16 weights of 151 MB: 2.42 GB
    model = matmul_chain(tmp_path / "user", n=n, layers=layers)
    inputs = [model, *external_files(model)]
    size = sum(p.stat().st_size for p in inputs)
    assert size > 2 * 1024**3
    before = fingerprint(inputs)
    feeds = write_feeds(tmp_path / "feeds", n)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, feeds=feeds))

    shown, _ = _cli("inspect", str(model), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert f"{3 * layers} nodes" in shown.stdout and "/layers.15" in shown.stdout

    t0 = time.perf_counter()
    proc, peak = _cli("run", str(recipe), "--out", str(tmp_path / "run"), cwd=tmp_path)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"model {size / 1e9:.2f} GB; pipeline run peak RSS {peak / 1e9:.2f} GB ({peak / size:.2f}x); {wall:.0f} s")
    assert peak < 3 * size

    final = tmp_path / "run" / "final" / "big.onnx"
    assert external_files(final) == [final.parent / "big.onnx.data"]
    x = np.load(feeds / "sample_0.npz")["x"]
    want, got = run_output(model, x), run_output(final, x)
    assert np.linalg.norm(want - got) / np.linalg.norm(want) < 0.05
    steps = json.loads((tmp_path / "run" / "manifest.json").read_text())["steps"]
    assert steps[1]["stats"]["model"]["via"] == "files (model over 2 GB)"  # onnxsim, file to file
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["samples"] == 2
    assert fingerprint(inputs) == before


def test_quantize_stages_the_weights_of_a_heavy_model_in_memory_and_gives_what_ort_gives(tmp_path):
    """A model held in memory with HEAVY_BYTES of weights or more goes to ORT's dynamic and static quantizers light,
    its weights written once to the scratch folder (ORT holds a model 3-4 times over otherwise: 3 GB over a 325 MB
    Kokoro). The result is what ORT's own quantizers make of the model's file."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_dynamic, quantize_static

    from passes import get_pass
    from passes.base import PassContext
    from pipeline.core.blocks import BlockPartition

    path = matmul_chain(tmp_path / "user", n=1100, layers=4)  # 19 MB of weights: over HEAVY_BYTES
    model = load_onnx(path)
    assert not is_light(model) and onnx_io.inline_bytes(model) >= onnx_io.HEAVY_BYTES
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 1100)).astype(np.float32)} for i in range(3)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.left = iter(feeds)

        def get_next(self):
            return next(self.left, None)

    quantize = get_pass("quantize")
    for mode in ("dynamic", "static"):
        work = tmp_path / mode
        work.mkdir()
        params = quantize.Params.model_validate({"mode": mode, "op_types": ["MatMul"], "per_channel": True})
        ctx = PassContext("model", BlockPartition(model), None, work, calibration=lambda: iter(feeds))
        result = quantize.apply(model, params, ctx)
        assert result.stats["weights_staged"] is True and result.stats["nodes_quantized"] == 4
        assert not is_light(result.model)  # every weight back in the proto: the scratch folder goes
        want = tmp_path / f"{mode}.ort.onnx"
        common = dict(op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8)
        if mode == "dynamic":
            quantize_dynamic(path, want, **common)
        else:
            quantize_static(path, want, Reader(), activation_type=QuantType.QUInt8,
                            extra_options={"ActivationSymmetric": False}, **common)
        expected = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(want)).graph.initializer}
        got = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
        assert got.keys() == expected.keys(), mode
        for name, value in got.items():  # integer weights bit for bit; activation ranges to float rounding
            if value.dtype.kind in "iu":  # (its calibration session maps the weights, unpacked: ulp-level sums)
                assert np.array_equal(value, expected[name]), (mode, name)
            else:
                np.testing.assert_allclose(value, expected[name], rtol=1e-6, err_msg=f"{mode} {name}")
