"""The `gguf` target of ChatTTS's GPT and Tortoise's GPT2: tensor names, shapes, types and metadata read back with
gguf-py's own reader; the package's numpy forward pass of one decoder layer from the file's dequantized tensors
against the exported ONNX layer run by ONNX Runtime (F32: the reference itself is right; F16, Q8_0: the file's
error); the target's check over every layer of every file, on the family's captured inputs (a file with one layer
wrong names that layer); the F32 file reproducing the embedding, norm and head graphs; and `auto` carrying the ONNX
steps' choices over."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from tiny_chattts import TINY
from tiny_tortoise import SMALL, TEXT, decisive, latent_of

from passes import get_pass
from passes.base import PassContext
from pipeline.core.audio import sqnr_db
from pipeline.core.blocks import BlockPartition
from pipeline.families.chattts import ChatTTSFamily, ChatTTSParams
from pipeline.families.chattts.exporter import GPTConfig, export_modelset, load_weights
from pipeline.families.tortoise import TortoiseFamily, TortoiseParams
from pipeline.families.tortoise.exporter import export_modelset as export_tortoise
from pipeline.families.tortoise.model import TortoiseConfig
from pipeline.formats.gguf import GGUFParams, read_file
from pipeline.core.modelset import ModelSet
from pipeline.core.onnx_io import session
from pipeline.core.recipe import Scope
from pipeline.formats.targets import FormatInputs, TargetJob

import gguf  # noqa: E402  (the dev extra installs it: never skipped)
from pipeline.families.chattts import gguf as chattts_gguf  # noqa: E402
from pipeline.families.tortoise import gguf as tortoise_gguf  # noqa: E402
from pipeline.families.chattts.gguf import chattts_layer  # noqa: E402
from pipeline.families.tortoise.gguf import layer_boundaries, norm, tortoise_layer  # noqa: E402

MIN_SQNR = {"f32": 100.0, "f16": 60.0, "q8_0": 35.0}  # dB, the layer's output against the ONNX FP32 layer's
LAYER = 1  # a middle layer: its input is a real hidden state, not an embedding


# -- fixtures: small models whose every weight matters ------------------------------------------------------
def sharp_chattts():
    """Seeded ChatTTS weights with matrices at std 0.1 and norms away from 1, so a layer's attention and MLP move
    its output well beyond the residual, and a mislaid norm shows."""
    w = load_weights(None, GPTConfig(**TINY), seed=3)
    gen = torch.Generator().manual_seed(4)
    for k, v in w.gpt.items():
        w.gpt[k] = v + 0.2 * torch.randn(v.shape, generator=gen) if v.ndim == 1 else v * 5
    return w


def sharp_tortoise():
    """`decisive` Tortoise weights (random biases and norms) with the GPT2 matrices at std 0.1."""
    w = decisive(TortoiseConfig(**SMALL))
    for k, v in w.state.items():
        if k.startswith("gpt.h.") and v.ndim == 2:
            w.state[k] = v * 5
    return w


@pytest.fixture(scope="module")
def chattts(tmp_path_factory):
    w = sharp_chattts()
    root = tmp_path_factory.mktemp("gguf_chattts")
    ms = export_modelset(w, root / "onnx")
    files = {t: root / f"chattts-{t}.gguf" for t in MIN_SQNR}
    written = {t: chattts_gguf.write_chattts_gguf(w, p, t) for t, p in files.items()}
    return w, ms, files, written


@pytest.fixture(scope="module")
def tortoise(tmp_path_factory):
    w = sharp_tortoise()
    root = tmp_path_factory.mktemp("gguf_tortoise")
    ms = export_tortoise(w, root / "onnx")
    files = {t: root / f"tortoise-{t}.gguf" for t in MIN_SQNR}
    written = {t: tortoise_gguf.write_tortoise_gguf(w, p, t) for t, p in files.items()}
    return w, ms, files, written


# -- reading a file with gguf-py itself ---------------------------------------------------------------------
class File:
    """A GGUF file through gguf.GGUFReader: metadata values, (name, numpy shape, type) and dequantized arrays."""

    def __init__(self, path: Path):
        self.reader = gguf.GGUFReader(str(path))
        self.tensors = {t.name: t for t in self.reader.tensors}

    def meta(self, key: str):
        return self.reader.fields[key].contents()

    def listing(self) -> list[tuple[str, tuple[int, ...], str]]:
        # the reader's shape is GGUF's ne: innermost first, the reverse of numpy's
        return [(t.name, tuple(int(n) for n in reversed(t.shape)), t.tensor_type.name.lower())
                for t in self.reader.tensors]

    def __call__(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(values, np.float64).reshape(tuple(int(n) for n in reversed(t.shape)))


def typed(shape: tuple[int, ...], kind: str) -> tuple[tuple[int, ...], str]:
    return shape, ("f32" if len(shape) == 1 else kind)


def expected_chattts(c: GPTConfig, kind: str) -> list[tuple[str, tuple[int, ...], str]]:
    h, i, v, a = c.hidden_size, c.intermediate_size, c.num_text_tokens, c.num_audio_tokens
    rows = [("token_embd_text.weight", (v, h))] + [(f"token_embd_code.{q}.weight", (a, h)) for q in range(c.num_vq)]
    for n in range(c.num_hidden_layers):
        rows += [(f"blk.{n}.{t}.weight", s) for t, s in (
            ("attn_norm", (h,)), ("attn_q", (h, h)), ("attn_k", (h, h)), ("attn_v", (h, h)),
            ("attn_output", (h, h)), ("ffn_norm", (h,)), ("ffn_gate", (i, h)), ("ffn_up", (i, h)),
            ("ffn_down", (h, i)))]
    rows += [("output_norm.weight", (h,)), ("output_text.weight", (v, h))]
    rows += [(f"output_code.{q}.weight", (a, h)) for q in range(c.num_vq)]
    return [(name, *typed(shape, kind)) for name, shape in rows]


def expected_tortoise(c: TortoiseConfig, kind: str) -> list[tuple[str, tuple[int, ...], str]]:
    d, f = c.model_dim, c.inner
    rows = [("token_embd_text", (c.text_vocab, d), False), ("token_embd_mel", (c.number_mel_codes, d), False),
            ("position_embd_text", (c.text_positions, d), False), ("position_embd_mel", (c.mel_positions, d), False)]
    for n in range(c.layers):
        rows += [(f"blk.{n}.{t}", s, True) for t, s in (
            ("attn_norm", (d,)), ("attn_qkv", (3 * d, d)), ("attn_output", (d, d)), ("ffn_norm", (d,)),
            ("ffn_up", (f, d)), ("ffn_down", (d, f)))]
    rows += [("output_norm", (d,), True), ("final_norm", (d,), True), ("output_text", (c.text_vocab, d), True),
             ("output_mel", (c.number_mel_codes, d), True)]
    out = []
    for name, shape, biased in rows:
        out.append((f"{name}.weight", *typed(shape, kind)))
        if biased:
            out.append((f"{name}.bias", (shape[0],), "f32"))
    return out


FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_chattts_file_lists_every_tensor_and_the_config(chattts, kind):
    w, _, files, written = chattts
    c = w.config
    f = File(files[kind])
    expected = expected_chattts(c, kind)
    assert f.listing() == expected
    # GGUF's ne: [in, out] for a matrix stored [out, in], as llama.cpp has them
    assert f.tensors["blk.0.ffn_down.weight"].shape.tolist() == [c.intermediate_size, c.hidden_size]
    assert [(e.name, e.shape, e.type) for e in written[kind].entries] == expected and not written[kind].notes
    assert f.meta("general.architecture") == "chattts" and f.meta("general.file_type") == FILE_TYPE[kind]
    values = {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
              "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
              "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_attention_heads,
              "rope.dimension_count": c.head_dim, "rope.layout": "neox", "num_vq": c.num_vq,
              "num_audio_tokens": c.num_audio_tokens, "num_text_tokens": c.num_text_tokens}
    assert {k: f.meta(f"chattts.{k}") for k in values} == values
    assert f.meta("chattts.attention.layer_norm_rms_epsilon") == pytest.approx(c.rms_norm_eps)
    assert f.meta("chattts.rope.freq_base") == pytest.approx(c.rope_theta)
    assert f.meta("general.description").startswith("untrained: seeded random weights")
    assert not any(k.startswith("tokenizer.") for k in f.reader.fields)


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_tortoise_file_lists_every_tensor_and_the_config(tortoise, kind):
    w, _, files, written = tortoise
    c = w.config
    f = File(files[kind])
    expected = expected_tortoise(c, kind)
    assert f.listing() == expected
    assert f.tensors["blk.0.attn_qkv.weight"].shape.tolist() == [c.model_dim, 3 * c.model_dim]  # ne: [in, out]
    assert [(e.name, e.shape, e.type) for e in written[kind].entries] == expected and not written[kind].notes
    assert f.meta("general.architecture") == "tortoise-gpt2" and f.meta("general.file_type") == FILE_TYPE[kind]
    values = {"context_length": c.text_positions + c.mel_positions, "embedding_length": c.model_dim,
              "block_count": c.layers, "feed_forward_length": 4 * c.model_dim, "attention.head_count": c.heads,
              "attention.head_count_kv": c.heads, "start_text_token": 255, "stop_text_token": 0,
              "start_mel_token": 8192, "stop_mel_token": 8193, "number_text_tokens": 255,
              "number_mel_codes": 8194, "text_positions": c.max_text_tokens + 2,
              "mel_positions": c.max_mel_tokens + 4, "max_conditioning_inputs": 2}
    assert {k: f.meta(f"tortoise-gpt2.{k}") for k in values} == values
    assert f.meta("tortoise-gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert not any(k.startswith(("tokenizer.", "tortoise-gpt2.rope")) for k in f.reader.fields)


# -- the ONNX side -------------------------------------------------------------------------------------------------
def run(ms: ModelSet, graph: str, feeds: dict, expose: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Every output of `graph`, and the intermediate tensors `expose` made outputs too."""
    model = ms.load(graph)
    for name in expose:
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def chattts_layer_feeds(ms: ModelSet, c: GPTConfig, cached: int = 5, new: int = 4) -> dict[str, np.ndarray]:
    """layer LAYER's real inputs: the hidden states of `new` tokens after `cached` ones (through the embedding and
    the layers before it, causal, so one pass over all tokens gives them) and the cache of the `cached` ones."""
    ids = np.random.default_rng(5).integers(0, c.num_text_tokens, (1, cached + new))
    hidden = run(ms, "embed_text", {"input_ids": ids})["hidden"]
    empty = np.zeros((1, c.num_attention_heads, 0, c.head_dim), np.float32)
    for n in range(LAYER):
        hidden = run(ms, f"layer_{n:02d}", {"hidden": hidden, "past_key": empty, "past_value": empty})["hidden_out"]
    prefix = run(ms, f"layer_{LAYER:02d}", {"hidden": hidden[:, :cached], "past_key": empty, "past_value": empty})
    return {"hidden": hidden[:, cached:], "past_key": prefix["present_key"], "past_value": prefix["present_value"]}


def test_chattts_layer_from_the_file_matches_the_onnx_layer(chattts):
    w, ms, files, _ = chattts
    feeds = chattts_layer_feeds(ms, w.config)
    ref = run(ms, f"layer_{LAYER:02d}", feeds)
    assert feeds["past_key"].shape[2] == 5  # the cache is there: positions start at 5, which RoPE must honour
    for kind, path in files.items():
        out, key, value = chattts_layer(File(path), LAYER, feeds["hidden"][0].astype(np.float64),
                                        feeds["past_key"][0], feeds["past_value"][0])
        got = check_layer(f"chattts {kind}", kind, ref["hidden_out"][0], out, feeds["hidden"][0])
        assert got >= MIN_SQNR[kind]
        assert sqnr_db(ref["present_key"][0], key) >= MIN_SQNR[kind] - 10  # K after RoPE, cache included
        assert sqnr_db(ref["present_value"][0], value) >= MIN_SQNR[kind] - 10


def check_layer(what: str, kind: str, ref: np.ndarray, out: np.ndarray, x: np.ndarray) -> float:
    """SQNR of the layer's output (returned), and of its own contribution, output minus input: the part the
    file's weights make, which the residual cannot mask (held to nearly the same bar). Both printed."""
    whole, own = sqnr_db(ref, out), sqnr_db(ref - x, out - x)
    print(f"{what}: layer {LAYER} output SQNR {whole:.1f} dB, its own contribution {own:.1f} dB")
    assert own >= MIN_SQNR[kind] - 6  # the branch, not only the residual, carries the file's precision
    return whole


def layer_boundary(ms: ModelSet, graph: str, n: int) -> tuple[str, str]:
    """Block /gpt/h.N's input and output tensors inside a Tortoise graph: ln_1's input and the block's last Add."""
    return layer_boundaries(ms.load(graph), n + 1)[n]


def test_tortoise_layer_from_the_file_matches_the_onnx_layer(tortoise):
    """Layer LAYER inside prefill (the prompt and five codes, no cache) and inside decode (one code after the
    prefill's cache)."""
    w, ms, files, _ = tortoise
    start = w.config.start_mel_token
    prefill_feeds = {"text_ids": np.array([TEXT]), "cond_latent": latent_of(w),
                     "mel_ids": np.array([[start, 17, 300, 4, 99]])}
    pin, pout = layer_boundary(ms, "prefill", LAYER)
    pre = run(ms, "prefill", prefill_feeds, (pin, pout))
    decode_feeds = {"mel_id": np.array([[77]]), "position": np.array([6]),
                    **{f"past_{kv}_{n}": pre[f"present_{kv}_{n}"] for n in range(w.config.layers)
                       for kv in ("key", "value")}}
    din, dout = layer_boundary(ms, "decode", LAYER)
    dec = run(ms, "decode", decode_feeds, (din, dout))
    empty = np.zeros((w.config.heads, 0, w.config.head_dim))
    for kind, path in files.items():
        f = File(path)
        out, key, _ = tortoise_layer(f, LAYER, pre[pin][0].astype(np.float64), empty, empty)
        assert check_layer(f"tortoise prefill {kind}", kind, pre[pout][0], out, pre[pin][0]) >= MIN_SQNR[kind]
        assert sqnr_db(pre[f"present_key_{LAYER}"][0], key) >= MIN_SQNR[kind] - 10
        out, _, _ = tortoise_layer(f, LAYER, dec[din][0].astype(np.float64), decode_feeds[f"past_key_{LAYER}"][0],
                                   decode_feeds[f"past_value_{LAYER}"][0])
        assert check_layer(f"tortoise decode {kind}", kind, dec[dout][0], out, dec[din][0]) >= MIN_SQNR[kind]


class Edited(File):
    """A file read back with some tensors replaced: what a wrong mapping would have written."""

    def __init__(self, f: File, replaced: dict[str, np.ndarray]):
        self.reader, self.tensors, self.replaced = f.reader, f.tensors, replaced

    def __call__(self, name: str) -> np.ndarray:
        return self.replaced[name] if name in self.replaced else super().__call__(name)


def llama_permuted(w: np.ndarray, heads: int) -> np.ndarray:
    """Q/K rows reordered the way llama.cpp's converter does for `llama` (interleaved rope pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def test_the_f32_bar_fails_a_reference_or_file_slightly_wrong(chattts, tortoise):
    """The F32 check is what proves the reference right: a mislaid norm, Q/K in llama.cpp's permuted rope layout,
    or a GPT2 Conv1D weight left [in, out], each fails it."""
    w, ms, files, _ = chattts
    feeds = chattts_layer_feeds(ms, w.config)
    ref = run(ms, f"layer_{LAYER:02d}", feeds)["hidden_out"][0]
    f, b = File(files["f32"]), f"blk.{LAYER}."
    heads = w.config.num_attention_heads
    wrongs = {"swapped norms": Edited(f, {b + "attn_norm.weight": f(b + "ffn_norm.weight"),
                                          b + "ffn_norm.weight": f(b + "attn_norm.weight")}),
              "llama.cpp rope layout": Edited(f, {b + f"attn_{t}.weight": llama_permuted(f(b + f"attn_{t}.weight"),
                                                                                         heads) for t in "qk"})}
    for why, wrong in wrongs.items():
        out, _, _ = chattts_layer(wrong, LAYER, feeds["hidden"][0].astype(np.float64), feeds["past_key"][0],
                                  feeds["past_value"][0])
        print(f"chattts f32, {why}: {sqnr_db(ref, out):.1f} dB")
        assert sqnr_db(ref, out) < MIN_SQNR["f32"] - 40, why

    tw, tms, tfiles, _ = tortoise
    pin, pout = layer_boundary(tms, "prefill", LAYER)
    pre = run(tms, "prefill", {"text_ids": np.array([TEXT]), "cond_latent": latent_of(tw),
                               "mel_ids": np.array([[tw.config.start_mel_token, 5]])}, (pin, pout))
    f = File(tfiles["f32"])
    wrong = Edited(f, {f"blk.{LAYER}.attn_output.weight": f(f"blk.{LAYER}.attn_output.weight").T})
    empty = np.zeros((tw.config.heads, 0, tw.config.head_dim))
    out, _, _ = tortoise_layer(wrong, LAYER, pre[pin][0].astype(np.float64), empty, empty)
    print(f"tortoise f32, attn_output left [in, out]: {sqnr_db(pre[pout][0], out):.1f} dB")
    assert sqnr_db(pre[pout][0], out) < MIN_SQNR["f32"] - 40


# -- the target's check: every layer of every file, fed the FP32 layers' captured inputs ----------------------------
def check_folder(tmp_path: Path, files: dict[str, Path], wrong: tuple) -> list[str]:
    """The fixture's files (linked) and one written with a layer wrong, in one folder, as final/gguf/ holds them."""
    for path in files.values():
        (tmp_path / path.name).symlink_to(path)
    name, weights, write = wrong
    write(weights, tmp_path / name, "f32")
    return [p.name for p in files.values()] + [name]


def assert_check(results, names: list[str], kinds: dict[str, str], wrong: str, wrong_layer: int, compared: str):
    """Every file has its result; each good file clears its type's bar, the wrong one names its wrong layer."""
    assert [r.file for r in results] == names
    for r in results:
        print(f"{r.file}: SQNR {r.sqnr_db:.1f} dB, worst {r.worst}")
        assert r.format == "gguf" and r.compared == compared and r.note is None
        assert re.fullmatch(r"blk\.\d+", r.worst)
        if r.file == wrong:
            assert r.worst == f"blk.{wrong_layer}" and r.sqnr_db < MIN_SQNR["q8_0"] - 10  # far below any bar
        else:
            assert r.sqnr_db >= MIN_SQNR[kinds[r.file]], r.file


def test_chattts_check_measures_every_layer_and_names_a_wrong_one(chattts, tmp_path):
    w, ms, files, _ = chattts
    # layer 2's MLP output half again too large: what a writer that mislaid a scale would make
    key = "layers.2.mlp.down_proj.weight"
    wrong = ("chattts-wrong.gguf", replace(w, gpt={**w.gpt, key: w.gpt[key] * 1.5}), chattts_gguf.write_chattts_gguf)
    names = check_folder(tmp_path, files, wrong)
    rng = np.random.default_rng(7)
    feeds = [{"input_ids": rng.integers(0, w.config.num_text_tokens, (1, n))} for n in (6, 11)]
    family, cache = ChatTTSFamily(), {}
    inputs = FormatInputs(tmp_path, names, ChatTTSParams(config=TINY), Path, ms, feeds,
                          lambda graph: family.capture(ms, feeds, graph, cache, lambda done, total: None))
    assert chattts_gguf.GGUF_TARGET.check is chattts_gguf.check_gguf
    results = chattts_gguf.check_gguf(inputs)
    compared = "decoder layers from the file, each fed the FP32 ONNX layer's inputs (isolated), on 2 prompts"
    assert_check(results, names, {p.name: k for k, p in files.items()}, "chattts-wrong.gguf", 2, compared)
    assert len(cache["layer_02"]) == 4  # a prefill and a decode step (with its cache) per prompt


def test_tortoise_check_measures_every_layer_and_names_a_wrong_one(tortoise, tmp_path):
    w, ms, files, _ = tortoise
    key = "gpt.h.2.attn.c_proj.weight"  # block 2's attention output half again too large
    wrong = ("tortoise-wrong.gguf", replace(w, state={**w.state, key: w.state[key] * 1.5}),
             tortoise_gguf.write_tortoise_gguf)
    names = check_folder(tmp_path, files, wrong)
    feeds = [{"text_ids": np.array([t]), "cond_latent": latent_of(w)} for t in (TEXT, TEXT[:5])]
    family, cache = TortoiseFamily(), {}
    inputs = FormatInputs(tmp_path, names, TortoiseParams(config=SMALL), Path, ms, feeds,
                          lambda graph: family.capture(ms, feeds, graph, cache, lambda done, total: None))
    assert tortoise_gguf.GGUF_TARGET.check is tortoise_gguf.check_gguf
    results = tortoise_gguf.check_gguf(inputs)
    compared = ("decoder layers from the file, each fed the FP32 ONNX layer's inputs (isolated, inside prefill), "
                "on 2 sentences")
    assert_check(results, names, {p.name: k for k, p in files.items()}, "tortoise-wrong.gguf", 2, compared)


def test_check_leaves_a_file_of_another_config_unchecked(chattts, tmp_path):
    w, ms, _, _ = chattts
    other = load_weights(None, GPTConfig(**{**TINY, "num_hidden_layers": 2}))
    chattts_gguf.write_chattts_gguf(other, tmp_path / "other.gguf", "f16")
    feeds = [{"input_ids": np.array([[1, 2, 3, 4]])}]
    family, cache = ChatTTSFamily(), {}
    inputs = FormatInputs(tmp_path, ["other.gguf"], ChatTTSParams(config=TINY), Path, ms, feeds,
                          lambda graph: family.capture(ms, feeds, graph, cache, lambda done, total: None))
    (r,) = chattts_gguf.check_gguf(inputs)
    assert r.sqnr_db is None and r.worst is None and "block_count 2 (the FP32 ONNX: 3)" in r.note


# -- the F32 file against the graphs around the layers -------------------------------------------------------------
def test_chattts_f32_file_reproduces_the_embedding_norm_and_head_graphs(chattts):
    w, ms, files, _ = chattts
    c, f = w.config, File(files["f32"])
    rng = np.random.default_rng(6)
    ids = rng.integers(0, c.num_text_tokens, (1, 7))
    assert sqnr_db(run(ms, "embed_text", {"input_ids": ids})["hidden"][0], f("token_embd_text.weight")[ids[0]]) > 100
    codes = rng.integers(0, c.num_audio_tokens, (1, 7, c.num_vq))
    summed = sum(f(f"token_embd_code.{q}.weight")[codes[0, :, q]] for q in range(c.num_vq))
    assert sqnr_db(run(ms, "embed_code", {"input_ids": codes})["hidden"][0], summed) > 100
    h = rng.standard_normal((1, 7, c.hidden_size)).astype(np.float32)
    x = h[0].astype(np.float64)
    eps = f.meta("chattts.attention.layer_norm_rms_epsilon")
    normed = f("output_norm.weight") * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    assert sqnr_db(run(ms, "norm", {"hidden": h})["hidden_out"][0], normed) > 100
    assert sqnr_db(run(ms, "lm_head_text", {"hidden": h})["logits"][0], x @ f("output_text.weight").T) > 100
    per_codebook = np.stack([x @ f(f"output_code.{q}.weight").T for q in range(c.num_vq)], axis=-1)
    assert sqnr_db(run(ms, "lm_head_code", {"hidden": h})["logits"][0], per_codebook) > 100


def test_tortoise_f32_file_reproduces_the_prompt_positions_and_heads(tortoise):
    """The first layer's input (latent, text and mel embeddings at their learned positions, in prefill and at a
    decode position) and the outputs after the last layer (ln_f, final_norm, mel head)."""
    w, ms, files, _ = tortoise
    c, f = w.config, File(files["f32"])
    mel, text, latent = [c.start_mel_token, 17, 300, 4], [c.start_text_token, *TEXT, c.stop_text_token], latent_of(w)
    first, _ = layer_boundary(ms, "prefill", 0)
    _, last = layer_boundary(ms, "prefill", c.layers - 1)
    out = run(ms, "prefill", {"text_ids": np.array([TEXT]), "cond_latent": latent, "mel_ids": np.array([mel])},
              (first, last))
    prompt = np.concatenate([latent, f("token_embd_text.weight")[text] + f("position_embd_text.weight")[:len(text)],
                             f("token_embd_mel.weight")[mel] + f("position_embd_mel.weight")[:len(mel)]])
    assert sqnr_db(out[first][0], prompt) > 100
    hidden = norm(f, "final_norm", norm(f, "output_norm", out[last][0].astype(np.float64)))
    assert sqnr_db(out["hidden"][0], hidden[-len(mel):]) > 100
    logits = hidden[-len(mel):] @ f("output_mel.weight").T + f("output_mel.bias")
    assert sqnr_db(out["logits"][0], logits) > 100
    first, _ = layer_boundary(ms, "decode", 0)
    feeds = {"mel_id": np.array([[77]]), "position": np.array([6]),
             **{f"past_{kv}_{n}": out[f"present_{kv}_{n}"] for n in range(c.layers) for kv in ("key", "value")}}
    step = run(ms, "decode", feeds, (first,))[first][0]
    assert sqnr_db(step, f("token_embd_mel.weight")[[77]] + f("position_embd_mel.weight")[[6]]) > 100
    # the text head is in no graph (inference reads the mel head only): the weights themselves
    np.testing.assert_array_equal(f("output_text.weight"), w.state["text_head.weight"].numpy())
    np.testing.assert_array_equal(f("output_text.bias"), w.state["text_head.bias"].numpy())


# -- auto: the ONNX steps' choices carried over -----------------------------------------------------------------
def apply_pass(model: onnx.ModelProto, graph: str, step: dict, workdir: Path) -> onnx.ModelProto:
    """One of the project's passes, as a recipe step would run it: {"pass", "params", "scope" (a block or None)}."""
    p = get_pass(step["pass"])
    blocks = BlockPartition(model)
    selected = None if step.get("scope") is None else blocks.select(Scope(include=[step["scope"]]))
    result = p.apply(model, p.Params.model_validate(step["params"]), PassContext(graph, blocks, selected, workdir))
    assert result.changed
    return result.model


def weight_only(bits: int, scope: str | None = None) -> dict:
    """quantize, weight_only: MatMulNBits in `bits`."""
    return {"pass": "quantize", "params": {"mode": "weight_only", "bits": bits, "block_size": 32}, "scope": scope}


def quantized_copy(ms: ModelSet, dest: Path, steps: list[tuple[str, dict]]) -> ModelSet:
    """A copy of `ms` as a recipe's steps would leave it: (graph, step) applied in order."""
    dest.mkdir(parents=True)
    out = ms.derive(dest)
    for name in ms.names():
        mine = [step for graph, step in steps if graph == name]
        if not mine:
            out.copy_graph_from(ms, name)
            continue
        model = ms.load(name)
        for step in mine:
            model = apply_pass(model, name, step, dest)
        out.save_graph(name, model)
    out.write_manifest()
    return out


def job_for(params, final: ModelSet, dest: Path, **gguf_params) -> TargetJob:
    return TargetJob(GGUFParams(**gguf_params), params, Path, final, dest)


def test_chattts_auto_carries_each_graphs_precision_over(chattts, tmp_path):
    _, ms, _, _ = chattts
    fp16 = {"pass": "fp16", "params": {}}
    final = quantized_copy(ms, tmp_path / "final", [("layer_01", weight_only(8)), ("layer_02", weight_only(4)),
                                                     ("embed_code", fp16), ("lm_head_text", fp16)])
    job = job_for(ChatTTSParams(config=TINY, seed=3), final, tmp_path / "gguf", types=["auto", "f16"])
    chattts_gguf.write_gguf(job)
    assert sorted(p.name for p in job.dest.iterdir()) == ["chattts-gpt-f16.gguf", "chattts-gpt-mixed.gguf"]
    f = File(job.dest / "chattts-gpt-mixed.gguf")
    carried = {"blk.1.": "q8_0", "blk.2.": "q4_0", "token_embd_code.": "f16", "output_text.": "f16"}
    for name, shape, kind in f.listing():
        want = next((t for prefix, t in carried.items() if name.startswith(prefix)), "f32")
        assert kind == (want if len(shape) == 2 else "f32"), name
    assert f.meta("general.file_type") == 0  # F32 holds most of the parameters
    assert any("chattts-gpt-mixed.gguf" in n and "Q8_0: layer_01" in n and "Q4_0: layer_02" in n
               and "F16: embed_code, lm_head_text" in n for n in job.notes), job.notes
    assert {k for _, _, k in File(job.dest / "chattts-gpt-f16.gguf").listing()} == {"f16", "f32"}


def test_tortoise_auto_reads_the_blocks_inside_prefill_and_decode(tortoise, tmp_path):
    """/gpt/h.1 in 8 bits and the mel head in 4 bits in both graphs; /gpt/h.2 in 8 bits in decode only, so the
    file keeps it F32 (the wider) and says so."""
    _, ms, _, _ = tortoise
    steps = [(g, weight_only(8, r"/gpt/h\.1")) for g in ("prefill", "decode")]
    steps += [(g, weight_only(4, "/mel_head")) for g in ("prefill", "decode")]
    final = quantized_copy(ms, tmp_path / "final", steps + [("decode", weight_only(8, r"/gpt/h\.2"))])
    job = job_for(TortoiseParams(config=SMALL), final, tmp_path / "gguf")
    tortoise_gguf.write_gguf(job)
    assert [p.name for p in job.dest.iterdir()] == ["tortoise-gpt2-mixed.gguf"]
    kinds = {name: kind for name, _, kind in File(job.dest / "tortoise-gpt2-mixed.gguf").listing()}
    for name, kind in kinds.items():
        want = ("q8_0" if name.startswith("blk.1.") else "q4_0" if name.startswith("output_mel.") else "f32")
        assert kind == (want if name.endswith(".weight") and "norm" not in name else "f32"), name
    assert any("/gpt/h.2 is fp32 in prefill, int8 in decode" in n for n in job.notes), job.notes


def test_auto_over_an_unquantized_result_is_the_f32_file_written_once(chattts, tmp_path):
    _, ms, _, _ = chattts
    job = job_for(ChatTTSParams(config=TINY), ms, tmp_path / "gguf", types=["f32", "auto"])
    chattts_gguf.write_gguf(job)
    assert [p.name for p in job.dest.iterdir()] == ["chattts-gpt-f32.gguf"]
    assert any("the same file" in n for n in job.notes) and any("untrained" in n for n in job.notes)


def test_auto_refuses_a_result_of_another_config(chattts, tmp_path):
    from pipeline.core.errors import PipelineError

    _, ms, _, _ = chattts
    job = job_for(ChatTTSParams(config={**TINY, "num_text_tokens": 98}), ms, tmp_path / "gguf")
    with pytest.raises(PipelineError, match="another ChatTTS config"):
        chattts_gguf.write_gguf(job)


# -- type rules and parameters ---------------------------------------------------------------------------------------
def test_q8_0_rows_not_a_multiple_of_32_are_f16_with_a_note(tmp_path):
    c = GPTConfig(**{**TINY, "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 1})
    written = chattts_gguf.write_chattts_gguf(load_weights(None, c), tmp_path / "odd.gguf", "q8_0")
    kinds = {name: kind for name, _, kind in File(tmp_path / "odd.gguf").listing()}
    assert kinds == {e.name: e.type for e in written.entries}
    assert kinds["blk.0.ffn_down.weight"] == "q8_0"  # rows of 64
    assert kinds["blk.0.attn_q.weight"] == kinds["token_embd_text.weight"] == "f16"  # rows of 48
    assert kinds["blk.0.attn_norm.weight"] == "f32"
    assert len(written.notes) == 1 and "blk.0.attn_q.weight (rows of 48 are not a multiple of 32)" in written.notes[0]
    back = read_file(gguf, tmp_path / "odd.gguf")  # the helper's reader agrees with gguf-py's, values included
    assert back.entries == written.entries and back.metadata["chattts.embedding_length"] == 48
    name = "blk.0.ffn_down.weight"
    np.testing.assert_array_equal(back.array(name), File(tmp_path / "odd.gguf")(name))


def test_params_and_targets():
    from pydantic import ValidationError

    assert GGUFParams().types == ["auto"]
    for bad in ({"types": ["q4_k"]}, {"types": ["f16", "f16"]}, {"types": []}, {"type": ["f16"]}):
        with pytest.raises(ValidationError):
            GGUFParams.model_validate(bad)
    assert all(field.description for field in GGUFParams.model_fields.values())
    for module in (chattts_gguf, tortoise_gguf):
        target = module.GGUF_TARGET
        assert (target.format, target.Params, target.write, target.needs) == ("gguf", GGUFParams, module.write_gguf,
                                                                             (("gguf", "gguf"),))
        assert target.missing_package() is None and target.description


# -- the shipped recipes, through `pipeline run` ----------------------------------------------------------------
SHIPPED = {"chattts_gguf": ({**{k: v for k, v in TINY.items() if k != "max_position_embeddings"}, "hidden_size": 128,
                             "intermediate_size": 256}, "chattts-gpt", "blk.1.attn_q.weight", "token_embd_text.weight"),
           "tortoise_gguf": ({**SMALL, "model_dim": 128}, "tortoise-gpt2", "blk.1.attn_qkv.weight",
                             "token_embd_mel.weight")}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_gguf_recipes_write_every_file_through_the_run(tmp_path, name):
    """The recipe as shipped, only the seeded model made small (as the int8 recipes' tests do): the run writes
    F16, Q8_0 and the steps' own mix into final/gguf/, says what carried over, and `pipeline inspect` lists them."""
    import json

    import yaml
    from conftest import REPO, cli

    config, stem, layer_matrix, embedding = SHIPPED[name]
    recipe = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())
    recipe["model"]["params"]["config"] = config
    recipe["check"]["samples"] = 2
    for step in recipe["steps"]:  # per-layer expectations, for the small model's 3 layers
        if name == "tortoise_gguf" and "expect_min_nodes" in step["params"]:
            step["params"]["expect_min_nodes"] = 12
        if name == "tortoise_gguf" and "expect" in step["params"]:
            step["params"]["expect"] = {op: 3 for op in step["params"]["expect"]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = cli("run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"))
    assert res.code == 0, res.stderr[-2000:]
    folder = tmp_path / "run" / "final" / "gguf"
    files = {f"{stem}-{t}.gguf" for t in ("f16", "q8_0", "mixed")}
    assert {p.name for p in folder.glob("*.gguf")} == files
    record = json.loads((tmp_path / "run" / "manifest.json").read_text())["final"]["targets"]["gguf"]
    assert set(record["files"]) == files and any("carried over (" in n for n in record["notes"])
    mixed = {e.name: e.type for e in read_file(gguf, folder / f"{stem}-mixed.gguf").entries}
    assert mixed[layer_matrix] == "q8_0" and mixed[embedding] == "f32"  # INT8 layers, FP32 embeddings
    checked = {f["file"]: f for f in json.loads((tmp_path / "run" / "report.json").read_text())["formats"]}
    assert set(checked) == files  # each file, its decoder layers against the FP32 ONNX layers (isolated)
    for kind in ("f16", "q8_0"):
        result = checked[f"{stem}-{kind}.gguf"]
        assert result["sqnr_db"] >= MIN_SQNR[kind] and result["worst"].startswith("blk.")
    assert f"format gguf {stem}-q8_0.gguf: decoder layers" in res.stdout
    listed = cli("inspect", str(tmp_path / "run"))
    assert listed.code == 0 and all(f"gguf/{f}" in listed.stdout for f in files), listed.stdout
