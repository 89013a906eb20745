"""A model no family knows, described in the recipe (`model.audio`) or on the command line: audio metrics,
duration pinning and the audio thresholds, with no Python."""
from __future__ import annotations

import json

import pytest

from conftest import cli, one_line
from pipeline.core.errors import PipelineError
from pipeline.core.recipe import AudioSpec
from pipeline.families import declare_audio, get_family
from tiny import save
from tiny_acoustic import DURATIONS, acoustic

RECIPE = """
name: acoustic_fp16
model:
  path: {model}
{audio}
calibration: {{source: npz, params: {{folder: {feeds}}}}}
steps:
  - pass: fp16
check:
  source: {{source: npz, params: {{folder: {feeds}}}}}
  samples: all
  max_log_mel: 5.0
"""


def recipe(tmp_path, acoustic_files, audio: str):
    model, feeds = acoustic_files
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(model=model, feeds=feeds, audio=audio))
    return path


def test_a_declared_audio_output_gets_audio_metrics_at_its_rate(tmp_path, acoustic_files):
    audio = f"  audio: {{sample_rate: 8000, durations: {DURATIONS}, mel: {{n_fft: 256, hop: 64, n_mels: 40}}}}"
    result = cli("run", str(recipe(tmp_path, acoustic_files, audio)), "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    out = report["outputs"][0]
    assert out["audio"]["sample_rate"] == 8000 and len(out["audio"]["per_sample"]) == 4
    # fp16 moved no duration here: nothing to pin, so no pinned log-mel; see tests/test_changed_lengths.py.
    changed = [s for s in out["audio"]["per_sample"] if s["length_change"]]
    assert ("log_mel_pinned_max" in out["audio"]) == bool(changed)
    assert report["audio_examples"][0]["front_end"] == {"sample_rate": 8000, "n_fft": 256, "hop": 64, "n_mels": 40,
                                                       "fmin": 0.0, "fmax": 4000.0}


def test_without_it_an_audio_threshold_has_nothing_to_measure(tmp_path, acoustic_files):
    result = cli("validate", str(recipe(tmp_path, acoustic_files, "")))
    assert result.exit_code == 2
    assert "check.max_log_mel: nothing to measure: it needs an audio output" in one_line(result.output)


@pytest.mark.parametrize("audio, says", [
    ("  audio: {sample_rate: 8000, output: wave}", "model.audio.output: the model has no output 'wave' (its outputs: out)"),
    ("  audio: {sample_rate: 8000, durations: /dur/Round}", "model.audio.durations: no intermediate tensor named "
                                                            "'/dur/Round' (close matches: /dur/Round_output_0"),
    ("  audio: {durations: /dur/Round_output_0}", "model.audio.sample_rate: a 'generic' model has no audio of its own"),
    ("  audio: {sample_rate: 8000, mel: {fmax: 6000}}", "mel.fmax 6000 Hz is above half the sample rate (4000)"),
])
def test_what_the_recipe_declares_is_checked_before_any_work(tmp_path, acoustic_files, audio, says):
    result = cli("validate", str(recipe(tmp_path, acoustic_files, audio)))
    assert result.exit_code == 2, result.output
    assert says in one_line(result.output)
    assert "Traceback" not in result.output


def test_a_family_keeps_what_the_recipe_does_not_override():
    piper = declare_audio(get_family("piper"), AudioSpec(sample_rate=16000))
    audio = piper.audio(None)
    assert (piper.name, audio.sample_rate, audio.durations, audio.mel.n_fft) == ("piper", 16000, "/Ceil_output_0", 1024)
    with pytest.raises(PipelineError, match="bands 0 to 8000 Hz do not fit a 12000 Hz output"):
        declare_audio(get_family("piper"), AudioSpec(sample_rate=24000, mel={"fmax": 8000}).model_copy(
            update={"sample_rate": 12000}))


def test_compare_and_bench_take_the_audio_as_options(tmp_path, acoustic_files):
    model, feeds = acoustic_files
    cand = save(acoustic(noise=0.01), tmp_path / "cand.onnx")
    compared = cli("compare", str(model), str(cand), "--npz", str(feeds), "--sample-rate", "8000", "--json",
                   str(tmp_path / "c.json"))
    assert compared.exit_code == 0, compared.output
    assert json.loads((tmp_path / "c.json").read_text())["outputs"][0]["audio"]["sample_rate"] == 8000
    benched = cli("bench", str(model), str(cand), "--npz", str(feeds), "--sample-rate", "8000", "--durations",
                  DURATIONS, "--repeat", "1", "--no-rss", "--json", str(tmp_path / "b.json"))
    assert benched.exit_code == 0, benched.output
    variants = json.loads((tmp_path / "b.json").read_text())["variants"]
    assert [s["text"] for s in variants[1]["sentences"]] == ["0.npz", "1.npz", "2.npz", "3.npz"]
    # Two samples flip a duration (tests/tiny_acoustic.py); pinned to the reference's, their log-mel is small.
    changed = [s for s in variants[1]["sentences"] if s["length_diff"] != 0]
    assert len(changed) == 2 and all(s["pinned_log_mel_distance"] < s["log_mel_distance"] for s in changed)
    no_rate = cli("bench", str(model), str(cand), "--npz", str(feeds), "--durations", DURATIONS, "--no-rss")
    assert no_rate.exit_code == 2 and "has no audio of its own" in one_line(no_rate.output)


def test_a_piper_voice_without_its_sidecar_is_named_as_such(tmp_path, piper_model):
    import shutil

    voice = tmp_path / "voice.onnx"
    shutil.copyfile(piper_model, voice)  # without voice.onnx.json
    (tmp_path / "r.yaml").write_text(f"name: v\nmodel: {{path: {voice}}}\nsteps: []\n")
    plain = cli("validate", str(tmp_path / "r.yaml"))
    said = " ".join(plain.output.split())  # (the note wraps at the terminal's width)
    assert plain.exit_code == 0 and "note: voice.onnx looks like a Piper voice" in said
    assert "voice.onnx.json is not beside it" in said
    (tmp_path / "c.yaml").write_text(f"name: v\nmodel: {{path: {voice}}}\nsteps: []\ncheck: {{max_log_mel: 0.1, "
                                     f"source: {{source: npz, params: {{folder: {tmp_path}}}}}}}\n")
    checked = cli("validate", str(tmp_path / "c.yaml"))
    assert checked.exit_code == 2
    assert "nothing to measure" in checked.output and "voice.onnx.json is not beside it" in one_line(checked.output)
