"""The ASR intelligibility check: the text normaliser and error rates, the Moonshine engine on real Piper speech,
the transcript cache, `compare --asr` / `bench --asr` / a check's WER threshold, the HTML transcripts, and the
errors of bad input. The proof that WER tells a 4-bit voice from the shipped INT8 one over the whole
evaluation set is end to end, beside the shipped recipes' other tests (tests/test_recipes.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calibration import DATA_DIR, read_sentences
from conftest import cli, one_line, rounded_voice
from pipeline.core.hashing import CACHE_ENV
from pipeline.evaluation.asr import (TranscriptCache, align, char_errors, differing_words, load_engine, normalize,
                                     resample, score_sentence, word_errors)
from pipeline.evaluation.results import AsrSummary


@pytest.fixture
def transcript_cache(tmp_path, monkeypatch):
    """A transcript cache of this test's own (the session's is shared: tests/conftest.py)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "asr"


def speak(piper_model: Path, text: str) -> np.ndarray:
    from calibration.piper_sentences import load_phonemizer, phoneme_ids, piper_feeds
    from pipeline.core.onnx_io import session

    voice = load_phonemizer(piper_model.with_name(piper_model.name + ".json"))
    return session(piper_model).run(None, piper_feeds(phoneme_ids(voice, text)))[0].reshape(-1)


# -- text ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("written, spoken", [
    ("The weather today will be mostly sunny with a high of 22 degrees.",
     "the weather today will be mostly sunny with a high of twenty-two degrees"),
    ("Margaret and her brother Thomas moved to Edinburgh in 1998.",
     "Margaret and her brother Thomas moved to Edinburgh in nineteen ninety-eight"),
    ("The train leaves at 7:45, on the 3rd of March.", "the train leaves at seven forty five on the third of march"),
    ("It costs $12 & 15% more.", "It costs twelve dollars and fifteen percent more"),
    ("Last year they sold more than 250,000 bicycles.", "last year they sold more than two hundred and fifty "
                                                        "thousand bicycles"),
    ("Please send it to Dr. Patel; it's well-known.", "please send it to doctor patel its well known"),
])
def test_formatting_is_not_an_error(written, spoken):
    assert normalize(written) == normalize(spoken)
    assert word_errors(written, spoken).errors == 0 and char_errors(written, spoken).errors == 0


def test_word_errors_count_substitutions_deletions_and_insertions():
    a = word_errors("the cat sat on the mat", "the bat sat on mat today")  # cat->bat, -the, +today
    assert (a.errors, a.reference_length) == (3, 6)
    assert align(list("kitten"), list("sitting")).errors == 3
    assert word_errors("one two three", "").errors == 3 and word_errors("", "one").errors == 1
    # The candidate's words that differ from the reference transcript's: only those, whatever the tie order.
    assert differing_words("the cat sat on the mat", "the bat sat on mat today") == [
        ("the", False), ("bat", True), ("sat", False), ("on", False), ("mat", False), ("today", True)]


def test_summary_pools_errors_over_all_words():
    rows = [score_sentence("one two three four", "one two three four", "one two three"),   # 0 -> 1 of 4
            score_sentence("a b", "a c", "x y")]                                          # 1 -> 2 of 2
    s = AsrSummary.of(rows, engine="test")
    assert s.wer_reference == pytest.approx(100 / 6, abs=1e-3) and s.wer_candidate == pytest.approx(50.0)
    assert s.wer_increase == pytest.approx(50 - 100 / 6, abs=1e-3) and s.wer_increase_max == pytest.approx(50.0)


# -- the engine, resampling and the cache -------------------------------------------------------------------------

def test_resampling_keeps_the_pitch():
    t = np.arange(22050) / 22050
    tone = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    out = resample(tone, 22050, 16000)
    assert out.size == 16000 and out.dtype == np.float32
    assert np.argmax(np.abs(np.fft.rfft(out))) == 1000  # 1 Hz bins over one second


def test_moonshine_hears_the_piper_voice_and_caches_what_it_heard(piper_model, transcript_cache):
    text = "Would you like to hear the news or listen to some music instead?"
    audio = speak(piper_model, text)
    cache = TranscriptCache(load_engine())
    heard, cached = cache.transcribe(audio, 22050)
    assert not cached and word_errors(text, heard).errors <= 2, heard
    assert cache.transcribe(audio, 22050) == (heard, True)
    assert len(list(transcript_cache.rglob("*.txt"))) == 1
    assert cache.transcribe(np.zeros(22050, np.float32), 22050)[0] == ""  # a second of silence says nothing


# -- where it shows ------------------------------------------------------------------------------------------------

def test_compare_asr_reports_both_wers_and_the_increase(piper_model, tmp_path):
    damaged = rounded_voice(piper_model, tmp_path / "five-bit", bits=5)
    report = tmp_path / "report.json"
    html = tmp_path / "report.html"
    result = cli("compare", str(piper_model), str(damaged), "--samples", "2", "--asr", "--json", str(report),
                 "--html", str(html), "--quiet")
    assert result.exit_code == 0, result.output
    got = json.loads(report.read_text())["asr"]
    assert {"wer_reference", "wer_candidate", "wer_increase", "cer_reference", "cer_candidate",
            "sentences"} <= set(got)
    assert got["wer_increase"] == pytest.approx(got["wer_candidate"] - got["wer_reference"], abs=2e-3)
    texts = read_sentences(DATA_DIR / "eval_en.txt")[:2]
    assert [s["text"] for s in got["sentences"]] == texts
    assert f"WER {got['wer_reference']:.1f}% -> {got['wer_candidate']:.1f}%" in result.stdout
    page = html.read_text()
    assert "reference heard" in page and "candidate heard" in page
    # A second compare hears the same FP32 audio: its transcripts come from the cache.
    again = cli("compare", str(piper_model), str(damaged), "--samples", "2", "--asr", "--json", str(report),
                "--quiet")
    assert again.exit_code == 0 and json.loads(report.read_text())["asr"]["cached_references"] == 2


def test_bench_asr_adds_wer_columns(piper_model, tmp_path):
    out = tmp_path / "bench.json"
    result = cli("bench", str(piper_model), str(piper_model), "--sentences", "1", "--repeat", "1", "--no-rss",
                 "--asr", "--json", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    assert "WER +pts" in result.stdout
    variants = json.loads(out.read_text())["variants"]
    assert variants[1]["asr"]["wer_increase"] == 0 and variants[1]["asr"]["wer"] == variants[0]["asr"]["wer"]


# -- bad input: one line, exit 2 -----------------------------------------------------------------------------------

def test_inputs_without_text_are_one_line(acoustic_files):
    model, feeds = acoustic_files
    result = cli("compare", str(model), str(model), "--npz", str(feeds), "--sample-rate", "8000", "--asr")
    assert result.exit_code == 2
    assert "carry no text" in one_line(result.stderr) and "texts.txt" in result.stderr


def test_a_texts_file_that_does_not_match_the_feeds_is_one_line(acoustic_files):
    model, feeds = acoustic_files
    (feeds / "texts.txt").write_text("only one line\n")
    result = cli("compare", str(model), str(model), "--npz", str(feeds), "--sample-rate", "8000", "--asr")
    assert result.exit_code == 2
    assert "1 lines of text for 4 .npz files" in one_line(result.stderr)


def test_audio_shorter_than_a_tenth_of_a_second_is_one_line(tmp_path, acoustic_files):
    model, feeds = acoustic_files
    (feeds / "texts.txt").write_text("a\nb\nc\nd\n")
    # The tiny acoustic model's output, called audio at 192 kHz, lasts well under 0.1 s.
    result = cli("compare", str(model), str(model), "--npz", str(feeds), "--sample-rate", "192000", "--asr")
    assert result.exit_code == 2
    assert "shorter than 0.1 s" in one_line(result.stderr)


def test_a_model_that_makes_no_audio_is_one_line(tiny_model, tiny_feeds):
    result = cli("compare", str(tiny_model), str(tiny_model), "--npz", str(tiny_feeds), "--asr")
    assert result.exit_code == 2
    assert "not audio" in one_line(result.stderr)


def test_without_the_extra_the_error_names_the_pip_command(piper_model, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "moonshine_cpp"
                        else real(name, *a))
    result = cli("compare", str(piper_model), str(piper_model), "--samples", "1", "--asr")
    assert result.exit_code == 2
    assert "pip install 'tts-onnx-pipeline[asr]'" in one_line(result.stderr)


def test_a_wer_threshold_with_asr_turned_off_fails_before_any_work(tmp_path, piper_model):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {{path: {piper_model}}}\nsteps:\n  - pass: simplify\n"
                      f"check: {{asr: false, max_wer_increase: 2}}\n")
    result = cli("validate", str(recipe))
    assert result.exit_code == 2
    assert "check.asr: false" in one_line(result.stderr)


TUNE = """
name: piper_wer_tune
model: {{path: {voice}}}
calibration: {{source: piper, params: {{count: 8}}}}
tune:
  menu:
    - {{name: int8-weights, pass: compress_weights, params: {{dtype: int8}}}}
  blocks: {{include: ['/dec/ups\\.0', '/flow/flows\\.2']}}
  target: {{max_log_mel: 0.5, max_wer_increase: {bound}}}
  samples: 2
  budget: {{verify_rounds: 1}}
check: {{samples: 2}}
"""


@pytest.mark.e2e
def test_tune_checks_the_wer_bound_on_its_verified_candidates(piper_model, tmp_path):
    recipe = tmp_path / "tune.yaml"
    recipe.write_text(TUNE.format(voice=piper_model, bound=5))
    result = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    chosen = [c for c in report["tune"]["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["met"] and chosen[0]["wer_increase"] <= 5
    assert report["asr"]["wer_increase"] == pytest.approx(report["asr"]["wer_candidate"]
                                                          - report["asr"]["wer_reference"], abs=2e-3)


def test_a_wer_bound_on_tune_samples_without_text_is_one_line(acoustic_files, tmp_path):
    model, feeds = acoustic_files
    recipe = tmp_path / "tune.yaml"
    recipe.write_text(f"""
name: t
model: {{path: {model}, audio: {{sample_rate: 8000}}}}
calibration: {{source: npz, params: {{folder: {feeds}}}}}
tune:
  menu: [{{name: fp16, pass: fp16}}]
  target: {{max_log_mel: 1.0, max_wer_increase: 2}}
  samples: 2
""")
    result = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    last = result.stderr.strip().splitlines()[-1]  # after the tune's progress lines
    assert last.startswith("error: ") and "tune.target.max_wer_increase" in last and "carry no text" in last
