"""Tortoise's GPT2 family: our modules against transformers' GPT2Model and against upstream Tortoise 3.0.0's
own UnifiedVoice, ONNX against both, the runtime, the sample head, the shipped recipes and bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import REPO, cli
from tiny_tortoise import SMALL, TEXT, decisive, latent_of

from pipeline.core.audio import sqnr_db
from pipeline.core.errors import PipelineError
from pipeline.families.tortoise.exporter import WEIGHTS_FILE, export_modelset
from pipeline.families.tortoise.model import TortoiseConfig
from pipeline.families.tortoise.runtime import TortoiseRuntime
from pipeline.families.tortoise.sample_head import SampleHead, TortoiseSampling
from pipeline.families.tortoise.weights import load_checkpoint


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    w = decisive(TortoiseConfig(**SMALL))
    folder = tmp_path_factory.mktemp("tortoise") / "ms"
    export_modelset(w, folder)
    return w, folder


def test_gpt2_stack_equals_transformers_gpt2model():
    from transformers import GPT2Config, GPT2Model

    w = decisive(TortoiseConfig(**SMALL))
    ours = w.model()
    hf = GPT2Model(GPT2Config(vocab_size=8, n_positions=256, n_embd=64, n_layer=3, n_head=4,
                              activation_function="gelu_new", layer_norm_epsilon=1e-5)).eval()
    missing, unexpected = hf.load_state_dict({k[4:]: v for k, v in w.state.items() if k.startswith("gpt.")},
                                             strict=False)
    assert sorted(missing) == ["wpe.weight", "wte.weight"] and unexpected == []  # Tortoise has neither
    with torch.no_grad():
        hf.wpe.weight.zero_()  # Tortoise's wpe: zeros
        x = torch.randn(1, 12, 64)
        ref = hf(inputs_embeds=x, use_cache=True)
        h, cache = ours.gpt(x, ours.empty_cache())
        np.testing.assert_allclose(h.numpy(), ref.last_hidden_state.numpy(), atol=2e-5)
        # and a decode step on the cache: one more position attends to all before it
        y = torch.randn(1, 1, 64)
        ref2 = hf(inputs_embeds=y, past_key_values=ref.past_key_values, use_cache=True)
        h2, _ = ours.gpt(y, cache)
        np.testing.assert_allclose(h2.numpy(), ref2.last_hidden_state.numpy(), atol=2e-5)


def test_onnx_graphs_equal_pytorch(small):
    w, folder = small
    m = w.model()
    mels = torch.randn(1, 2, 80, 37)
    s = {n: ort.InferenceSession(str(folder / f"{n}.onnx")) for n in ("conditioning", "prefill", "decode")}
    latent = m.conditioning(mels).detach()
    np.testing.assert_allclose(s["conditioning"].run(None, {"mels": mels.numpy()})[0], latent.numpy(), atol=1e-5)
    text, mel = torch.tensor([TEXT]), torch.tensor([[8192, 17, 300, 4]])
    logits, hidden, cache = m.prefill(text, latent, mel)
    out = s["prefill"].run(None, {"text_ids": text.numpy(), "cond_latent": latent.numpy(), "mel_ids": mel.numpy()})
    assert sqnr_db(logits.numpy(), out[0]) > 100 and sqnr_db(hidden.numpy(), out[1]) > 100
    assert out[2].shape == (1, 4, 1 + len(TEXT) + 2 + 4, 16)
    step = m.decode(torch.tensor([[77]]), 6, cache)
    feeds = {"mel_id": np.array([[77]]), "position": np.array([6])}
    feeds.update({f"past_{kv}_{n}": out[2 + 2 * n + (kv == "value")] for n in range(3) for kv in ("key", "value")})
    dec = s["decode"].run(None, feeds)
    assert sqnr_db(step[0].numpy(), dec[0]) > 100 and sqnr_db(step[1].numpy(), dec[1]) > 100
    assert dec[2].shape[2] == out[2].shape[2] + 1


def test_prefill_and_decode_share_one_weights_file(small):
    _, folder = small
    import onnx

    from pipeline.core.modelset import ModelSet

    weights = (folder / WEIGHTS_FILE).stat().st_size
    gpt_bytes = 4 * sum(v.numel() for k, v in decisive(TortoiseConfig(**SMALL)).state.items()
                        if not k.startswith(("conditioning_encoder", "text_head")))
    assert weights <= 1.1 * gpt_bytes  # one copy, not two
    for g in ("prefill", "decode"):
        assert (folder / f"{g}.onnx").stat().st_size < weights / 10
        m = onnx.load(str(folder / f"{g}.onnx"), load_external_data=False)
        assert {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"} == {WEIGHTS_FILE}
    ms = ModelSet.read(folder)
    ms.require_unchanged()
    assert ms.total_bytes() < 1.2 * weights + (folder / "conditioning.onnx").stat().st_size + 100_000


def test_runtime_greedy_equals_pytorch_loop_and_latents_equal_second_pass(small):
    w, folder = small
    m, latent = w.model(), latent_of(w)
    rt = TortoiseRuntime(folder)
    gen = rt.generate(TEXT, latent, 64)
    ref = m.greedy(torch.tensor([TEXT]), torch.from_numpy(latent), 64)
    assert gen.codes == ref and len(set(ref)) > 2  # token for token, and not one code repeated
    latents = rt.latents(TEXT, latent, gen.codes)
    assert sqnr_db(m.latents(torch.tensor([TEXT]), torch.from_numpy(latent), ref)[0].numpy(), latents) > 60
    # decode-time states: the first equals the latent pass's first row; later ones sit one position on
    assert sqnr_db(latents[0], gen.hidden[0]) > 60 and sqnr_db(latents[1:], gen.hidden[1:]) < 20


def test_sampling_is_reproducible_and_matches_transformers_processors():
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(3, 300) * 3
    seen = torch.zeros(3, 300, dtype=torch.bool)
    history = torch.tensor([[1, 1, 8 % 300, 17, 17, 250], [1, 5, 6, 7, 8, 9], [1, 2, 3, 200, 201, 202]])
    seen.scatter_(1, history, True)
    s = TortoiseSampling()
    expected = logits.clone()
    for p in (RepetitionPenaltyLogitsProcessor(s.repetition_penalty), TemperatureLogitsWarper(s.temperature),
              TopKLogitsWarper(s.top_k), TopPLogitsWarper(s.top_p)):
        expected = p(history, expected)
    _, probs = SampleHead()(logits, seen, torch.tensor([[s.temperature]]), torch.tensor([[s.repetition_penalty]]),
                            torch.tensor([[s.top_k]]), torch.tensor([[s.top_p]]), torch.rand(3, 1),
                            torch.tensor(False))
    np.testing.assert_allclose(probs.numpy(), expected.softmax(-1).numpy(), atol=1e-6)


def test_sampled_generation_is_reproducible_from_its_seed(small):
    w, folder = small
    rt = TortoiseRuntime(folder)
    latent = latent_of(w)
    a = rt.generate(TEXT, latent, 24, TortoiseSampling(), seed=3).codes
    assert a == rt.generate(TEXT, latent, 24, TortoiseSampling(), seed=3).codes
    assert a != rt.generate(TEXT, latent, 24, TortoiseSampling(), seed=4).codes


def test_checkpoint_with_legacy_buffers_loads_and_others_are_named(tmp_path):
    c = TortoiseConfig(**SMALL)
    w = decisive(c)
    state = dict(w.state)
    for n in range(c.layers):  # what releases carry from older transformers
        state[f"gpt.h.{n}.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8, dtype=torch.uint8))
        state[f"gpt.h.{n}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "autoregressive.pth")
    loaded = load_checkpoint(tmp_path / "autoregressive.pth", c)
    assert not loaded.seeded and set(loaded.state) == set(w.state)
    state["gpt.h.0.attn.q_norm.weight"] = torch.ones(64)
    del state["mel_head.bias"]
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(PipelineError, match=r"missing keys mel_head.bias.*unexpected keys.*gpt.h.0.attn.q_norm"):
        load_checkpoint(tmp_path / "odd.pth", c)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_bad_input_gets_one_line_and_no_traceback(small, tmp_path):
    w, folder = small
    np.save(tmp_path / "latent.npy", latent_of(w))
    np.save(tmp_path / "short.npy", np.zeros(10, np.float32))
    torch.save({"x": _RunsCode()}, tmp_path / "evil.pth")
    base = ["generate", str(folder), "--conditioning"]
    cases = {
        "wrong latent": (base + [str(tmp_path / "short.npy"), "--text-ids", "3,4"], "conditioning latent of shape [10]"),
        "text ids": (base + [str(tmp_path / "latent.npy"), "--text-ids", "3,256"], "outside the text vocabulary"),
        "steps": (base + [str(tmp_path / "latent.npy"), "--text-ids", "3", "--steps", "80"], "--steps 80"),
    }
    for what, (args, message) in cases.items():
        res = cli(*args)
        assert res.code != 0 and message in res.stderr and "Traceback" not in res.stderr, (what, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, (what, res.stderr)
    recipe = tmp_path / "r.yaml"
    for pth, message in ((tmp_path / "evil.pth", "refused: the pickle asks to run code"),):
        recipe.write_text(f"name: r\nmodel:\n  exporter: tortoise_gpt\n  params: {{checkpoint: {pth}, config: "
                          f"{json.dumps(SMALL)}}}\nsteps: []\n")
        res = cli("run", str(recipe), "--out", str(tmp_path / "run"))
        assert res.code != 0 and message in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_generate_cli_writes_codes_timings_and_arrays(small, tmp_path):
    w, folder = small
    np.save(tmp_path / "latent.npy", latent_of(w))
    out = tmp_path / "gen.json"
    res = cli("generate", str(folder), "--text-ids", ",".join(map(str, TEXT)), "--conditioning",
              str(tmp_path / "latent.npy"), "--steps", "20", "--greedy", "--json", str(out))
    assert res.code == 0, res.stderr
    data = json.loads(out.read_text())
    ref = w.model().greedy(torch.tensor([TEXT]), torch.from_numpy(latent_of(w)), 20)
    assert data["codes"] == ref and len(data["step_s"]) == 19
    arrays = np.load(data["arrays"])
    assert arrays["decode_hidden"].shape == (20, 64) and arrays["latents"].shape == (20, 64)
    assert res.stdout.startswith("note: seeded random weights")


@pytest.mark.parametrize("name", ["tortoise_int8", "tortoise_fp16", "tortoise_fp32"])
def test_shipped_tortoise_recipes_run_on_a_small_model(tmp_path, name):
    """The recipes as shipped, only the seeded model made small: export, pass, check with code-head metrics,
    latents and per-layer blocks inside the graphs."""
    import yaml

    recipe = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())
    recipe["model"]["params"]["config"] = {**SMALL, "model_dim": 128}  # blocks of 128 divide every input
    recipe["check"]["samples"] = 2
    for step in recipe["steps"]:  # per-layer expectations, for 3 layers
        if "expect_min_nodes" in step["params"]:  # 4 weight MatMuls a layer
            step["params"]["expect_min_nodes"] = 12
        if "expect" in step["params"]:
            step["params"]["expect"] = {op: 3 for op in step["params"]["expect"]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = cli("run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"))
    assert res.code == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["notes"][0].startswith("SEEDED RANDOM WEIGHTS")
    blocks = {b["block"]: b for b in report["blocks"]}
    assert {f"prefill/gpt/h.{n}" for n in range(3)} <= set(blocks)
    layer, outputs = blocks["prefill/gpt/h.1"], {o["name"]: o for o in report["outputs"]}
    embedding = blocks["prefill/mel_embedding"]["isolated"]["sqnr_db"]
    if name == "tortoise_fp32":  # only the decode cache moved in place: the same numbers
        assert layer["isolated"]["sqnr_db"] == "inf" and outputs["latents"]["sqnr_db"] == "inf"
        assert report["tokens"]["teacher_forced_top1_agreement"] == 1.0
    else:
        assert 20 < layer["isolated"]["sqnr_db"] < 90 and layer["bytes_candidate"] < layer["bytes_reference"]
        assert embedding == "inf" if name == "tortoise_int8" else embedding > 60  # FP16 rounds the table
        assert outputs["latents"]["sqnr_db"] > 25 and report["tokens"]["teacher_forced_top1_agreement"] > 0.5
    assert report["failures"] == []
    final = tmp_path / "run" / "final"
    graphs = sum((final / f"{g}.onnx").stat().st_size for g in ("prefill", "decode"))
    assert graphs < 0.2 * (final / "weights.bin").stat().st_size  # the same weights still, stored once
    assert ("decode/gpt/h.2" in blocks) == (name == "tortoise_fp16")  # in-place decode: other inputs
    rt = TortoiseRuntime(tmp_path / "run" / "final")  # and the result still generates
    assert len(rt.generate(TEXT, np.zeros((1, 128), np.float32), 8).codes) == 8


def _layer_norm(x: np.ndarray, weight: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.layer_norm(torch.from_numpy(x), weight.shape, weight, bias, 1e-5).numpy()


@pytest.mark.e2e
def test_full_size_export_equals_upstream_tortoise(tmp_path):
    """The one full-size export, against unmodified upstream Tortoise 3.0.0 (its UnifiedVoice on transformers
    4.48.3, in a child process: tortoise_upstream.py) with the same seeded checkpoint in the released layout,
    legacy buffers included: conditioning latent, 64 greedy codes with the KV cache token for token, the
    decode-time hidden states and the diffusion latents of the codes."""
    from tortoise_upstream import run_upstream

    c = TortoiseConfig()
    w = decisive(c)
    state = dict(w.state)
    for n in range(c.layers):
        state[f"gpt.h.{n}.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16, dtype=torch.uint8))
        state[f"gpt.h.{n}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "autoregressive.pth")
    norm_w, norm_b = w.state["final_norm.weight"], w.state["final_norm.bias"]
    fp32_gpt = 4 * sum(v.numel() for k, v in w.state.items() if not k.startswith(("conditioning", "text_head")))
    del state, w  # 1.7 GB: the export loads the file again
    text = np.array([TEXT], np.int64)
    mels = np.random.default_rng(0).standard_normal((1, 2, 80, 120)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", text_ids=text, cond_mels=mels)
    config = {k: getattr(c, k) for k in ("max_mel_tokens", "max_text_tokens", "max_conditioning_inputs", "layers",
                                         "model_dim", "heads", "number_text_tokens", "start_text_token")}
    up = run_upstream({"checkpoint": tmp_path / "autoregressive.pth", "config": config,
                       "inputs": tmp_path / "inputs.npz", "steps": 64}, tmp_path / "upstream")
    # ours, from the checkpoint file as a user gives it
    export_modelset(load_checkpoint(tmp_path / "autoregressive.pth"), tmp_path / "ms")
    files = {f.name: f.stat().st_size for f in (tmp_path / "ms").iterdir()}
    assert files["prefill.onnx"] + files["decode.onnx"] + files[WEIGHTS_FILE] <= 1.1 * fp32_gpt
    rt = TortoiseRuntime(tmp_path / "ms")
    latent = rt.conditioning(mels)
    assert sqnr_db(up["cond_latent"], latent) > 60
    gen = rt.generate(TEXT, latent, 64)
    codes = up["codes"][0].tolist()
    assert gen.codes == codes and len(codes) == 64
    assert sqnr_db(_layer_norm(up["decode_hidden"], norm_w, norm_b), gen.hidden) > 60
    assert sqnr_db(up["latents"][0], rt.latents(TEXT, latent, codes)) > 60


def test_calibration_capture_is_the_fp32_models_own_codes_teacher_forced(small):
    """Each sentence's prefill feed is the prompt + the FP32 model's greedy codes; its decode feed is the last
    step with the real decode-time cache (positions code k at k + 1)."""
    from pipeline.families.tortoise.check import capture_tortoise

    w, folder = small
    latent = latent_of(w)
    feeds = [{"text_ids": np.array([TEXT], np.int64), "cond_latent": latent, "mel_ids": np.array([[8192]])}]
    captured = capture_tortoise(folder, feeds, steps=12)
    codes = w.model().greedy(torch.tensor([TEXT]), torch.from_numpy(latent), 12)
    assert captured["prefill"][0]["mel_ids"].tolist() == [[8192, *codes[:-1]]]
    last = captured["decode"][0]
    assert last["mel_id"].tolist() == [[codes[-2]]] and last["position"].tolist() == [12]
    assert last["past_key_0"].shape[2] == 1 + len(TEXT) + 2 + 1 + len(codes) - 2
    assert captured["conditioning"][0]["mels"].shape[:3] == (1, 2, 80)


def test_static_int8_calibrates_on_captured_feeds(tmp_path):
    """A recipe whose pass needs calibration data gets each graph's inputs captured from the FP32 model."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: static
model: {{exporter: tortoise_gpt, params: {{config: {json.dumps(SMALL)}}}}}
calibration: {{source: tortoise, params: {{count: 3}}}}
steps:
  - name: qdq
    pass: quantize
    params: {{mode: static, op_types: [MatMul], expect_min_nodes: 12}}
    scope: {{graphs: [prefill, decode]}}
check: {{samples: 2, decode_steps: 8}}
""")
    res = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert res.code == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    blocks = {b["block"]: b for b in report["blocks"]}
    assert blocks["prefill/gpt/h.0"]["precision"].get("int8") and blocks["decode/gpt/h.0"]["precision"].get("int8")
