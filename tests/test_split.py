"""split, pin and the Piper streaming runtime, on the real Piper voice and real ORT sessions (noise scales 0)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import tiny

from calibration import DATA_DIR
from calibration.piper_sentences import load_phonemizer, phoneme_ids, piper_feeds
from calibration import read_sentences
from passes import get_pass
from passes.base import PassContext
from pipeline.core.audio import log_mel_distance, sqnr_db
from pipeline.core.blocks import BlockPartition
from pipeline.core.errors import PipelineError
from pipeline.core.modelset import GraphFile, ModelSet
from pipeline.core.onnx_io import check_loads, session
from pipeline.evaluation.pinning import PinnedPair, capture, run_pinned
from pipeline.families.piper.streaming import PiperStreaming, plan_chunks

DURATIONS = "/Ceil_output_0"  # w_ceil in Piper's VITS: frames per phoneme, after the duration predictor


def apply(name: str, model: onnx.ModelProto, params: dict | None = None, tmp: Path = Path(".")):
    p = get_pass(name)
    ctx = PassContext("model", BlockPartition(model), None, tmp)
    return p.apply(model, p.Params.model_validate(params or {}), ctx)


@pytest.fixture(scope="module")
def voice(piper_model):
    return onnx.load(str(piper_model))


@pytest.fixture(scope="module")
def sentence_feeds(piper_model):
    phonemizer = load_phonemizer(piper_model.with_name(piper_model.name + ".json"))
    texts = read_sentences(DATA_DIR / "eval_en.txt")[:3]
    return [piper_feeds(phoneme_ids(phonemizer, text)) for text in texts]


@pytest.fixture(scope="module")
def monolithic(piper_model):
    return session(piper_model)


@pytest.fixture(scope="module")
def split(voice):
    return apply("split", voice)


def test_split_finds_piper_boundary_and_chain(split):
    assert split.stats["boundary"] == {"/Add_output_0": "z", "/Cast_2_output_0": "y_mask"}
    encoder, decoder = split.graphs["encoder"], split.graphs["decoder"]
    assert list(split.graphs) == ["encoder", "decoder"]
    assert [i.name for i in encoder.graph.input] == ["input", "input_lengths", "scales"]
    assert [o.name for o in encoder.graph.output] == ["z", "y_mask"]
    assert [i.name for i in decoder.graph.input] == ["z", "y_mask"]
    assert [o.name for o in decoder.graph.output] == ["output"]
    assert split.chain == [{"from": "encoder.z", "to": "decoder.z"}, {"from": "encoder.y_mask", "to": "decoder.y_mask"}]
    for name, graph in split.graphs.items():
        check_loads(graph, name)  # onnx.checker and an ORT session


def test_split_chained_equals_monolithic(split, sentence_feeds, monolithic):
    encoder, decoder = session(split.graphs["encoder"]), session(split.graphs["decoder"])
    for feeds in sentence_feeds:
        reference = monolithic.run(None, feeds)[0]
        z, y_mask = encoder.run(None, feeds)
        chained = decoder.run(None, {"z": z, "y_mask": y_mask})[0]
        assert chained.shape == reference.shape
        assert sqnr_db(reference, chained) >= 80


def test_split_keeps_block_scopes(split, voice):
    encoder = {n.name for n in split.graphs["encoder"].graph.node}
    decoder = {n.name for n in split.graphs["decoder"].graph.node}
    assert {f"/flow/flows.{i}" for i in (0, 2, 4, 6)} <= {"/".join(n.split("/")[:3]) for n in decoder}
    assert {f"/dec/ups.{i}" for i in range(3)} <= {"/".join(n.split("/")[:3]) for n in decoder}
    assert not any(n.startswith(("/flow/", "/dec/")) for n in encoder)
    assert not any(n.startswith(("/enc_p/", "/dp/")) for n in decoder)
    assert encoder | decoder == {n.name for n in voice.graph.node}  # nothing lost, nothing renamed


def test_split_without_flow_says_what_it_looked_for(tmp_path):
    with pytest.raises(PipelineError, match=r"no node named under '/flow/'.*tensors that enter the VITS flow"):
        apply("split", tiny.conv_net(), tmp=tmp_path)
    decoder = apply("split", multi_speaker_vits(), tmp=tmp_path).graphs["decoder"]
    with pytest.raises(PipelineError, match="already starts at the flow"):
        apply("split", decoder, tmp=tmp_path)


def test_pin_tiny_model_takes_tensor_as_input(tmp_path):
    model = tiny.conv_net()
    pinned_name = "/enc/layers.1/Relu_output_0"
    result = apply("pin", model, {"tensors": [pinned_name]}, tmp_path)
    pinned = result.model
    assert [i.name for i in pinned.graph.input] == ["x", pinned_name]
    assert result.stats["nodes_dropped"] == 4  # conv and relu of layers 0 and 1
    check_loads(pinned, "pinned")
    x = np.random.default_rng(0).standard_normal((1, 4, 20)).astype(np.float32)
    # The reference's own value pinned: the same output.
    own = run_pinned(model, pinned, {"x": x}, [pinned_name])
    np.testing.assert_allclose(own.candidate[0], own.reference[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(own.reference[0], session(model).run(None, {"x": x})[0], rtol=1e-6)
    # A candidate with other weights upstream: pinned, the upstream change no longer matters.
    candidate = tiny.conv_net(seed=0)
    candidate.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(
        np.zeros((8, 4, 3), np.float32), candidate.graph.initializer[0].name))
    assert not np.allclose(session(candidate).run(None, {"x": x})[0], own.reference[0])
    other = run_pinned(model, candidate, {"x": x}, [pinned_name])
    np.testing.assert_allclose(other.candidate[0], own.reference[0], rtol=1e-5, atol=1e-6)
    assert other.pinned[pinned_name].shape == (1, 8, 20)


def test_pin_unknown_tensor_names_close_matches(tmp_path):
    with pytest.raises(PipelineError, match=r"no intermediate tensor named '/enc/layers.1/Relu_out'.*"
                                            r"close matches: /enc/layers.1/Relu_output_0"):
        apply("pin", tiny.conv_net(), {"tensors": ["/enc/layers.1/Relu_out"]}, tmp_path)
    with pytest.raises(PipelineError, match="already a graph input"):
        apply("pin", tiny.conv_net(), {"tensors": ["x"]}, tmp_path)
    with pytest.raises(Exception, match="at least 1 item"):
        get_pass("pin").Params.model_validate({"tensors": []})


def test_pin_piper_durations_gives_reference_length(voice, sentence_feeds, monolithic, tmp_path):
    # FP16 flips a Ceil on a duration near an integer: the second sentence comes out shorter unpinned.
    fp16 = apply("fp16", voice, tmp=tmp_path).model
    pinned = apply("pin", fp16, {"tensors": [DURATIONS]}, tmp_path).model
    assert pinned.graph.input[-1].name == DURATIONS
    assert not any(n.name.startswith("/dp/") for n in pinned.graph.node)  # the duration predictor is dropped
    unpinned = session(fp16)
    pair = PinnedPair(voice, pinned, [DURATIONS])
    lengths = []
    for feeds in sentence_feeds:
        run = pair.run(feeds)
        reference = monolithic.run(None, feeds)[0]
        assert run.candidate[0].shape == reference.shape == run.reference[0].shape
        assert run.pinned[DURATIONS].dtype == np.float32  # captured in FP32; cast to float16 for the candidate
        assert log_mel_distance(reference, run.candidate[0]) < 0.05
        lengths.append((reference.size, unpinned.run(None, feeds)[0].size))
    assert any(ref != cand for ref, cand in lengths), f"fp16 kept every length {lengths}: test proves nothing"


def test_pin_piper_durations_overrides_length_scale(voice, sentence_feeds, monolithic):
    feeds = sentence_feeds[0]
    slower = {**feeds, "scales": np.array([0, 1.3, 0], np.float32)}
    assert monolithic.run(None, slower)[0].size > monolithic.run(None, feeds)[0].size
    durations = capture(voice, feeds, [DURATIONS])
    pinned = get_pass("pin").apply(voice, get_pass("pin").Params(tensors=[DURATIONS]),
                                   PassContext("model", BlockPartition(voice), None, Path("."))).model
    audio = session(pinned).run(None, {**slower, **durations})[0]
    reference = monolithic.run(None, feeds)[0]
    assert audio.shape == reference.shape
    assert sqnr_db(reference, audio) >= 80


def test_plan_chunks_cover_every_frame_once():
    assert [(c.start, c.end) for c in plan_chunks(65)] == [(0, 65)]  # up to chunk + 2 * pad: one decode
    for n in (66, 90, 91, 279, 1000):
        chunks = plan_chunks(n)
        assert chunks[0].start == 0 and chunks[-1].end == n
        assert all(a.end == b.start for a, b in zip(chunks, chunks[1:]))
        assert all(c.left == max(c.start - 10, 0) and c.right == min(c.end + 10, n) for c in chunks)


def test_streaming_chunked_matches_full_decode(split, sentence_feeds, monolithic, tmp_path):
    folder = tmp_path / "split"
    folder.mkdir()
    ms = ModelSet(folder, [GraphFile("encoder", "encoder.onnx"), GraphFile("decoder", "decoder.onnx")],
                  chain=split.chain)
    for name, graph in split.graphs.items():
        ms.save_graph(name, graph)
    ms.write_manifest()
    runtime = PiperStreaming.from_modelset(folder)
    feeds = sentence_feeds[2]
    latents = runtime.encode(feeds)
    full = runtime.decode(latents)
    chunks = list(runtime.decode_chunks(latents))
    frames = runtime.frames(latents)
    assert len(chunks) == len(plan_chunks(frames)) > 3
    assert all(c.size == 45 * 256 for c in chunks[:-1])
    streamed = np.concatenate(chunks)
    assert streamed.size == full.size == monolithic.run(None, feeds)[0].size == frames * 256
    assert log_mel_distance(full, streamed) <= 0.05
    audio, timing = runtime.timed(feeds)
    assert audio.size == full.size and timing.chunks == len(chunks)
    assert 0 < timing.encoder_s < timing.first_audio_s < timing.total_s


def multi_speaker_vits() -> onnx.ModelProto:
    """A VITS-shaped toy: phonemes and a speaker id -> (z, y_mask, g) -> /flow/ -> /dec/ -> audio.

    g (the speaker embedding) feeds the flow and the generator, as in a
    multi-speaker Piper voice, and does not depend on the phonemes.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
             [("emb_p", (10, 4)), ("emb_g", (2, 4)), ("flow_w", (4, 4, 3)), ("dec_w", (2, 4, 1))]]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
    node = helper.make_node
    nodes = [
        node("Gather", ["emb_p", "input"], ["/enc_p/emb_out"], name="/enc_p/emb/Gather"),
        node("Transpose", ["/enc_p/emb_out"], ["/enc_p/x"], name="/enc_p/Transpose", perm=[0, 2, 1]),
        node("ReduceMean", ["/enc_p/x"], ["/mask_raw"], name="/ReduceMean", axes=[1]),
        node("Sigmoid", ["/mask_raw"], ["/Cast_2_output_0"], name="/Sigmoid"),
        node("Mul", ["/enc_p/x", "/Cast_2_output_0"], ["/Add_output_0"], name="/Mul"),
        node("Gather", ["emb_g", "sid"], ["/emb_g/out"], name="/emb_g/Gather"),
        node("Unsqueeze", ["/emb_g/out", "one"], ["/Unsqueeze_output_0"], name="/Unsqueeze"),
        node("Transpose", ["/Unsqueeze_output_0"], ["/g"], name="/Transpose_g", perm=[0, 2, 1]),
        node("Mul", ["/Add_output_0", "/Cast_2_output_0"], ["/flow/m"], name="/flow/flows.0/Mul"),
        node("Conv", ["/flow/m", "flow_w"], ["/flow/c"], name="/flow/flows.0/Conv", pads=[1, 1]),
        node("Add", ["/flow/c", "/g"], ["/flow/out"], name="/flow/flows.0/Add"),
        node("Add", ["/flow/out", "/g"], ["/dec/in"], name="/dec/cond/Add"),
        node("Conv", ["/dec/in", "dec_w"], ["output"], name="/dec/conv_post/Conv"),
    ]
    graph = helper.make_graph(
        nodes, "toy_vits",
        [helper.make_tensor_value_info("input", TensorProto.INT64, [1, "phonemes"]),
         helper.make_tensor_value_info("sid", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 2, "phonemes"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_split_multi_speaker_passes_g(tmp_path):
    model = multi_speaker_vits()
    result = apply("split", model, tmp=tmp_path)
    assert result.stats["boundary"] == {"/Add_output_0": "z", "/Cast_2_output_0": "y_mask", "/g": "g"}
    assert [i.name for i in result.graphs["encoder"].graph.input] == ["input", "sid"]
    assert [o.name for o in result.graphs["encoder"].graph.output] == ["z", "y_mask", "g"]
    assert [i.name for i in result.graphs["decoder"].graph.input] == ["z", "y_mask", "g"]
    feeds = {"input": np.array([[1, 4, 2, 7, 3]], np.int64), "sid": np.array([1], np.int64)}
    runtime = PiperStreaming(result.graphs["encoder"], result.graphs["decoder"], chain=result.chain)
    latents = runtime.encode(feeds)
    assert latents["g"].shape == (1, 4, 1)
    np.testing.assert_allclose(runtime.decode(latents), session(model).run(None, feeds)[0].reshape(-1), rtol=1e-6)


def test_pin_output_of_multi_output_node(tmp_path):
    """A Split whose other output is still needed stays; the pinned output becomes the input."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Split", ["x"], ["/a", "/b"], name="/Split", axis=1, num_outputs=2),
             helper.make_node("Add", ["/a", "/b"], ["y"], name="/Add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    pinned = apply("pin", model, {"tensors": ["/b"]}, tmp_path).model
    check_loads(pinned, "pinned")
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    b = np.full((1, 2), 10, np.float32)
    np.testing.assert_allclose(session(pinned).run(None, {"x": x, "/b": b})[0], [[10, 11]])


def test_bench_explains_a_changed_length_with_pinned_durations(voice, piper_model, tmp_path):
    """Where FP16 flips a duration, the bench also reports log-mel on the FP32 durations: small, so the
    audio itself is fine and only the timing moved."""
    from pipeline.engine.bench import resolve_variant, run_bench
    from pipeline.families.piper import PiperFamily

    onnx.save(apply("fp16", voice, tmp=tmp_path).model, str(tmp_path / "fp16.onnx"))
    texts, feeds = PiperFamily().bench_inputs(piper_model, 3, None)
    result = run_bench([resolve_variant(piper_model), resolve_variant(tmp_path / "fp16.onnx")], feeds, texts,
                       repeat=1, measure_rss=False, audio=PiperFamily().audio(None))
    sentences = result["variants"][1]["sentences"]
    changed = [s for s in sentences if s["length_diff"] != 0]
    assert changed, "fp16 kept every length: the test proves nothing"
    assert all(s["pinned_log_mel_distance"] is not None and s["pinned_log_mel_distance"] < 0.02 for s in changed)
    assert all(s["pinned_log_mel_distance"] is None for s in sentences if s["length_diff"] == 0)
