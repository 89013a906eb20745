"""fuse_matmuls: sibling MatMuls with constant weights become one MatMul + Split, with the same numbers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes import get_pass
from passes.base import PassContext
from pipeline.core.blocks import BlockPartition
from pipeline.core.errors import PipelineError
from pipeline.core.onnx_io import session


def siblings(dtypes=(np.float32, np.float32, np.float32)) -> onnx.ModelProto:
    """x -> /attn/{q,k,v}_proj/MatMul (widths 8, 4, 4) -> Concat -> /out/MatMul -> y."""
    rng = np.random.default_rng(0)
    inits, nodes, outs = [], [], []
    for name, width, dtype in zip("qkv", (8, 4, 4), dtypes):
        w = f"{name}.weight"
        inits.append(numpy_helper.from_array(rng.standard_normal((16, width)).astype(dtype), w))
        src = "x"
        if dtype != np.float32:
            nodes.append(helper.make_node("Cast", ["x"], [f"x_{name}"], name=f"/attn/{name}_cast", to=TensorProto.FLOAT16))
            src = f"x_{name}"
        nodes.append(helper.make_node("MatMul", [src, w], [f"{name}_out"], name=f"/attn/{name}_proj/MatMul"))
        if dtype != np.float32:
            nodes.append(helper.make_node("Cast", [f"{name}_out"], [f"{name}_f"], name=f"/attn/{name}_back", to=1))
        outs.append(f"{name}_out" if dtype == np.float32 else f"{name}_f")
    nodes.append(helper.make_node("Concat", outs, ["cat"], name="/attn/Concat", axis=-1))
    inits.append(numpy_helper.from_array(rng.standard_normal((16, 3)).astype(np.float32), "o.weight"))
    nodes.append(helper.make_node("MatMul", ["cat", "o.weight"], ["y"], name="/out/MatMul"))
    graph = helper.make_graph(nodes, "siblings", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model, selected=None, **params):
    fuser = get_pass("fuse_matmuls")
    return fuser.apply(model, fuser.Params(**params), PassContext("g", BlockPartition(model), selected, Path(".")))


def test_siblings_fuse_into_one_matmul_named_for_them_with_the_same_output():
    model = siblings()
    before = model.SerializeToString()
    result = run(model, expect_min_groups=1)
    out = result.model
    assert model.SerializeToString() == before
    assert result.stats["groups"] == [{"nodes": ["/attn/q_proj/MatMul", "/attn/k_proj/MatMul", "/attn/v_proj/MatMul"],
                                       "into": "/attn/q_proj+k_proj+v_proj/MatMul"}]
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Split", "Concat", "MatMul"]
    assert {t.name for t in out.graph.initializer} == {"o.weight", "/attn/q_proj+k_proj+v_proj/MatMul.weight",
                                                       "/attn/q_proj+k_proj+v_proj/MatMul.split"}
    assert BlockPartition(out).node_block["/attn/q_proj+k_proj+v_proj/MatMul"] == \
        BlockPartition(model).node_block["/attn/q_proj/MatMul"]
    x = np.random.default_rng(1).standard_normal((1, 5, 16)).astype(np.float32)
    np.testing.assert_allclose(session(out).run(None, {"x": x})[0], session(model).run(None, {"x": x})[0], rtol=1e-5)


def test_a_group_fuses_whole_or_not_at_all_and_a_shortfall_is_named():
    model = siblings()
    result = run(model, selected={"/attn/q_proj/MatMul", "/attn/k_proj/MatMul"})
    assert not result.changed and result.stats["groups"] == []  # v_proj is outside the scope
    with pytest.raises(PipelineError, match=r"fuse_matmuls on 'g': expected at least 1 fused groups, got 0"):
        run(model, selected={"/attn/q_proj/MatMul"}, expect_min_groups=1)
    mixed = run(siblings(dtypes=(np.float32, np.float16, np.float32)))  # k reads another input: q and v fuse
    assert [g["nodes"] for g in mixed.stats["groups"]] == [["/attn/q_proj/MatMul", "/attn/v_proj/MatMul"]]
