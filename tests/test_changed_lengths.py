"""The check on a model whose output length depends on the data (a TTS model's durations): it never crashes,
pins the durations to compare, and says which samples and blocks changed length, and by how much."""
from __future__ import annotations

import json
import math

import numpy as np
import onnxruntime as ort

from conftest import cli
from pipeline.core.graph import length_setters, with_outputs
from pipeline.evaluation.blockwise import compare_models
from tiny import save
from tiny_acoustic import DURATIONS, acoustic, phonemes


def frames(model, feeds) -> list[int]:
    """Each sample's frame count, read straight from the model's durations."""
    sess = ort.InferenceSession(with_outputs(model, [DURATIONS]).SerializeToString())
    return [int(sess.run([DURATIONS], f)[0].sum()) for f in feeds]


def test_the_durations_are_found_in_the_graph():
    assert length_setters(acoustic()) == [DURATIONS]


def test_a_duration_flipped_upstream_is_pinned_and_reported_against_the_block_that_computes_it():
    reference, candidate, feeds = acoustic(), acoustic(noise=0.01), phonemes()
    want_ref, want_cand = frames(reference, feeds), frames(candidate, feeds)
    changed = [i for i, (a, b) in enumerate(zip(want_ref, want_cand)) if a != b]
    assert changed and len(changed) < len(feeds)  # the model as built: some samples flip, some do not

    report = compare_models(reference, candidate, feeds)

    durations = [c for c in report.length_changes if c.tensor == DURATIONS]
    assert [c.sample for c in durations] == changed
    for c in durations:
        assert (c.block, c.reference, c.candidate) == ("/dur", want_ref[c.sample], want_cand[c.sample])
        assert c.entries_changed >= 1
        # `/dur`, fed the reference's encoding, rounds as the reference does: the flip came from `/enc`'s error.
        assert c.isolated is False
    outputs = {c.sample: c for c in report.length_changes if c.block is None}
    assert sorted(outputs) == changed and all(outputs[i].candidate == want_cand[i] for i in changed)
    out = report.outputs[0]
    # Every sample compared: the changed ones on the reference's durations, so the number is the encoder's
    # small error, not a misalignment.
    assert (out.samples, out.shape_mismatches) == (len(feeds), len(changed))
    assert 20 < out.sqnr_db < math.inf
    assert all(b.isolated.samples == len(feeds) * len(b.outputs) for b in report.blocks)  # (pooled per tensor)
    assert any("lengths changed on" in n and "reference's durations" in n for n in report.notes)


def test_a_block_that_changes_durations_by_itself_is_named_and_its_isolated_run_does_not_crash():
    # /dur's own gain changed: alone, fed the reference's pitch (the reference's length), it would join two
    # tensors of different lengths; pinned to the reference's durations it runs.
    reference, candidate, feeds = acoustic(), acoustic(duration_gain=3.6), phonemes()
    report = compare_models(reference, candidate, feeds)
    durations = [c for c in report.length_changes if c.tensor == DURATIONS]
    assert len(durations) == len(feeds) and all(c.isolated and c.block == "/dur" for c in durations)
    assert all(b.isolated.samples == len(feeds) * len(b.outputs) for b in report.blocks)  # (pooled per tensor)
    assert not any("cannot run" in n for n in report.notes)
    blocks = {b.block: b for b in report.blocks}
    assert blocks["/enc"].isolated.sqnr_db == math.inf  # untouched, and measured so


def test_with_no_durations_to_pin_a_sample_that_cannot_run_is_skipped_with_a_reason():
    reference, candidate, feeds = acoustic(), acoustic(duration_gain=3.6), phonemes()
    report = compare_models(reference, candidate, feeds, durations=[])
    skipped = [n for n in report.notes if "no isolated error" in n]
    assert len(skipped) == len(feeds) and all("Concat" in n or "dimension" in n.lower() for n in skipped)
    out = report.outputs[0]
    assert (out.samples, out.shape_mismatches) == (len(feeds), len(feeds))  # over the common length
    assert any("compared over the common length" in n for n in report.notes)


def test_audio_metrics_give_the_error_on_the_reference_durations_apart_from_the_length_change():
    from pipeline.evaluation.metrics import AudioMetric
    from pipeline.families import AudioOutput
    from pipeline.core.audio import MelSettings

    audio = AudioMetric(AudioOutput(mel=MelSettings(sample_rate=8000, n_fft=16, hop=4, n_mels=8, fmax=4000)))
    report = compare_models(acoustic(), acoustic(noise=0.01), phonemes(), metrics=[audio])
    summary = report.outputs[0].audio
    pinned = [s for s in summary.per_sample if s.log_mel_pinned is not None]
    changed = [s for s in summary.per_sample if s.length_change]
    assert len(pinned) == len(changed) == 2
    # Pinned, the sample is the encoder's small error alone: far closer than the shifted audio.
    assert all(s.log_mel_pinned < s.log_mel for s in pinned)
    assert summary.log_mel_pinned_max < summary.log_mel_max


def test_compare_on_the_command_line_reports_the_length_changes(tmp_path):
    ref, cand = save(acoustic(), tmp_path / "ref.onnx"), save(acoustic(duration_gain=3.6), tmp_path / "cand.onnx")
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    for i, f in enumerate(phonemes()):
        np.savez(feeds / f"{i}.npz", **f)
    result = cli("compare", str(ref), str(cand), "--npz", str(feeds), "--json", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    assert "lengths changed on 4 samples" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert {(c["sample"], c["block"]) for c in report["length_changes"] if c["tensor"] == DURATIONS} == \
        {(i, "/dur") for i in range(4)}


def test_audio_that_turns_to_nan_misses_an_audio_bound():
    from pipeline.evaluation.metrics import AudioMetric
    from pipeline.evaluation.results import CheckReport
    from pipeline.families import AudioOutput

    audio = AudioMetric(AudioOutput())
    wave = np.sin(np.arange(8192) / 10).astype(np.float32)
    audio.update(wave, np.full_like(wave, np.nan))
    report = CheckReport.new(samples=1, reference="r", candidate="c", notes=[], peak_rss_mb=0, wall_s=0, blocks=[],
                             outputs=[{"name": "audio", "sqnr_db": float("nan"), "cosine": 0, "max_abs": 0,
                                       "rel_l2": float("nan"), "samples": 1, "shape_mismatches": 0,
                                       "audio": audio.to_json()}])
    assert audio.failures(report, {"max_log_mel": 0.1}) == ["output audio: log-mel max nan > 0.1"]
