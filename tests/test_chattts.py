"""ChatTTS GPT: the real asset layout, our decoder layer vs transformers, ONNX export, greedy generation."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file
from tiny_chattts import TINY, write_assets

from pipeline.core.errors import PipelineError
from pipeline.families.chattts.exporter import ChatTTSGPT, GPTConfig, export_modelset, load_weights
from pipeline.families.chattts.runtime import ChatTTSRuntime


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A small asset folder in ChatTTS's layout (tests/tiny_chattts.py): (root, llama, embed, config)."""
    return write_assets(tmp_path_factory.mktemp("asset"))


def test_loader_reads_the_real_layout_and_folds_weight_norm(assets):
    root, llama, embed, c = assets
    w = load_weights(root)
    assert w.seeded is False and w.config == c
    assert set(json.loads((root / "gpt" / "config.json").read_text())) >= {"hidden_size", "num_hidden_layers"}
    torch.testing.assert_close(w.embed["head_text.weight"], embed.head_text.weight.detach())
    torch.testing.assert_close(w.embed["head_code.2.weight"], embed.head_code[2].weight.detach())
    torch.testing.assert_close(w.gpt["layers.1.mlp.up_proj.weight"], llama.layers[1].mlp.up_proj.weight.detach())


def test_seeded_weights_have_chattts_exact_config():
    w = load_weights(None, GPTConfig(num_hidden_layers=1))
    assert w.seeded and "seeded" in w.source
    c = GPTConfig()
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers,
            c.max_position_embeddings, c.num_text_tokens, c.num_audio_tokens, c.num_vq) == (
        768, 3072, 12, 20, 4096, 21178, 626, 4)


def test_our_stack_matches_transformers_llama(assets):
    root, llama, _, _ = assets
    ours = ChatTTSGPT(load_weights(root))
    x = torch.randn(2, 9, ours.config.hidden_size)
    with torch.no_grad():
        want = llama(inputs_embeds=x).last_hidden_state
        got, cache = ours.step(x, ours.empty_cache(2))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        x2 = torch.randn(2, 1, ours.config.hidden_size)
        want2 = llama(inputs_embeds=torch.cat([x, x2], 1)).last_hidden_state[:, -1:]
        got2, _ = ours.step(x2, cache)
        torch.testing.assert_close(got2, want2, atol=1e-5, rtol=1e-5)


def reference_greedy(llama, embed, prompt: list[int], steps: int) -> list[int]:
    """transformers LlamaModel + ChatTTS's Embed, recomputing the whole sequence each step."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            hidden = llama(inputs_embeds=embed.emb_text(torch.tensor([ids]))).last_hidden_state
            nxt = int(embed.head_text(hidden[0, -1]).argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


def test_onnx_greedy_generation_matches_pytorch_for_64_steps(assets, tmp_path):
    root, llama, embed, _ = assets
    ms = export_modelset(load_weights(root), tmp_path / "gpt")
    assert ms.names() == ["embed_text", "embed_code", "layer_00", "layer_01", "layer_02", "norm",
                          "lm_head_text", "lm_head_code", "sample_head"]
    prompt = [3, 14, 15, 92, 65, 35]
    got = ChatTTSRuntime(tmp_path / "gpt").generate_text(prompt, 64)
    assert got.ids == reference_greedy(llama, embed, prompt, 64)
    assert len(got.step_s) == 63 and got.prefill_s > 0
    assert len(set(got.ids)) > 3  # a real sequence, not one token repeated


def test_code_embedding_and_heads_match_pytorch(assets, tmp_path):
    from pipeline.core.onnx_io import session

    root, _, embed, c = assets
    export_modelset(load_weights(root), tmp_path / "gpt")
    ids = np.random.default_rng(0).integers(0, c.num_audio_tokens, (2, 5, c.num_vq))
    got = session(tmp_path / "gpt" / "embed_code.onnx").run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        want = sum(embed.emb_code[q](torch.from_numpy(ids[..., q])) for q in range(c.num_vq)).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
        h = torch.randn(2, 5, c.hidden_size)
        logits = session(tmp_path / "gpt" / "lm_head_code.onnx").run(None, {"hidden": h.numpy()})[0]
        want = torch.stack([embed.head_code[q](h) for q in range(c.num_vq)], 3).numpy()
        assert logits.shape == (2, 5, c.num_audio_tokens, c.num_vq)
        np.testing.assert_allclose(logits, want, atol=1e-4)


def test_bad_checkpoints_are_named(assets, tmp_path):
    import shutil

    root, *_ = assets
    bad = tmp_path / "asset"
    shutil.copytree(root, bad)
    from safetensors.torch import load_file

    sd = load_file(str(bad / "gpt" / "model.safetensors"))
    del sd["layers.1.mlp.up_proj.weight"]
    save_file(sd, str(bad / "gpt" / "model.safetensors"))
    with pytest.raises(PipelineError, match="missing keys layers.1.mlp.up_proj.weight"):
        load_weights(bad)
    sd["layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, str(bad / "gpt" / "model.safetensors"))
    with pytest.raises(PipelineError, match=r"misshaped keys: layers.1.mlp.up_proj.weight \[3, 3\] \(expected \[128, 64\]\)"):
        load_weights(bad)
    cfg = json.loads((root / "gpt" / "config.json").read_text())
    cfg["hidden_size"] = 96
    cfg["head_dim"] = 96 // cfg["num_attention_heads"]  # else head_dim 16 is refused first (test below)
    (bad / "gpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PipelineError, match="misshaped keys"):  # the config says 96, the weights are 64
        load_weights(bad)


def test_runtime_refuses_prompts_past_the_position_limit(assets, tmp_path):
    root, *_ = assets
    export_modelset(load_weights(root), tmp_path / "gpt")
    rt = ChatTTSRuntime(tmp_path / "gpt")
    with pytest.raises(PipelineError, match="exceeds the position limit 256"):
        rt.generate_text([1] * 250, 10)
    with pytest.raises(PipelineError, match="out of the text vocabulary"):
        rt.generate_text([1, 500], 2)


RECIPE = """name: chattts_tiny_int8
model:
  exporter: chattts_gpt
  params:
    seed: 3
    config: {num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4,
             num_text_tokens: 97, num_audio_tokens: 31}
steps:
  - name: int8-layers
    pass: quantize
    params: {mode: dynamic, op_types: [MatMul], expect_min_nodes: 7}
    scope: {graphs: ['layer_\\d+']}
"""


def test_recipe_with_exporter_quantizes_the_layer_graphs(tmp_path):
    from conftest import cli

    from pipeline.core.modelset import ModelSet

    (tmp_path / "r.yaml").write_text(RECIPE)
    res = cli("run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"))
    assert res.code == 0, res.stderr
    final = ModelSet.read(tmp_path / "run" / "final")
    assert final.meta["seeded"] is True and final.names()[:3] == ["embed_text", "embed_code", "layer_00"]
    base = ModelSet.read(tmp_path / "run" / "steps" / "00-base")
    import onnx

    for name in ("layer_00", "layer_01"):
        ops = {n.op_type for n in onnx.load(str(final.path(name))).graph.node}
        assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
        assert final.path(name).stat().st_size < 0.5 * base.path(name).stat().st_size
    assert final.graph("norm").sha256 and final.path("norm").read_bytes() != b""
    gen = cli("generate", str(tmp_path / "run" / "final"), "--ids", "3,14,15", "--steps", "12",
              "--json", str(tmp_path / "g.json"))
    assert gen.code == 0, gen.stderr
    assert gen.stdout.startswith("note: seeded random weights")
    out = json.loads((tmp_path / "g.json").read_text())
    assert len(out["ids"]) == 12 and len(out["step_s"]) == 11
    # The layer-scoped step copies the other graphs unchanged.
    step = ModelSet.read(tmp_path / "run" / "steps" / "01-int8-layers")
    assert step.graph("embed_text").sha256 == base.graph("embed_text").sha256
    assert step.graph("layer_00").sha256 != base.graph("layer_00").sha256


def test_scope_graph_pattern_matching_nothing_is_an_error(tmp_path):
    from conftest import cli

    (tmp_path / "r.yaml").write_text(RECIPE.replace("layer_\\d+", "decoder_\\d+"))
    res = cli("run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"))
    assert res.code == 2 and "matches no graph" in res.stderr and "layer_00" in res.stderr


def test_generate_bad_input(tmp_path):
    from conftest import cli

    res = cli("generate", str(tmp_path), "--ids", "1,2")
    assert res.code == 2 and "not a model set folder" in res.stderr
    res = cli("generate", str(tmp_path), "--ids", "1,x")
    assert res.code == 2 and "not a comma-separated list" in res.stderr


def test_sample_head_matches_chattts_processing_and_transformers_warpers(tmp_path):
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    from pipeline.families.chattts.sample_head import export_sample_head
    from pipeline.core.onnx_io import session

    vocab, rows = 50, 6
    export_sample_head(tmp_path / "s.onnx", vocab)
    sess = session(tmp_path / "s.onnx")
    gen = torch.Generator().manual_seed(1)
    for temperature, penalty, top_p, top_k in [(0.7, 1.05, 0.7, 20), (0.3, 1.5, 0.9, 5), (1.0, 1.0, 1.0, 50)]:
        logits = torch.randn(rows, vocab, generator=gen) * 3
        past = torch.randint(-1, vocab, (rows, 16), generator=gen)
        noise = torch.rand(rows, 1, generator=gen)
        # The reference: ChatTTS's order with its penalty formula and transformers' own warpers.
        scores = logits / temperature
        freq = torch.nn.functional.one_hot(past.clamp(min=0), vocab).mul((past >= 0)[..., None]).sum(1)
        alpha = torch.pow(torch.tensor(penalty), freq)
        scores = torch.where(scores < 0, scores * alpha, scores / alpha)
        scores = TopKLogitsWarper(top_k, min_tokens_to_keep=3)(None, TopPLogitsWarper(top_p, min_tokens_to_keep=3)(None, scores))
        want = scores.softmax(-1)
        feed = {"logits": logits.numpy(), "past_ids": past.numpy(), "temperature": np.array([[temperature]], np.float32),
                "penalty": np.array([[penalty]], np.float32), "top_p": np.array([[top_p]], np.float32),
                "top_k": np.array([[top_k]], np.int64), "noise": noise.numpy(), "greedy": np.array(False)}
        ids, probs = sess.run(None, feed)
        np.testing.assert_allclose(probs, want.numpy(), atol=1e-6)
        assert (ids == (want.cumsum(-1) <= noise).sum(-1).numpy()).all()
        greedy, _ = sess.run(None, {**feed, "greedy": np.array(True)})
        assert (greedy == want.argmax(-1).numpy()).all()


def test_sampled_generation_is_reproducible_from_its_seed(assets, tmp_path):
    from pipeline.families.chattts.runtime import SamplingParams

    root, *_ = assets
    export_modelset(load_weights(root), tmp_path / "gpt")
    rt = ChatTTSRuntime(tmp_path / "gpt")
    a = rt.generate_text([3, 14, 15], 24, SamplingParams(seed=5, temperature=1.0, top_p=0.95, top_k=40))
    b = rt.generate_text([3, 14, 15], 24, SamplingParams(seed=5, temperature=1.0, top_p=0.95, top_k=40))
    c = rt.generate_text([3, 14, 15], 24, SamplingParams(seed=6, temperature=1.0, top_p=0.95, top_k=40))
    assert a.ids == b.ids and a.ids != c.ids


@pytest.mark.parametrize("name", ["chattts_int8", "chattts_fp16", "chattts_fp32", "chattts_int4"])
def test_shipped_chattts_recipes_run_on_a_small_model(tmp_path, name):
    """The recipes as shipped, only the seeded model made small: export, pass, check, token metrics."""
    import yaml
    from conftest import REPO, cli

    recipe = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())
    # 128 wide, so the recipes' weight blocks of 128 divide every MatMul's input as at full size
    recipe["model"]["params"]["config"] = {**{k: v for k, v in TINY.items() if k != "max_position_embeddings"},
                                           "hidden_size": 128, "intermediate_size": 256}
    recipe["check"]["samples"] = 3
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = cli("run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"))
    assert res.code == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["notes"][0].startswith("SEEDED RANDOM WEIGHTS")
    assert (tmp_path / "run" / "report.md").read_text().startswith("**SEEDED RANDOM WEIGHTS")
    blocks = {b["block"]: b for b in report["blocks"]}
    assert list(blocks)[:4] == ["embed_text", "embed_code", "layer_00", "layer_01"]
    assert {"lm_head_text", "lm_head_code"} <= set(blocks)
    assert blocks["embed_text"]["isolated"]["sqnr_db"] == "inf"
    layer = blocks["layer_02"]
    if name in ("chattts_int8", "chattts_fp16"):
        assert 20 < layer["isolated"]["sqnr_db"] < 90 and layer["accumulated"]["sqnr_db"] > 15
    if name in ("chattts_int8", "chattts_fp32", "chattts_int4"):
        from pipeline.core.blocks import BlockPartition
        from pipeline.core.onnx_io import load_onnx

        fused = load_onnx(tmp_path / "run" / "final" / "layer_02.onnx")
        where = BlockPartition(fused).node_block  # the runner keeps fused ops in the blocks the pass chose
        weights = "MatMul" if name == "chattts_fp32" else "MatMulNBits"
        assert {op: sorted(where[n.name] for n in fused.graph.node if n.op_type == op) for op in
                ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "GroupQueryAttention",
                 weights)} == {
            "SimplifiedLayerNormalization": ["/input_layernorm"],
            "SkipSimplifiedLayerNormalization": ["/post_attention_layernorm"],
            "GroupQueryAttention": ["/self_attn"], weights: ["/mlp", "/mlp", "/self_attn", "/self_attn"]}
    if name == "chattts_int8":
        assert layer["precision"]["int8"] == 4  # q+k+v, o, gate+up, down
        assert layer["bytes_candidate"] < layer["bytes_reference"]
    elif name == "chattts_fp32":
        assert layer["isolated"]["sqnr_db"] == "inf" or layer["isolated"]["sqnr_db"] > 100
    elif name == "chattts_int4":
        bits = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["bits"]
                for g in ("layer_02", "lm_head_text") for n in load_onnx(tmp_path / "run" / "final" / f"{g}.onnx").graph.node
                if n.op_type == "MatMulNBits"}
        assert sorted(bits.values()) == [4, 4, 4, 4, 8] and layer["bytes_candidate"] < layer["bytes_reference"] / 3
    else:
        weights = layer["weights"]  # the graph's own structure weighs more than its weights at this size
        assert weights.get("float16", 0) > 0.95 * sum(weights.values())
        assert layer["bytes_candidate"] < layer["bytes_reference"]
    tokens = report["tokens"]
    for head in (tokens, tokens["code_head"]):
        assert 0 <= head["teacher_forced_top1_agreement"] <= 1 and head["teacher_forced_kl_mean"] >= 0
        assert len(head["first_divergence_steps"]) == 3
    assert len(tokens["teacher_forced_kl_per_step"]) == recipe["check"]["decode_steps"]
    assert "tokens (text head" in res.stdout and "tokens (code head" in res.stdout


def test_token_metrics_catch_a_broken_layer(assets, tmp_path):
    """Fault injection on the chain check: noise on one layer's weights shows up there and in the tokens."""
    import shutil

    from pipeline.families.chattts.check import compare_chattts
    from pipeline.families.chattts.exporter import layer_name

    root, *_ = assets
    w = load_weights(root)
    export_modelset(w, tmp_path / "ref")
    w.gpt["layers.1.mlp.down_proj.weight"] = w.gpt["layers.1.mlp.down_proj.weight"] * 1.5
    export_modelset(w, tmp_path / "cand")
    shutil.copy(tmp_path / "ref" / "sample_head.onnx", tmp_path / "cand" / "sample_head.onnx")
    report = compare_chattts(tmp_path / "ref", tmp_path / "cand", [[3, 14, 15, 92], [65, 35, 89]], steps=12).to_json()
    blocks = {b["block"]: b for b in report["blocks"]}
    assert blocks[layer_name(0)]["isolated"]["sqnr_db"] == "inf"
    assert blocks[layer_name(0)]["accumulated"]["sqnr_db"] == "inf"  # upstream of the fault: identical
    assert blocks[layer_name(1)]["isolated"]["sqnr_db"] < 40
    assert blocks[layer_name(2)]["isolated"]["sqnr_db"] == "inf"  # downstream adds nothing itself
    assert blocks[layer_name(2)]["accumulated"]["sqnr_db"] < 40
    assert report["tokens"]["teacher_forced_kl_mean"] > 0
    assert report["tokens"]["code_head"]["teacher_forced_kl_mean"] > 0


def test_runtime_refuses_a_manifest_that_does_not_match_its_files(assets, tmp_path):
    import shutil

    root, *_ = assets
    export_modelset(load_weights(root), tmp_path / "gpt")
    shutil.copy(tmp_path / "gpt" / "layer_00.onnx", tmp_path / "gpt" / "layer_01.onnx")
    with pytest.raises(PipelineError, match=r"does not match its files .*layer_01.onnx"):
        ChatTTSRuntime(tmp_path / "gpt")
    (tmp_path / "gpt" / "layer_01.onnx").unlink()
    with pytest.raises(PipelineError, match="lists layer_01.onnx for graph 'layer_01', but the file is missing"):
        ChatTTSRuntime(tmp_path / "gpt")


def reference_codes(llama, embed, c, prompt: list[int], max_frames: int) -> list[list[int]]:
    """transformers LlamaModel + ChatTTS's Embed, greedy per codebook, the whole sequence each step."""
    frames: list[list[int]] = []
    with torch.no_grad():
        for _ in range(max_frames):
            parts = [embed.emb_text(torch.tensor([prompt]))]
            if frames:
                ids = torch.tensor([frames])  # [1, T, 4]
                parts.append(sum(embed.emb_code[q](ids[..., q]) for q in range(c.num_vq)))
            hidden = llama(inputs_embeds=torch.cat(parts, 1)).last_hidden_state[0, -1]
            frame = [int(embed.head_code[q](hidden).argmax()) for q in range(c.num_vq)]
            if c.num_audio_tokens - 1 in frame:
                break
            frames.append(frame)
    return frames


def test_onnx_code_generation_matches_pytorch_greedy(assets, tmp_path):
    """Audio-code mode: text prompt, then frames embedded as the sum of the 4 codebooks, EOS ends it."""
    root, llama, embed, c = assets
    export_modelset(load_weights(root), tmp_path / "gpt")
    rt = ChatTTSRuntime(tmp_path / "gpt")
    lengths = []
    for prompt in ([3, 14, 15, 92], [65, 35, 89, 79, 32], [38, 46], [26, 43, 38, 32, 79, 50]):
        frames, timing = rt.generate_codes(prompt, 16)
        assert frames == reference_codes(llama, embed, c, prompt, 16)
        lengths.append(len(frames))
    assert max(lengths) >= 5  # some prompt runs long enough for the cache to matter


def test_sampled_codes_use_infer_code_defaults_reproducibly(assets, tmp_path):
    from pipeline.families.chattts.runtime import infer_code_sampling

    root, *_ = assets
    export_modelset(load_weights(root), tmp_path / "gpt")
    rt = ChatTTSRuntime(tmp_path / "gpt")
    a, _ = rt.generate_codes([3, 14], 12, infer_code_sampling(seed=1))
    b, _ = rt.generate_codes([3, 14], 12, infer_code_sampling(seed=1))
    assert a == b and all(len(f) == 4 and all(0 <= x < 210 for x in f) for f in a)


def test_calibration_is_teacher_forced_on_the_models_own_codes(assets, tmp_path):
    """Layer inputs come from prompt + the FP32 model's own sampled codes; the decode feed is a real decode step."""
    from pipeline.families.chattts.check import chattts_graph_feeds
    from pipeline.core.onnx_io import session
    from pipeline.families.chattts.runtime import infer_code_sampling

    root, *_ = assets
    export_modelset(load_weights(root), tmp_path / "gpt")
    prompts = [[3, 14, 15, 92], [65, 35, 89]]
    entry = [{"input_ids": np.array([p], np.int64)} for p in prompts]
    feeds = chattts_graph_feeds(tmp_path / "gpt", entry, "layer_01", frames=8)
    rt = ChatTTSRuntime(tmp_path / "gpt")
    codes, _ = rt.generate_codes(prompts[0], 8, infer_code_sampling(seed=0))
    prefill, decode = feeds[0], feeds[1]
    assert len(feeds) == 4 and prefill["hidden"].shape[1] == len(prompts[0]) + len(codes) > len(prompts[0])
    assert prefill["past_key"].shape[2] == 0 and decode["hidden"].shape[1] == 1
    assert decode["past_key"].shape[2] == prefill["hidden"].shape[1] - 1
    layer = session(tmp_path / "gpt" / "layer_01.onnx")
    whole, step = layer.run(None, prefill)[0], layer.run(None, decode)[0]
    np.testing.assert_allclose(step[:, 0], whole[:, -1], rtol=1e-4, atol=1e-5)
    code_head = chattts_graph_feeds(tmp_path / "gpt", entry, "lm_head_code", frames=8)
    assert code_head[0]["hidden"].shape[1] == prefill["hidden"].shape[1]
    with pytest.raises(PipelineError, match="no capture for ChatTTS graph 'sample_head'"):
        chattts_graph_feeds(tmp_path / "gpt", entry, "sample_head")


@pytest.mark.parametrize("kv_cache", ["concat", "in_place"])
def test_calibrated_recipes_capture_the_layer_inputs_from_the_fp32_chain(tmp_path, kv_cache):
    """Calibration inputs are captured from the FP32 export and fed to each layer in its own KV convention:
    static INT8 on the exported layers; GPTQ (INT4, which runs the graph on them) on in-place ones. The check
    runs in-place layers as it runs the exported ones. (Static QDQ on fused layers quantizes only the weights:
    ORT's quantizer puts no activation QDQ around contrib-op outputs, concat or in-place alike.)"""
    import yaml
    from conftest import cli

    layers = {"graphs": ["layer_\\d+"]}
    steps = [{"pass": "quantize", "params": {"mode": "static", "op_types": ["MatMul"]}, "scope": layers}]
    if kv_cache == "in_place":
        steps = [{"pass": "fuse_attention", "params": {"kv_cache": "in_place"}, "scope": layers},
                 {"pass": "quantize", "params": {"mode": "weight_only", "method": "gptq", "bits": 4,
                                                 "block_size": 32}, "scope": layers}]
    recipe = {"name": "chattts_calibrated", "model": {"exporter": "chattts_gpt", "params": {
                  "config": {k: v for k, v in TINY.items() if k != "max_position_embeddings"}}},
              "calibration": {"source": "chattts", "params": {"count": 4}},
              "steps": steps, "check": {"samples": 2, "decode_steps": 6}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = cli("run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"))
    assert res.code == 0, res.stderr[-2000:]
    folder = f"{len(steps):02d}-quantize"
    stats = json.loads((tmp_path / "run" / "steps" / folder / "step.json").read_text())["stats"]
    assert "embed_text" not in stats
    if kv_cache == "concat":
        assert stats["layer_00"]["quantize_linear"] > 0
    else:
        assert stats["layer_00"]["method"] == "gptq" and stats["layer_00"]["nodes_quantized"] == 7
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    layer = {b["block"]: b for b in report["blocks"]}["layer_01"]
    assert (15 if kv_cache == "concat" else 8) < layer["isolated"]["sqnr_db"] < 80


def test_generate_takes_a_text_prompt_through_the_assets_tokenizer(assets, tmp_path):
    from conftest import cli
    from transformers import BertTokenizerFast

    root, *_ = assets
    export_modelset(load_weights(root), tmp_path / "gpt")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "你", "好"]
    BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(str(tmp_path / "tokenizer"))
    res = cli("generate", str(tmp_path / "gpt"), "--prompt", "hello 你好 world", "--tokenizer",
              str(tmp_path / "tokenizer"), "--steps", "4", "--json", str(tmp_path / "g.json"))
    assert res.code == 0, res.stderr
    assert json.loads((tmp_path / "g.json").read_text())["prompt"] == [5, 7, 8, 6]
    res = cli("generate", str(tmp_path / "gpt"), "--prompt", "hello")
    assert res.code == 2 and "--prompt needs --tokenizer" in res.stderr
    res = cli("generate", str(tmp_path / "gpt"), "--prompt", "hello", "--tokenizer", str(tmp_path))
    assert res.code == 2 and "cannot load the tokenizer" in res.stderr and "Traceback" not in res.stderr


def _asset_copy(root, dest):
    import shutil

    shutil.copytree(root, dest)
    return dest


def _edit_config(asset, **changes):
    path = asset / "gpt" / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("field, value", [
    ("attention_bias", True),
    ("mlp_bias", True),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    ("hidden_act", "gelu"),
    ("head_dim", 32),
    ("num_key_value_heads", 2),
    ("pretraining_tp", 2),
    ("model_type", "mistral"),
    ("sliding_window", 128),  # unknown to the loader: refused, not ignored
])
def test_config_fields_the_exporter_does_not_model_are_refused(assets, tmp_path, field, value):
    root, *_ = assets
    bad = _asset_copy(root, tmp_path / "asset")
    _edit_config(bad, **{field: value})
    with pytest.raises(PipelineError, match=rf"gpt/config.json: config the exporter does not implement: {field}\b"):
        load_weights(bad)


def test_config_fields_at_their_modelled_values_load(assets, tmp_path):
    root, llama, *_ = assets
    ok = _asset_copy(root, tmp_path / "asset")
    _edit_config(ok, attention_bias=False, mlp_bias=False, rope_scaling=None, hidden_act="silu", head_dim=16,
                 pretraining_tp=1, num_key_value_heads=4, attention_dropout=0.1, torch_dtype="float16",
                 spk_emb_dim=192, spk_KL=False, tie_word_embeddings=True, architectures=["LlamaModel"])
    w = load_weights(ok)
    assert w.config == load_weights(root).config
    torch.testing.assert_close(w.gpt["layers.2.self_attn.k_proj.weight"], llama.layers[2].self_attn.k_proj.weight.detach())
    _edit_config(ok, rope_scaling={"rope_type": "default"}, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    assert load_weights(ok).config.rope_theta == 500.0


def test_unexpected_weight_keys_are_refused_and_named(assets, tmp_path):
    import shutil

    from safetensors.torch import load_file

    root, *_ = assets
    bad = _asset_copy(root, tmp_path / "asset")
    sd = load_file(str(root / "gpt" / "model.safetensors"))
    save_file({**sd, "layers.0.self_attn.q_proj.bias": torch.zeros(64)}, str(bad / "gpt" / "model.safetensors"))
    with pytest.raises(PipelineError, match=r"gpt/model.safetensors: unexpected keys .*layers.0.self_attn.q_proj.bias"):
        load_weights(bad)
    save_file({**sd, **{f"layers.{n}.mlp.down_proj.bias": torch.zeros(64) for n in range(3)},
               "model.norm.bias": torch.zeros(64)}, str(bad / "gpt" / "model.safetensors"))
    with pytest.raises(PipelineError, match=r"unexpected keys \(not modelled by the exporter\) layers.0.mlp.down_proj.bias, "
                                            r"layers.1.mlp.down_proj.bias, layers.2.mlp.down_proj.bias, norm.bias$"):
        load_weights(bad)
    save_file({**sd, "model.norm.weight": sd["norm.weight"].clone()}, str(bad / "gpt" / "model.safetensors"))
    with pytest.raises(PipelineError, match="norm.weight is there twice"):
        load_weights(bad)
    save_file({**sd, "embed_tokens.weight": torch.zeros(8, 64)}, str(bad / "gpt" / "model.safetensors"))
    load_weights(bad)  # LlamaModel's own token embedding: ChatTTS never uses it
    shutil.copy(root / "gpt" / "model.safetensors", bad / "gpt" / "model.safetensors")
    emb = load_file(str(root / "Embed.safetensors"))
    save_file({**emb, "head_text.bias": torch.zeros(97)}, str(bad / "Embed.safetensors"))
    with pytest.raises(PipelineError, match=r"Embed.safetensors: unexpected keys .*head_text.bias"):
        load_weights(bad)


@pytest.fixture(scope="module")
def sharded(assets, tmp_path_factory):
    """The same asset with gpt/ written by transformers' save_pretrained as a sharded checkpoint."""
    import shutil

    root, llama, *_ = assets
    out = tmp_path_factory.mktemp("sharded")
    (out / "gpt").mkdir()
    llama.save_pretrained(out / "gpt", max_shard_size="200KB")
    shutil.copy(root / "Embed.safetensors", out / "Embed.safetensors")
    return out


def test_sharded_checkpoint_loads_the_same_weights_and_export(assets, sharded, tmp_path):
    root, *_ = assets
    gpt = sharded / "gpt"
    index = json.loads((gpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2 and not (gpt / "model.safetensors").exists()
    one, many = load_weights(root), load_weights(sharded)
    assert many.config == one.config and list(many.gpt) == list(one.gpt) and list(many.embed) == list(one.embed)
    assert all(torch.equal(many.gpt[k], one.gpt[k]) for k in one.gpt)
    assert all(torch.equal(many.embed[k], one.embed[k]) for k in one.embed)
    a, b = export_modelset(one, tmp_path / "one"), export_modelset(many, tmp_path / "many")
    assert a.names() == b.names() and all(g.sha256 for g in a.graphs)
    assert [g.sha256 for g in a.graphs] == [g.sha256 for g in b.graphs]  # byte-identical graphs


def test_bad_sharded_checkpoints_are_named(assets, sharded, tmp_path):
    import shutil

    from safetensors.torch import load_file

    root, *_ = assets
    bad = _asset_copy(sharded, tmp_path / "asset")
    gpt = bad / "gpt"
    index = json.loads((gpt / "model.safetensors.index.json").read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    shutil.copy(root / "gpt" / "model.safetensors", gpt / "model.safetensors")
    with pytest.raises(PipelineError, match="has both model.safetensors and model.safetensors.index.json"):
        load_weights(bad)
    (gpt / "model.safetensors").unlink()
    (gpt / "model.safetensors.index.json").rename(gpt / "index.bak")
    with pytest.raises(PipelineError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_weights(bad)
    (gpt / "index.bak").rename(gpt / "model.safetensors.index.json")
    # A tensor in two shards (the index can name only one of them).
    sd1, sd2 = load_file(str(gpt / first)), load_file(str(gpt / second))
    dup = next(iter(sd1))
    save_file({**sd2, dup: sd1[dup]}, str(gpt / second))
    with pytest.raises(PipelineError, match=rf"tensor {dup} is in two shards, {first} and {second}"):
        load_weights(bad)
    # A tensor the index places in another shard than the one holding it.
    save_file(sd2, str(gpt / second))
    moved = json.loads(json.dumps(index))
    moved["weight_map"][dup] = second
    (gpt / "model.safetensors.index.json").write_text(json.dumps(moved))
    with pytest.raises(PipelineError, match=rf"shards do not match the weight_map: {dup} \(in {first}, index says {second}\)"):
        load_weights(bad)
    (gpt / "model.safetensors.index.json").write_text(json.dumps(index))
    load_weights(bad)  # restored: loads again
    (gpt / second).unlink()
    with pytest.raises(PipelineError, match=rf"model.safetensors.index.json: lists shards that are missing: {second}$"):
        load_weights(bad)


def test_generate_offers_audio_code_mode_from_the_command_line(assets, tmp_path):
    """`pipeline generate --mode code`: the same frames as ChatTTS's greedy infer_code through PyTorch."""
    from conftest import cli

    root, llama, embed, c = assets
    export_modelset(load_weights(root), tmp_path / "gpt")
    res = cli("generate", str(tmp_path / "gpt"), "--mode", "code", "--ids", "3,14,15,92", "--steps", "12",
              "--json", str(tmp_path / "g.json"))
    assert res.code == 0, res.stderr
    got = json.loads((tmp_path / "g.json").read_text())
    assert got["mode"] == "code" and got["ids"] == reference_codes(llama, embed, c, [3, 14, 15, 92], 12)
    assert "frames (" in res.stdout
    res = cli("generate", str(tmp_path / "gpt"), "--mode", "speech", "--ids", "3")
    assert res.code == 2 and "not a ChatTTS mode (text, code)" in res.stderr
