"""fuse_attention on ChatTTS decoder layers: what fuses, that it computes the same, and loud shortfalls."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes import get_pass
from passes.attention_rules import attention_rules
from passes.base import PassContext
from pipeline.core import kv_cache
from pipeline.core.blocks import BlockPartition
from pipeline.core.errors import PipelineError
from pipeline.core.modelset import ModelSet
from pipeline.core.onnx_io import check_loads, session
from pipeline.core.rewrite import GraphView, apply_rules
from pipeline.families.chattts.exporter import GPTConfig, export_modelset, load_weights
from pipeline.families.chattts.runtime import ChatTTSRuntime

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3,
             max_position_embeddings=256, num_text_tokens=97, num_audio_tokens=211, num_vq=4)
HEADS, HEAD_DIM = 4, 16
EXPECT = {"MultiHeadAttention": 1, "RotaryEmbedding": 2, "SimplifiedLayerNormalization": 1,
          "SkipSimplifiedLayerNormalization": 1}
PER_BLOCK = {"/input_layernorm": {"SimplifiedLayerNormalization": 1},
             "/self_attn": {"RotaryEmbedding": 2, "MultiHeadAttention": 1},
             "/post_attention_layernorm": {"SkipSimplifiedLayerNormalization": 1}}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> ModelSet:
    """A small seeded ChatTTS GPT, weights sharpened so greedy decoding has clear winners."""
    w = load_weights(None, GPTConfig(**SMALL), seed=11)
    w.gpt = {k: v if "norm" in k else v * 5 for k, v in w.gpt.items()}
    w.embed = {k: v * 5 for k, v in w.embed.items()}
    return export_modelset(w, tmp_path_factory.mktemp("chattts") / "base")


def fuse(model: onnx.ModelProto, graph: str, **params):
    fuser = get_pass("fuse_attention")
    ctx = PassContext(graph, BlockPartition(model), None, Path("."))
    return fuser.apply(model, fuser.Params(**params), ctx)


def feeds(batch: int, past: int, new: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"hidden": rng.standard_normal((batch, new, SMALL["hidden_size"])).astype(np.float32),
            "past_key": rng.standard_normal((batch, HEADS, past, HEAD_DIM)).astype(np.float32),
            "past_value": rng.standard_normal((batch, HEADS, past, HEAD_DIM)).astype(np.float32)}


def sqnr_db(want: np.ndarray, got: np.ndarray) -> float:
    err = np.linalg.norm(want - got)
    return float("inf") if err == 0 else 20 * np.log10(np.linalg.norm(want) / err)


def assert_same_outputs(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
    """Prefill (P=0), decode (T=1) and a multi-token step on a cache, batch 2: every output >= 60 dB."""
    ref, cand = session(reference), session(candidate)
    for batch, past, new in [(1, 0, 9), (1, 9, 1), (2, 5, 3)]:
        feed = feeds(batch, past, new)
        for name, want, got in zip(["hidden_out", "present_key", "present_value"], ref.run(None, feed),
                                   cand.run(None, feed)):
            assert got.shape == want.shape == (batch, *want.shape[1:])
            assert sqnr_db(want, got) >= 60, (name, batch, past, new, sqnr_db(want, got))


@pytest.fixture(scope="module")
def fused(base) -> dict[str, onnx.ModelProto]:
    return {name: fuse(base.load(name), name, num_heads=HEADS, expect=EXPECT).model for name in base.meta["layers"]}


def test_every_layer_fuses_into_contrib_ops_inside_its_blocks(base):
    for name in base.meta["layers"]:
        layer = base.load(name)
        result = fuse(layer, name, num_heads=HEADS, expect=EXPECT)
        assert result.stats["fused"] == EXPECT
        assert result.stats["fused_per_block"] == PER_BLOCK
        out = result.model
        ops = [n.op_type for n in out.graph.node]
        assert "Softmax" not in ops and "Neg" not in ops and ops.count("MatMul") == 7  # what quantize takes
        assert result.stats["nodes_after"] < result.stats["nodes_before"] / 4
        blocks = BlockPartition(out)
        for node in out.graph.node:
            if node.op_type in EXPECT:  # named into the block of the nodes it replaced
                assert node.op_type in PER_BLOCK[blocks.node_block[node.name]], node.name
        mha = next(n for n in out.graph.node if n.op_type == "MultiHeadAttention")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in mha.attribute}
        assert attrs["num_heads"] == HEADS and attrs["unidirectional"] == 1 and attrs["scale"] == pytest.approx(0.25)
        assert [i.name for i in out.graph.input] == [i.name for i in layer.graph.input]
        assert [o.name for o in out.graph.output] == [o.name for o in layer.graph.output]
        check_loads(out, f"fused {name}")


def test_fused_layers_compute_what_the_unfused_ones_do(base, fused):
    for name, model in fused.items():
        assert_same_outputs(base.load(name), model)


def test_a_shortfall_fails_naming_the_block_and_the_pattern(base):
    layer = base.load("layer_01")
    with pytest.raises(PipelineError, match=r"layer_01: expected 2 MultiHeadAttention, found 1: "
                                            r"no further attention pattern in the graph"):
        fuse(layer, "layer_01", expect={"MultiHeadAttention": 2})
    with pytest.raises(PipelineError, match="unknown fused ops"):
        fuse(layer, "layer_01", expect={"FlashAttention": 1})
    # A mask that lets each token see the future is not causal: no MHA with unidirectional=1 for it.
    for node in layer.graph.node:
        if node.op_type == "Greater":
            node.op_type = "Less"
    with pytest.raises(PipelineError, match=r"layer_01: expected 1 MultiHeadAttention in /self_attn, found 0: "
                                            r"attention pattern did not match at /self_attn/Softmax: "
                                            r"the mask is not causal"):
        fuse(layer, "layer_01", expect=EXPECT)
    # What did match (the rotary on [B, H, S, D], the norms) still computes the same.
    partial = fuse(layer, "layer_01")
    assert "MultiHeadAttention" not in partial.stats["fused"]
    assert partial.stats["fused_per_block"]["/self_attn"] == {"RotaryEmbedding": 2}
    assert_same_outputs(layer, partial.model)


def test_rmsnorm_rewritten_by_onnxsim_is_named_as_the_unmatched_pattern(base):
    simplify = get_pass("simplify")
    layer = base.load("layer_00")
    simplified = simplify.apply(layer, simplify.Params(), PassContext("layer_00", BlockPartition(layer), None,
                                                                       Path("."))).model
    with pytest.raises(PipelineError, match=r"layer_00: expected 1 SkipSimplifiedLayerNormalization in "
                                            r"/post_attention_layernorm, found 0: residual Add \+ RMSNorm pattern "
                                            r"did not match at /post_attention_layernorm/ReduceMean"):
        fuse(simplified, "layer_00", expect=EXPECT)
    # The attention matcher goes by structure, not by the exporter's exact arithmetic: it still matches.
    result = fuse(simplified, "layer_00")
    assert result.stats["fused_per_block"]["/self_attn"] == {"RotaryEmbedding": 2, "MultiHeadAttention": 1}
    assert_same_outputs(layer, result.model)


def test_greedy_generation_with_fused_layers_equals_unfused(base, fused, tmp_path):
    out = base.derive(tmp_path / "fused")
    out.root.mkdir(parents=True)
    for name in base.names():
        if name in fused:
            out.save_graph(name, fused[name])
        else:
            out.copy_graph_from(base, name)
    out.write_manifest()
    ref, cand = ChatTTSRuntime(base.root), ChatTTSRuntime(out.root)
    want = ref.generate_text([3, 14, 15, 92, 65], 24).ids
    assert cand.generate_text([3, 14, 15, 92, 65], 24).ids == want
    assert len(set(want)) > 3  # a real sequence, not one token repeated
    want_codes, _ = ref.generate_codes([3, 14, 15], 8)
    got_codes, _ = cand.generate_codes([3, 14, 15], 8)
    assert got_codes == want_codes and len(want_codes) == 8


# --- the rules on a tiny graph: where and why a pattern did not match ---------------------------------------

def tiny_attention(additive_mask: bool = False) -> onnx.ModelProto:
    """x [B, S, 8] split into 2 heads of 4 as Q, K and V -> Softmax(Q K^T * 0.5 [+ mask]) V merged back, under
    /h.0/attn; beside it a rotate_half(x) * sin that is added to nothing."""
    s = "/h.0/attn"
    inits = [numpy_helper.from_array(np.array(v, dtype), name) for v, dtype, name in [
        ([0, 0, 2, 4], np.int64, "split"), ([0, 0, 8], np.int64, "merge"), (0.5, np.float32, "scale"),
        ([0], np.int64, "zero"), ([4], np.int64, "half"), ([8], np.int64, "full"), ([-1], np.int64, "last"),
        (np.ones((3, 3)), np.float32, "mask"), (np.ones(8), np.float32, "sin")]]
    nodes = []
    for t in ("q", "k", "v"):
        nodes += [helper.make_node("Reshape", ["x", "split"], [f"{t}_bshd"], name=f"{s}/{t}/Reshape"),
                  helper.make_node("Transpose", [f"{t}_bshd"], [t], name=f"{s}/{t}/Transpose", perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], name=f"{s}/Transpose", perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kt"], ["qk"], name=f"{s}/MatMul"),
              helper.make_node("Mul", ["qk", "scale"], ["scores"], name=f"{s}/Mul")]
    if additive_mask:
        nodes.append(helper.make_node("Add", ["scores", "mask"], ["scores_masked"], name=f"{s}/Add"))
    nodes += [helper.make_node("Softmax", [nodes[-1].output[0]], ["probs"], name=f"{s}/Softmax", axis=-1),
              helper.make_node("MatMul", ["probs", "v"], ["pv"], name=f"{s}/MatMul_1"),
              helper.make_node("Transpose", ["pv"], ["pv_bshd"], name=f"{s}/Transpose_1", perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["pv_bshd", "merge"], ["out"], name=f"{s}/Reshape"),
              helper.make_node("Slice", ["x", "half", "full", "last"], ["high"], name=f"{s}/rotary/Slice"),
              helper.make_node("Slice", ["x", "zero", "half", "last"], ["low"], name=f"{s}/rotary/Slice_1"),
              helper.make_node("Neg", ["high"], ["neg"], name=f"{s}/rotary/Neg"),
              helper.make_node("Concat", ["neg", "low"], ["rotated"], name=f"{s}/rotary/Concat", axis=-1),
              helper.make_node("Mul", ["rotated", "sin"], ["rot"], name=f"{s}/rotary/Mul")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, 3, 8]) for o in ("out", "rot")],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_rule_that_does_not_match_names_the_node_and_why():
    misses = apply_rules(GraphView(tiny_attention(additive_mask=True)), attention_rules())
    assert [(m.pattern, str(m)) for m in misses] == [
        ("rotary embedding", "node '/h.0/attn/rotary/Concat': rotate_half(x) * sin is not added to x * cos"),
        ("attention", "node '/h.0/attn/Softmax': the scores get an additive mask, which this fusion does not take")]
    misses = apply_rules(GraphView(tiny_attention()), attention_rules(num_heads=3))
    assert str(misses[-1]) == "node '/h.0/attn/Softmax': the heads split into 2, not num_heads 3"
    # The attention matches; what GroupQueryAttention's cache needs of it (the rule's check) is not there.
    misses = apply_rules(GraphView(tiny_attention()), attention_rules(in_place=True))
    assert str(misses[-1]) == ("node '/h.0/attn/Softmax': the attention has no past key/value graph inputs: "
                               "no cache to keep in place")


def test_the_attention_rule_fuses_the_tiny_graph_into_one_op_that_computes_the_same():
    model, fused = tiny_attention(), tiny_attention()
    misses = apply_rules(GraphView(fused), attention_rules(num_heads=2))
    assert [m.pattern for m in misses] == ["rotary embedding"]
    mha = [n for n in fused.graph.node if n.op_type == "MultiHeadAttention"]
    assert [n.name for n in mha] == ["/h.0/attn/MultiHeadAttention"] and "Softmax" not in [n.op_type for n in
                                                                                            fused.graph.node]
    fused.opset_import.add(domain="com.microsoft", version=1)
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 8)).astype(np.float32)}
    for want, got in zip(session(model).run(None, x), session(fused).run(None, x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_shortfall_on_the_tiny_graph_names_block_node_and_reason():
    with pytest.raises(PipelineError, match=r"^fuse_attention: tiny: expected 1 MultiHeadAttention in /h.0, found 0: "
                                            r"attention pattern did not match at /h.0/attn/Softmax: the scores get "
                                            r"an additive mask"):
        fuse(tiny_attention(additive_mask=True), "tiny", expect={"MultiHeadAttention": 1})


# --- kv_cache: in_place (GroupQueryAttention over one past/present buffer) --------------------------------

IN_PLACE_EXPECT = {"GroupQueryAttention": 1, "SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 1}


def in_place(model: onnx.ModelProto, graph: str, pack: bool = True) -> onnx.ModelProto:
    out = fuse(model, graph, kv_cache="in_place", expect=IN_PLACE_EXPECT).model
    if pack:
        fuser = get_pass("fuse_matmuls")
        out = fuser.apply(out, fuser.Params(expect_min_groups=2), PassContext(graph, BlockPartition(out), None,
                                                                              Path("."))).model
    return out


def test_in_place_layers_compute_what_the_unfused_ones_do(base):
    """Fed the concat convention's inputs (a buffer of exactly past + new), every output is the same, with
    q/k/v packed into one MatMul and without; batch 2 only where ORT's kernel takes it (one new token)."""
    for name in base.meta["layers"]:
        layer = base.load(name)
        for pack in (False, True):
            ref, cand = session(layer), session(in_place(layer, name, pack))
            inv_freq = kv_cache.inv_freq_of(in_place(layer, name, pack))
            for batch, past, new in [(1, 0, 9), (1, 9, 1), (1, 5, 3), (2, 7, 1), (2, 0, 4)]:
                feed = feeds(batch, past, new)
                got = cand.run(None, kv_cache.contract_feeds(feed, inv_freq))
                for out, want, have in zip(["hidden_out", "present_key", "present_value"], ref.run(None, feed), got):
                    assert have.shape == want.shape and sqnr_db(want, have) >= 60, (name, pack, out, batch, past)


def test_in_place_layer_takes_the_step_inputs_and_computes_positions_no_more(base):
    layer = base.load("layer_00")
    result = fuse(layer, "layer_00", kv_cache="in_place", expect=IN_PLACE_EXPECT)
    out = result.model
    assert result.stats["fused_per_block"]["/self_attn"] == {"GroupQueryAttention": 1}
    assert [i.name for i in out.graph.input] == ["hidden", "past_key", "past_value", *kv_cache.STEP_INPUTS]
    assert [o.name for o in out.graph.output] == [o.name for o in layer.graph.output]
    ops = [n.op_type for n in out.graph.node]
    # RoPE, the position Range and the angle tables were every layer's work every step: now the op's.
    assert not {"RotaryEmbedding", "Range", "Cos", "Sin", "Concat", "Softmax"} & set(ops), ops
    gqa = next(n for n in out.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs == {"num_heads": HEADS, "kv_num_heads": HEADS, "scale": pytest.approx(0.25), "do_rotary": 1}
    theta = base.meta["config"]["rope_theta"]
    want = 1.0 / theta ** (np.arange(0, HEAD_DIM, 2, dtype=np.float32) / HEAD_DIM)
    np.testing.assert_allclose(kv_cache.inv_freq_of(out), want, rtol=1e-6)
    packed = in_place(layer, "layer_00")
    assert [n.op_type for n in packed.graph.node].count("MatMul") == 4  # q+k+v, o, gate+up, down
    gqa = next(n for n in packed.graph.node if n.op_type == "GroupQueryAttention")
    assert list(gqa.input[1:3]) == ["", ""]  # packed q/k/v, no Split in between
    check_loads(packed, "in-place layer")


def test_in_place_on_an_attention_the_pass_did_not_match_names_the_layer(base):
    layer = base.load("layer_01")
    for node in layer.graph.node:
        if node.op_type == "Greater":
            node.op_type = "Less"
    before = layer.SerializeToString()
    with pytest.raises(PipelineError, match=r"^fuse_attention: kv_cache 'in_place' on 'layer_01': its attention did "
                                            r"not match in /self_attn at /self_attn/Softmax: the mask is not causal"):
        fuse(layer, "layer_01", kv_cache="in_place")
    assert layer.SerializeToString() == before
    with pytest.raises(PipelineError, match="needs the structural matcher"):
        fuse(base.load("layer_00"), "layer_00", kv_cache="in_place", rotary_attention=False)


def test_in_place_cache_gives_the_same_greedy_tokens_for_64_steps(base, tmp_path):
    """Text and audio-code mode, through the runtime's shared buffers, against today's concat graphs."""
    out = base.derive(tmp_path / "in_place")
    out.root.mkdir(parents=True)
    for name in base.names():
        if name in base.meta["layers"]:
            out.save_graph(name, in_place(base.load(name), name))
        else:
            out.copy_graph_from(base, name)
    out.write_manifest()
    ref, cand = ChatTTSRuntime(base.root), ChatTTSRuntime(out.root)
    assert cand.in_place and not ref.in_place
    frames = []
    for prompt in ([3, 14, 15, 92, 65], [7] * 30 + [1, 2]):
        want = ref.generate_text(prompt, 64).ids
        assert cand.generate_text(prompt, 64).ids == want and len(set(want)) > 3
        want_codes, _ = ref.generate_codes(prompt, 64)
        assert cand.generate_codes(prompt, 64)[0] == want_codes
        frames.append(len(want_codes))
    assert max(frames) == 64  # one prompt's codes run all 64 steps without an EOS frame
