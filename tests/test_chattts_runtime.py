"""ChatTTS runtime over io_binding: the tokens and logits of a plain `session.run` chain, in preallocated buffers."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.families.chattts.exporter import GPTConfig, export_modelset, load_weights
from pipeline.families.chattts.runtime import ChatTTSRuntime, SamplingParams, infer_code_sampling

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3,
            max_position_embeddings=256, num_text_tokens=97, num_audio_tokens=211, num_vq=4)


@pytest.fixture(scope="module")
def rt(tmp_path_factory) -> ChatTTSRuntime:
    w = load_weights(None, GPTConfig(**TINY), seed=11)
    # Sharper than the seeded init (std 0.02), so greedy decoding has clear winners and varied tokens.
    w.gpt = {k: v if "norm" in k else v * 5 for k, v in w.gpt.items()}
    w.embed = {k: v * 15 if k.startswith("emb_") else v for k, v in w.embed.items()}
    folder = tmp_path_factory.mktemp("gpt")
    export_modelset(w, folder)
    return ChatTTSRuntime(folder)


class PlainChain:
    """The straightforward reference: `session.run` on numpy arrays, a new cache returned by every layer."""

    def __init__(self, rt: ChatTTSRuntime, head: str):
        self.rt, self.head, self.cache = rt, head, [(rt.empty_kv(), rt.empty_kv()) for _ in rt.layers]

    def forward(self, embed: str, ids: np.ndarray) -> np.ndarray:
        s = self.rt.sessions
        hidden = s[embed].run(None, {"input_ids": ids})[0]
        new = []
        for name, (k, v) in zip(self.rt.layers, self.cache):
            hidden, k, v = s[name].run(None, {"hidden": hidden, "past_key": k, "past_value": v})
            new.append((k, v))
        self.cache = new
        hidden = s["norm"].run(None, {"hidden": hidden[:, -1:]})[0]
        return s[self.head].run(None, {"hidden": hidden})[0]


def plain_text(rt: ChatTTSRuntime, prompt: list[int], steps: int, sampling: SamplingParams | None) -> list[int]:
    chain, rng = PlainChain(rt, "lm_head_text"), np.random.default_rng(sampling.seed if sampling else 0)
    ids: list[int] = []
    logits = chain.forward("embed_text", np.array([prompt], np.int64))
    for _ in range(steps):
        ids.append(rt._next(logits[0, -1], ids, sampling, rng))
        logits = chain.forward("embed_text", np.array([[ids[-1]]], np.int64))
    return ids


def plain_codes(rt: ChatTTSRuntime, prompt: list[int], max_frames: int, sampling: SamplingParams | None):
    chain, rng = PlainChain(rt, "lm_head_code"), np.random.default_rng(sampling.seed if sampling else 0)
    vq, eos = TINY["num_vq"], TINY["num_audio_tokens"] - 1
    frames: list[list[int]] = []
    logits = chain.forward("embed_text", np.array([prompt], np.int64))
    for _ in range(max_frames):
        rows = logits[0, -1].T
        frame = [rt._next(rows[q], [f[q] for f in frames], sampling, rng) for q in range(vq)]
        if eos in frame:
            break
        frames.append(frame)
        logits = chain.forward("embed_code", np.array([[frame]], np.int64))
    return frames


def test_logits_and_caches_match_the_plain_chain_in_buffers_allocated_once(rt):
    prompt, steps = [3, 14, 15, 92, 65], 24
    dec, ref = rt.decoder(len(prompt), steps), PlainChain(rt, "lm_head_text")
    buffers = dec.kv.pointers()
    hidden = {b.ctypes.data for b in dec.hidden}
    ids = np.array([prompt], np.int64)
    for step in range(steps):
        got, want = dec.forward("embed_text", ids), ref.forward("embed_text", ids)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for name, past, (k, v) in zip(rt.layers, dec.kv.past, ref.cache):
            np.testing.assert_array_equal(past[0].numpy(), k)
            np.testing.assert_array_equal(past[1].numpy(), v)
            # ORT wrote every output where it was bound: into the buffers made before the first step.
            written = [o.data_ptr() for o in dec.bindings[name].get_outputs()]
            assert set(written) <= buffers | hidden and {p.data_ptr() for p in past} <= buffers
        assert dec.kv.pointers() == buffers and dec.kv.length == len(prompt) + step
        ids = np.array([[int(np.argmax(got[0, -1]))]], np.int64)
    assert dec.kv.past[0][0].data_ptr() in buffers
    with pytest.raises(PipelineError, match="KV cache full"):
        dec.forward("embed_text", np.array([[1, 2]], np.int64))


def test_greedy_text_matches_the_plain_chain(rt):
    prompt = [3, 14, 15, 92, 65, 35]
    got = rt.generate_text(prompt, 48)
    assert got.ids == plain_text(rt, prompt, 48, None)
    assert len(got.step_s) == 47 and got.prefill_s > 0
    assert len(set(got.ids)) > 3  # a real sequence, not one token repeated


def test_greedy_codes_match_the_plain_chain(rt):
    lengths = []
    for prompt in ([3, 14, 15, 92], [65, 35, 89, 79, 32], [38, 46]):
        frames, timing = rt.generate_codes(prompt, 16)
        assert frames == plain_codes(rt, prompt, 16, None)
        assert timing.ids == [c for f in frames for c in f]
        lengths.append(len(frames))
    assert max(lengths) >= 5  # long enough for the cache to matter


def test_sampled_modes_are_reproducible_and_match_the_plain_chain(rt):
    params = SamplingParams(seed=5, temperature=1.0, top_p=0.95, top_k=40)
    a = rt.generate_text([3, 14, 15], 24, params).ids
    assert a == rt.generate_text([3, 14, 15], 24, params).ids == plain_text(rt, [3, 14, 15], 24, params)
    assert a != rt.generate_text([3, 14, 15], 24, SamplingParams(seed=6, temperature=1.0, top_p=0.95, top_k=40)).ids
    codes, _ = rt.generate_codes([3, 14], 12, infer_code_sampling(seed=1))
    assert codes == rt.generate_codes([3, 14], 12, infer_code_sampling(seed=1))[0]
    assert codes == plain_codes(rt, [3, 14], 12, infer_code_sampling(seed=1))


def test_prompt_and_steps_past_the_position_limit_fail_in_one_line(rt):
    for call in (lambda: rt.generate_text([1] * 250, 10), lambda: rt.generate_codes([1] * 200, 57)):
        with pytest.raises(PipelineError, match="exceeds the position limit 256") as err:
            call()
        assert "\n" not in str(err.value)
    assert len(rt.generate_text([1] * 250, 6).ids) == 6  # exactly at the limit is fine


def test_one_shared_thread_pool_generates_the_same_tokens(rt):
    """A process that only generates runs every session on one pool (onnx_io.share_one_thread_pool): the same
    greedy tokens; then it is that pool or nothing, so asking for another thread count is one clear error."""
    import subprocess
    import sys

    want = rt.generate_text([3, 14, 15, 92], 16).ids
    script = (
        "import sys; from pipeline.core.onnx_io import share_one_thread_pool\n"
        "from pipeline.core.errors import PipelineError\n"
        "from pipeline.families.chattts.runtime import ChatTTSRuntime\n"
        "share_one_thread_pool(2)\n"
        "print(ChatTTSRuntime(sys.argv[1]).generate_text([3, 14, 15, 92], 16).ids)\n"
        "try:\n    share_one_thread_pool(1)\nexcept PipelineError as e:\n    print(e)\n")
    res = subprocess.run([sys.executable, "-c", script, str(rt.ms.root)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ids, error = res.stdout.strip().splitlines()
    assert ids == str(want)
    assert error == "this process already shares a pool of 2 threads, not 1"
