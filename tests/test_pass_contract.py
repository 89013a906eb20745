"""The contract every registered pass keeps, checked on tiny models built here.

For each pass in `passes.PASSES` (a new pass is covered as soon as it is registered, and
fails here until it has an entry in CASES):
- its input model is left as it was (passes copy before they edit);
- a scoped pass given one block changes that block and leaves every other node as it was
  (same op type and attributes, same initializer values); a pass that cannot do that
  declares `scoped = False`, and the runner then refuses a block scope for it;
- it reports stats: a plain dict that survives JSON as it is (the step manifest is JSON);
  a pass that changes precision reports `blocks_changed` ({block: count}), which the
  automatic fallback reads, and only for the block it was given;
- its `Params` rejects unknown keys and describes every parameter;
- the README's pass table is the one the registry generates.

The checks are functions, and the last tests feed them broken passes: each check can fail.
"""
from __future__ import annotations

import functools
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import tiny
from conftest import REPO
from onnx import TensorProto, helper, numpy_helper
from pass_checks import Applied, check_input_unchanged, check_scope, check_stats
from pydantic import Field, ValidationError

from passes import PASSES, markdown_table
from passes.base import Params, Pass, PassContext, PassResult
from pipeline.core.onnx_io import copy_model
from pipeline.core.feeds import Feeds
from pipeline.core.blocks import BlockPartition
from pipeline.core.recipe import Scope

# --- tiny models --------------------------------------------------------------------------------------------


def conv_net() -> onnx.ModelProto:
    """x [1, 4, T] -> /enc/layers.{0,1,2} Conv+Relu -> /dec -> y: blocks with their own weights."""
    return tiny.conv_net(seed=0, channels=8, layers=3)


def conv_feeds(n: int = 4, seed: int = 3) -> list[Feeds]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 4, 16 + 8 * (i % 2))).astype(np.float32)} for i in range(n)]


def matmul_net(layers: int = 3, hidden: int = 32) -> onnx.ModelProto:
    """x [1, T, 32] -> /enc/layers.N MatMul+Relu -> y: weights for MatMulNBits (weight_only quantize)."""
    rng = np.random.default_rng(5)
    nodes, inits, current = [], [], "x"
    for i in range(layers):
        scope = f"/enc/layers.{i}"
        w = f"enc.layers.{i}.weight"
        inits.append(numpy_helper.from_array((rng.standard_normal((hidden, hidden)) * 0.2).astype(np.float32), w))
        nodes.append(helper.make_node("MatMul", [current, w], [f"{scope}/MatMul_output_0"], name=f"{scope}/MatMul"))
        nodes.append(helper.make_node("Relu", [f"{scope}/MatMul_output_0"], [f"{scope}/Relu_output_0"],
                                      name=f"{scope}/Relu"))
        current = f"{scope}/Relu_output_0"
    nodes.append(helper.make_node("Identity", [current], ["y"], name="/out/Identity"))
    graph = helper.make_graph(nodes, "tiny_matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def vits_net() -> onnx.ModelProto:
    """A single-speaker VITS-shaped toy: ids -> (z, y_mask) -> /flow/ -> /dec/ -> audio, for split."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
             [("emb_p", (10, 4)), ("flow_w", (4, 4, 3)), ("dec_w", (1, 4, 1))]]
    node = helper.make_node
    nodes = [
        node("Gather", ["emb_p", "input"], ["/enc_p/emb_out"], name="/enc_p/emb/Gather"),
        node("Transpose", ["/enc_p/emb_out"], ["/enc_p/x"], name="/enc_p/Transpose", perm=[0, 2, 1]),
        node("ReduceMean", ["/enc_p/x"], ["/mask_raw"], name="/ReduceMean", axes=[1]),
        node("Sigmoid", ["/mask_raw"], ["/y_mask"], name="/Sigmoid"),
        node("Mul", ["/enc_p/x", "/y_mask"], ["/z"], name="/Mul"),
        node("Mul", ["/z", "/y_mask"], ["/flow/m"], name="/flow/flows.0/Mul"),
        node("Conv", ["/flow/m", "flow_w"], ["/flow/c"], name="/flow/flows.0/Conv", pads=[1, 1]),
        node("Conv", ["/flow/c", "dec_w"], ["output"], name="/dec/conv_post/Conv"),
    ]
    graph = helper.make_graph(nodes, "toy_vits",
                              [helper.make_tensor_value_info("input", TensorProto.INT64, [1, "phonemes"])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, "phonemes"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@functools.cache
def _attention_layer_bytes() -> bytes:
    import torch

    from pipeline.families.chattts.layers import DecoderLayer

    torch.manual_seed(0)
    layer = DecoderLayer(64, 128, 4, 1e-6, 10000.0).eval()
    seq, cache = {0: "batch", 1: "seq"}, {0: "batch", 2: "past"}
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(layer, (torch.randn(1, 3, 64), torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16)), buf,
                          input_names=["hidden", "past_key", "past_value"],
                          output_names=["hidden_out", "present_key", "present_value"],
                          dynamic_axes={"hidden": seq, "past_key": cache, "past_value": cache, "hidden_out": seq,
                                        "present_key": {0: "batch", 2: "total"},
                                        "present_value": {0: "batch", 2: "total"}},
                          opset_version=17, dynamo=False)
    return buf.getvalue()


def attention_layer() -> onnx.ModelProto:
    """One small Llama decoder layer (ChatTTS's), exported from PyTorch, with past/present KV."""
    return onnx.load_from_string(_attention_layer_bytes())


def dynamic_conv_net() -> onnx.ModelProto:
    """conv_net quantized by ORT's quantize_dynamic (ConvInteger), its new nodes placed as the runner places them."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import quantize_dynamic

    from pipeline.core.blocks import adopt_new_nodes

    model = conv_net()
    with tempfile.TemporaryDirectory() as tmp:
        quantize_dynamic(model, Path(tmp) / "q.onnx")
        quantized = onnx.load(Path(tmp) / "q.onnx")
    adopt_new_nodes(quantized, {n.name for n in model.graph.node}, None)
    return quantized


# --- one tiny fixture (or a few) per pass: a new pass adds its own ------------------------------------------

@dataclass
class Case:
    model: Callable[[], onnx.ModelProto]
    params: dict
    # The one block a scoped pass is given (a block id of `model`); whole-graph passes get no scope.
    block: str | None = None
    # Seeded feeds for PassContext.calibration; required when the pass wants calibration data.
    feeds: Callable[[], list[Feeds]] | None = None
    # A known scope bug: the scope and stats checks are strict xfails (they fail once it is fixed: drop this then).
    scope_bug: str | None = None


CASES: dict[str, list[Case]] = {
    "dequantize": [Case(dynamic_conv_net, {"expect_min_nodes": 1}, block="/enc/layers.1")],
    "simplify": [Case(conv_net, {})],
    "fuse_attention": [Case(attention_layer, {"expect": {"MultiHeadAttention": 1, "RotaryEmbedding": 2}}),
                       Case(attention_layer, {"kv_cache": "in_place", "expect": {"GroupQueryAttention": 1}})],
    "fuse_matmuls": [Case(attention_layer, {"expect_min_groups": 1}, block="/mlp")],
    "convtranspose_to_conv": [Case(tiny.two_upsamplers, {"expect_min_nodes": 1}, block="/dec/ups.1")],
    "fp16": [Case(conv_net, {}, block="/enc/layers.1", feeds=conv_feeds)],
    "quantize": [Case(conv_net, {"mode": "dynamic"}, block="/enc/layers.1"),
                 Case(conv_net, {"mode": "static", "op_types": ["Conv"]}, block="/enc/layers.1", feeds=conv_feeds),
                 Case(matmul_net, {"mode": "weight_only", "block_size": 16}, block="/enc/layers.1")],
    "compress_weights": [Case(conv_net, {"dtype": "int8", "min_elements": 8}, block="/enc/layers.1"),
                         Case(conv_net, {"dtype": "fp16", "min_elements": 8}, block="/enc/layers.1")],
    "split": [Case(vits_net, {})],
    "pin": [Case(conv_net, {"tensors": ["/enc/layers.1/Relu_output_0"]})],
}


def _case_params(scope_checks: bool = False) -> list:
    params = []
    for name in PASSES:
        for i, case in enumerate(CASES.get(name) or [None]):
            bug = case.scope_bug if case is not None and scope_checks else None
            marks = [pytest.mark.xfail(reason=bug, strict=True, raises=AssertionError)] if bug else []
            params.append(pytest.param(name, case, id=f"{name}-{i}", marks=marks))
    return params


def apply_case(name: str, case: Case | None, tmp_path) -> Applied:
    if case is None:
        pytest.fail(f"pass {name!r} has no entry in CASES of tests/test_pass_contract.py: add a tiny model "
                    f"(and params, feeds) it can run on")
    cls = PASSES[name]
    p = cls()
    params = p.Params.model_validate(case.params)
    if p.wants_calibration(params):
        assert case.feeds is not None, f"{name} {case.params} uses calibration data: give its case seeded feeds"
    if cls.scoped:
        assert case.block is not None, f"{name} is scoped: give its case the one block to scope it to"
    model = case.model()
    blocks = BlockPartition(model)
    selected = blocks.select(Scope(include=[re.escape(case.block)])) if cls.scoped else None
    feeds = case.feeds() if case.feeds else None
    ctx = PassContext("model", blocks, selected, tmp_path,
                      calibration=(lambda: iter(feeds)) if feeds is not None else None)
    before = model.SerializeToString()
    return Applied(cls, model, before, p.apply(model, params, ctx), selected)


# --- the checks (those on one pass's result: tests/pass_checks.py) ------------------------------------------

def check_params(cls: type[Pass]) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        cls.Params.model_validate({"no_such_key": 1})
    undescribed = [k for k, f in cls.Params.model_fields.items() if not (f.description or "").strip()]
    assert not undescribed, f"{cls.name}: give these params a Field(description=...): {undescribed}"


def readme_table(text: str) -> str:
    begin, end = "<!-- passes:begin -->\n", "<!-- passes:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1, "README.md needs one passes:begin/end marker pair"
    return text.split(begin, 1)[1].split(end, 1)[0]


def check_readme(text: str) -> None:
    assert readme_table(text) == markdown_table(), (
        "README.md's pass table is out of date with the pass registry: run `pipeline passes --markdown` and "
        "paste its output between <!-- passes:begin --> and <!-- passes:end -->")


# --- the contract, pass by pass ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def applied(tmp_path_factory):
    cache: dict[tuple[str, int], Applied] = {}

    def get(name: str, case: Case | None) -> Applied:
        key = (name, id(case))
        if key not in cache:
            cache[key] = apply_case(name, case, tmp_path_factory.mktemp(name))
        return cache[key]

    return get


def test_every_registered_pass_has_a_case():
    missing = sorted(set(PASSES) - set(CASES))
    assert not missing, f"add a tiny model and params for {missing} to CASES in tests/test_pass_contract.py"
    stale = sorted(set(CASES) - set(PASSES))
    assert not stale, f"CASES names passes that are not registered: {stale}"
    assert all(CASES[name] for name in PASSES), "every pass needs at least one case"


@pytest.mark.parametrize("name, case", _case_params())
def test_leaves_its_input_model_unchanged(applied, name, case):
    check_input_unchanged(applied(name, case))


@pytest.mark.parametrize("name, case", _case_params(scope_checks=True))
def test_respects_its_scope(applied, name, case):
    check_scope(applied(name, case))


@pytest.mark.parametrize("name, case", _case_params(scope_checks=True))
def test_reports_json_stats(applied, name, case):
    check_stats(applied(name, case), case.block if case else None)


@pytest.mark.parametrize("name", list(PASSES))
def test_params_are_strict_and_described(name):
    check_params(PASSES[name])


def test_fuse_attention_case_really_fuses(applied):
    """The attention fixture is one fuse_attention matches (its `expect` would fail the pass otherwise)."""
    a = applied("fuse_attention", CASES["fuse_attention"][0])
    assert a.result.stats["fused"]["MultiHeadAttention"] == 1


def test_readme_pass_table_is_generated_from_the_registry():
    check_readme((REPO / "README.md").read_text(encoding="utf-8"))


def test_cli_prints_the_table_and_the_descriptions():
    from click.testing import CliRunner

    from pipeline.cli.main import main

    res = CliRunner().invoke(main, ["passes", "--markdown"])
    assert res.exit_code == 0 and res.output == markdown_table()
    res = CliRunner().invoke(main, ["passes"])
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    for cls in PASSES.values():
        for field in cls.Params.model_fields.values():
            assert " ".join(field.description.split()) in text


# --- the checks catch broken passes -------------------------------------------------------------------------------

class _Broken(Pass):
    """A pass that breaks the contract in the way `how` says."""

    name = "broken"
    changes_precision = True

    def __init__(self, how: str):
        self.how = how

    def apply(self, model, params, ctx):
        out = model if self.how == "in_place" else copy_model(model)
        target = {"outside": "/enc/layers.0/conv/Conv", "in_place": "/enc/layers.1/conv/Conv",
                  "attribute": "/enc/layers.2/conv/Conv"}.get(self.how, "/enc/layers.1/conv/Conv")
        if self.how != "nothing":
            node = next(n for n in out.graph.node if n.name == target)
            weight = next(t for t in out.graph.initializer if t.name == node.input[1])
            if self.how == "attribute":
                node.attribute.append(helper.make_attribute("group", 1))
            else:
                weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 2, weight.name))
        stats = {"blocks_changed": {ctx.blocks.node_block[target]: 1}}
        if self.how == "numpy_stats":
            stats = {"blocks_changed": {"/enc/layers.1": np.int64(1)}}
        elif self.how == "tuple_stats":
            stats = {"blocks_changed": {"/enc/layers.1": 1}, "shape": (1, 2)}
        elif self.how == "no_blocks_changed":
            stats = {"tensors": 1}
        return PassResult.of(ctx, out, changed=self.how != "nothing", stats=stats)


def _apply_broken(how: str, tmp_path) -> Applied:
    model = conv_net()
    blocks = BlockPartition(model)
    selected = blocks.select(Scope(include=[re.escape("/enc/layers.1")]))
    before = model.SerializeToString()
    p = _Broken(how)
    result = p.apply(model, Params(), PassContext("model", blocks, selected, tmp_path))
    return Applied(type(p), model, before, result, selected)


def test_a_well_behaved_fake_passes_the_checks(tmp_path):
    a = _apply_broken("fine", tmp_path)
    check_input_unchanged(a)
    check_scope(a)
    check_stats(a, "/enc/layers.1")


@pytest.mark.parametrize("how, check", [
    ("in_place", check_input_unchanged),
    ("outside", check_scope),
    ("attribute", check_scope),
    ("nothing", check_scope),
    ("outside", lambda a: check_stats(a, "/enc/layers.1")),
    ("numpy_stats", lambda a: check_stats(a, "/enc/layers.1")),
    ("tuple_stats", lambda a: check_stats(a, "/enc/layers.1")),
    ("no_blocks_changed", lambda a: check_stats(a, "/enc/layers.1")),
])
def test_the_checks_catch_a_broken_pass(tmp_path, how, check):
    with pytest.raises(AssertionError):
        check(_apply_broken(how, tmp_path))


def test_an_unscoped_pass_must_say_so(tmp_path):
    class Quiet(_Broken):
        scoped = True  # but it cuts graphs, which no scope survives

    a = _apply_broken("fine", tmp_path)
    a.cls = Quiet
    a.result.graphs = {"encoder": a.result.model}
    with pytest.raises(AssertionError, match="cannot honour a block scope"):
        check_scope(a)

    class Inherited(PASSES["simplify"]):  # whole graph only by inheritance: it must say so itself
        pass

    a.cls = Inherited
    with pytest.raises(AssertionError, match="declares `scoped = False`"):
        check_scope(a)


def test_params_checks_catch_missing_descriptions_and_loose_params():
    class Undescribed(Params):
        size: int = 3

    class Loose(Params):
        model_config = {"extra": "allow"}
        size: int = Field(3, description="a size")

    for params in (Undescribed, Loose):
        cls = type("P", (Pass,), {"name": "p", "Params": params})
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            check_params(cls)


def test_readme_check_catches_a_stale_table():
    table = markdown_table()
    good = f"# x\n<!-- passes:begin -->\n{table}<!-- passes:end -->\n"
    check_readme(good)
    with pytest.raises(AssertionError, match="pipeline passes --markdown"):
        check_readme(good.replace("| `simplify` |", "| `simplify2` |"))
    with pytest.raises(AssertionError, match="marker"):
        check_readme(table)


# --- the fallback reads the contract: any precision pass can be its step ----------------------------------------

def test_fallback_shrinks_a_compress_weights_step(tmp_path, tiny_feeds):
    """Not only quantize: a compress_weights step's `blocks_changed` drives the fallback's rounds."""
    import yaml
    from conftest import cli

    tiny.save(tiny.conv_net(channels=8, layers=4), tmp_path / "tiny.onnx")
    (tmp_path / "r.yaml").write_text(
        "name: tiny_cw_fallback\nmodel: {path: tiny.onnx}\ncalibration: {source: npz, params: {folder: feeds}}\n"
        "steps:\n  - {name: cw, pass: compress_weights, params: {dtype: int8, min_elements: 8}}\n"
        "check: {samples: 6, fallback: {step: cw, min_output_sqnr_db: 45, per_round: 1, max_rounds: 6}}\n")
    res = cli("run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"))
    assert res.code == 0, res.stderr
    rounds = json.loads((tmp_path / "run" / "report.json").read_text())["rounds"]
    assert rounds[0]["target_met"] is False and rounds[-1]["target_met"] is True and len(rounds) >= 2
    resolved = yaml.safe_load((tmp_path / "run" / "resolved_recipe.yaml").read_text())
    step = next(s for s in resolved["steps"] if s["pass"] == "compress_weights")
    assert len(step["scope"]["exclude"]) == len(rounds[-1]["kept"]) > 0
    assert resolved["calibration"]["params"]["folder"] == str(tmp_path / "feeds")  # a path field, made absolute
