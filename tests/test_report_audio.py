"""What the report lets a person hear and see: WAV files, the choice of examples, where durations diverge,
per-step token agreement, the abridged terminal table, and the audio examples of real checks (one graph and a
chain) written into the run folder and rendered again from report.json."""
from __future__ import annotations

import copy
import io
import json
import wave

import numpy as np
import onnx
import pytest
import tiny_audio
from conftest import cli
from onnx.utils import Extractor
from sample_reports import BEFORE_FAMILIES, blocks_report

from pipeline.core.audio import divergence_frame, read_wav, wav_bytes
from pipeline.core.errors import PipelineError
from pipeline.evaluation.evaluate import evaluate
from pipeline.families import family_of
from pipeline.evaluation.metrics import HeadMetrics, choose_examples
from pipeline.core.modelset import GraphFile, ModelSet, file_sha256
from pipeline.core.onnx_io import session
from pipeline.report.render import html_page, markdown, terminal_table, write_reports
from pipeline.evaluation.results import CheckReport

RATE = 16000
INSERT_FRAME = 40  # the candidate's output has silence spliced in here: its durations diverge at 0.64 s


def test_wav_bytes_decode_to_the_right_length_and_rate():
    x = 0.5 * np.sin(2 * np.pi * 440 * np.arange(12345) / RATE)
    data = wav_bytes(x, RATE)
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getnframes(), w.getsampwidth(), w.getnchannels()) == (RATE, 12345, 2, 1)
    y, rate = read_wav(data)
    assert rate == RATE and y.shape == (12345,) and np.max(np.abs(y - x)) <= 1 / 32767
    clipped, _ = read_wav(wav_bytes(np.array([2.0, -3.0, 0.25]), 8000))  # clipped, never rescaled
    np.testing.assert_allclose(clipped, [1, -1, 0.25], atol=1 / 32767)
    with pytest.raises(PipelineError, match="not a WAV file"):
        read_wav(b"RIFF\x00\x00\x00\x00WAVE")


def test_the_examples_are_the_worst_and_the_median_sample():
    assert choose_examples([0.1, 0.5, 0.2, 0.3]) == [(1, "worst"), (2, "typical")]
    assert choose_examples([0.3, 0.1, 0.2]) == [(0, "worst"), (2, "typical")]
    assert choose_examples([0.2, 0.1]) == [(0, "worst"), (1, "typical")]
    assert choose_examples([0.1, 0.1]) == [(1, "worst"), (0, "typical")]  # distinct even when tied
    assert choose_examples([0.2]) == [(0, "worst")]
    assert choose_examples([]) == []


def test_divergence_is_the_first_frame_that_stops_matching():
    rng = np.random.default_rng(0)
    ref = rng.normal(-4, 2, (80, 120))
    cand = ref + rng.normal(0, 0.05, ref.shape)  # a candidate's small error everywhere
    k = 37
    shifted = np.concatenate([cand[:, :k], rng.normal(-4, 2, (80, 10)), cand[:, k:]], axis=1)  # 10 frames more at k
    assert divergence_frame(ref, shifted) == k
    assert divergence_frame(ref, cand) is None  # same length, matching throughout
    assert divergence_frame(ref, cand[:, :100]) == 100  # matching as far as the shorter one goes
    click = cand.copy()
    click[:, 50] += 3  # one loud frame is a click, not a divergence
    assert divergence_frame(ref, np.concatenate([click, cand[:, :5]], axis=1)) == 120


def test_head_metrics_report_agreement_per_step():
    text = HeadMetrics()
    ref = np.array([[5.0, 0, 0], [0, 5, 0], [0, 0, 5]])
    text.add(ref, np.array([[5.0, 0, 0], [5, 0, 0], [0, 0, 5]]))  # step 1 disagrees
    text.add(ref, ref)
    assert text.to_json()["teacher_forced_top1_per_step"] == [1.0, 0.5, 1.0]
    assert len(text.to_json()["teacher_forced_kl_per_step"]) == 3
    codes = HeadMetrics()  # [steps, V, codebooks]: a step's agreement is the mean over its codebooks
    ref_codes = np.stack([ref, ref], axis=-1)[:2]
    cand_codes = ref_codes.copy()
    cand_codes[1, :, 0] = [9, 0, 0]
    codes.add(ref_codes, cand_codes)
    assert codes.to_json()["teacher_forced_top1_per_step"] == [1.0, 0.5]


def _rendered(table) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_the_terminal_table_shows_the_worst_blocks_unless_asked_for_all():
    report = blocks_report(68)
    short = _rendered(terminal_table(report))
    rows = [line.split()[1] for line in short.splitlines() if "/b." in line]
    # Worst first (lowest isolated SQNR), then the unmatched block.
    assert rows == ["/b.67", "/b.66", "/b.65", "/b.64", "/b.63", "/b.62", "/b.61", "/b.60"]
    assert "8 worst of 68 blocks (--all-blocks for all; every block is in report.html)" in short
    mostly_same = copy.deepcopy(report)
    for b in mostly_same["blocks"][5:]:
        b["isolated"] = {**b["isolated"], "sqnr_db": "inf"}  # identical blocks are not among the worst
    short = _rendered(terminal_table(mostly_same))
    assert [line.split()[1] for line in short.splitlines() if "/b." in line] == ["/b.4", "/b.2", "/b.1", "/b.0",
                                                                                 "/b.3"]  # unmatched last
    assert "5 worst of 68 blocks" in short and "unmatched" in short
    full = _rendered(terminal_table(report, limit=None))
    assert [line.split()[1] for line in full.splitlines() if "/b." in line] == [f"/b.{i}" for i in range(68)]
    assert "worst of" not in full and full.count("<< worst") == 8
    few = _rendered(terminal_table(blocks_report(5)))  # no more blocks than the limit: all, in graph order
    assert [line.split()[1] for line in few.splitlines() if "/b." in line] == [f"/b.{i}" for i in range(5)]


def test_the_html_table_sorts_and_marks_the_worst_blocks():
    page = html_page(blocks_report(68), png=b"png")
    assert page.count('<tr class="worst">') == 8 and '<table class="sortable">' in page
    assert "addEventListener(\"click\"" in page
    for external in ("http://", "https://", "src=\"//"):
        assert external not in page


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """A real check of the tiny vocoder: the candidate has a noisy kernel and silence spliced in at 0.64 s."""
    tmp = tmp_path_factory.mktemp("vocoder")
    ref = tiny_audio.vocoder_set(tmp / "ref", tiny_audio.vocoder(), RATE)
    model = tiny_audio.vocoder(noise=0.03, insert_at=INSERT_FRAME * tiny_audio.HOP, gap=2048)
    cand = tiny_audio.vocoder_set(tmp / "cand", model, RATE)
    feeds = tiny_audio.mels(4)
    report = evaluate(ref, cand, feeds, family_of(ref))
    outs = [(session(ref.path("model")).run(None, f)[0].reshape(-1), session(cand.path("model")).run(None, f)[0]
             .reshape(-1)) for f in feeds]
    return tmp, report, outs


def test_a_check_keeps_every_sample_and_the_worst_and_typical_waveforms(checked):
    _, report, outs = checked
    audio = report.outputs[0].audio
    distances = [s.log_mel for s in audio.per_sample]
    assert len(distances) == 4 and audio.log_mel_max == pytest.approx(max(distances))
    worst, typical = report.audio_examples
    assert (worst.why, worst.sample) == ("worst", int(np.argmax(distances)))
    assert (typical.why, typical.sample) == ("typical", int(np.argsort(distances, kind="stable")[1]))
    for e in (worst, typical):
        ref, cand = outs[e.sample]
        np.testing.assert_array_equal(report.waveform(e.reference_wav), ref)
        np.testing.assert_array_equal(report.waveform(e.candidate_wav), cand)
        assert e.front_end.sample_rate == RATE and e.reference_s == pytest.approx(ref.size / RATE)
        assert e.length_change == pytest.approx(2048 / ref.size)
        assert abs(e.divergence_s - INSERT_FRAME * tiny_audio.HOP / RATE) <= 2 * tiny_audio.HOP / RATE


def test_the_run_folder_gets_the_wavs_and_the_page_renders_again_from_report_json(checked):
    tmp, report, outs = checked
    folder = tmp / "run"
    paths = write_reports(report, folder)
    for e in report.audio_examples:
        for name, wave_ in ((e.reference_wav, outs[e.sample][0]), (e.candidate_wav, outs[e.sample][1])):
            data, rate = read_wav(folder / "report-audio" / name)
            assert rate == RATE and data.size == wave_.size
        assert (folder / "report-audio" / e.spectrogram).read_bytes().startswith(b"\x89PNG")
    md = paths["md"].read_text()
    assert f"(report-audio/{report.audio_examples[0].reference_wav})" in md
    assert f"(report-audio/{report.audio_examples[0].spectrogram})" in md
    page = paths["html"].read_text()
    assert page.count("<audio controls") == 4 and page.count("data:audio/wav;base64,") == 4
    cached = CheckReport.read(paths["json"])  # as a re-run finds it: no waveforms, the files on disk
    assert cached.waveform(cached.audio_examples[0].reference_wav) is None
    again = html_page(cached.to_json(), audio_dir=folder / "report-audio")
    assert again.count("data:audio/wav;base64,") == 4
    write_reports(cached, folder)  # e.g. fallback writing the last round's cached report: the files stay
    assert paths["html"].read_text().count("data:audio/wav;base64,") == 4
    (folder / "report-audio" / report.audio_examples[1].candidate_wav).unlink()
    (folder / "report-audio" / report.audio_examples[1].spectrogram).unlink()
    missing = html_page(cached.to_json(), audio_dir=folder / "report-audio")
    assert missing.count("data:audio/wav;base64,") == 2 and "nothing to play" in missing
    assert "(WAV files not written)" in markdown(cached.to_json())


def test_a_report_from_before_audio_examples_still_renders():
    report = CheckReport.from_json(copy.deepcopy(BEFORE_FAMILIES))
    assert report.audio_examples is None and report.outputs[0].audio.per_sample is None
    assert "<h2>Listen" not in html_page(report.to_json(), png=b"png")


def _chain_set(folder, whole: onnx.ModelProto, cut: str) -> ModelSet:
    """`whole` cut at tensor `cut` into front -> back, as a chained hifigan ModelSet."""
    extractor = Extractor(onnx.shape_inference.infer_shapes(whole))
    folder.mkdir(parents=True)
    graphs = []
    for name, ins, outs in (("front", ["mel"], [cut]), ("back", [cut], ["audio"])):
        onnx.save(extractor.extract_model(ins, outs), str(folder / f"{name}.onnx"))
        graphs.append(GraphFile(name, f"{name}.onnx", file_sha256(folder / f"{name}.onnx")))
    ms = ModelSet(folder, graphs, chain=[{"from": f"front.{cut}", "to": f"back.{cut}"}],
                  meta={"family": "hifigan", "sample_rate": RATE})
    ms.write_manifest()
    return ms


def _with_front(model: onnx.ModelProto) -> onnx.ModelProto:
    """The vocoder behind a front graph's Mul by 1: a chain whose back graph makes the audio."""
    from onnx import helper, numpy_helper

    model.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), "one"))
    model.graph.node.insert(0, helper.make_node("Mul", ["mel", "one"], ["scaled"], name="/front/Mul"))
    model.graph.node[1].input[0] = "scaled"
    return model


def test_in_a_chain_the_examples_are_what_the_whole_chain_says(tmp_path):
    whole = _with_front(tiny_audio.vocoder())
    tiny_audio.vocoder_set(tmp_path / "mono", whole, RATE)
    mono = ModelSet.read(tmp_path / "mono")
    reference = _chain_set(tmp_path / "ref", whole, "scaled")
    broken = _with_front(tiny_audio.vocoder(noise=0.03, insert_at=INSERT_FRAME * tiny_audio.HOP, gap=2048))
    candidate = _chain_set(tmp_path / "cand", broken, "scaled")
    feeds = tiny_audio.mels(3)
    report = evaluate(mono, candidate, feeds, family_of(mono), fp32_twin=reference)
    assert [o.name for o in report.outputs][-1] == "chain:back"
    assert {e.output for e in report.audio_examples} == {"chain:back"}
    chain = report.outputs[-1].audio
    worst = report.audio_examples[0]
    assert worst.log_mel == pytest.approx(chain.log_mel_max)
    expected = session(mono.path("model")).run(None, feeds[worst.sample])[0].reshape(-1)
    np.testing.assert_array_equal(report.waveform(worst.reference_wav), expected)


def test_a_recipe_run_writes_the_audio_examples_and_a_rerun_keeps_them(tmp_path):
    onnx.save(tiny_audio.vocoder(), str(tmp_path / "vocoder.onnx"))  # a plain file: found to be a vocoder
    (tmp_path / "mels").mkdir()
    for i, f in enumerate(tiny_audio.mels(3)):
        np.savez(tmp_path / "mels" / f"m{i}.npz", **f)
    (tmp_path / "r.yaml").write_text(
        "name: voc\nmodel: {path: vocoder.onnx}\n"
        "steps: [{pass: compress_weights, params: {dtype: int8}}]\n"
        "check: {samples: 3, source: {source: npz, params: {folder: mels}}}\n")
    first = cli("run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"))
    assert first.code == 0, first.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    names = sorted(e[k] for e in report["audio_examples"] for k in ("reference_wav", "candidate_wav", "spectrogram"))
    assert sorted(p.name for p in (tmp_path / "run" / "report-audio").iterdir()) == names
    again = cli("run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"))
    assert again.code == 0 and "check: cached" in again.stdout + again.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "report-audio").iterdir()) == names
    assert (tmp_path / "run" / "report.html").read_text().count("data:audio/wav;base64,") == 4
