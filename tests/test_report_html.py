"""The HTML report in a real browser (headless Chromium, driven by Playwright): no console errors, no network,
every audio player loads its sample at the right duration, the page is not blank, and the tables sort.

The pages come from real checks on ONNX Runtime sessions: a tiny vocoder built here (fast), and the Piper voice
with its duration predictor nudged so that lengths change (end to end: e2e). Chromium is Debian's `chromium` package
(the README's test command installs it); without it these tests fail, saying so.
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import tiny_audio
from sample_reports import blocks_report
from tiny_chattts import write_assets

from pipeline.evaluation.evaluate import evaluate
from pipeline.families import family_of
from pipeline.core.onnx_io import session
from pipeline.report.render import html_page, write_reports

CHROMIUM = Path("/usr/bin/chromium")
RATE = 16000

# Every <audio> element's duration once its metadata is in (or the media error code, if it cannot load).
DURATIONS = """() => Promise.all([...document.querySelectorAll("audio")].map(a => new Promise(done => {
  if (a.readyState >= 1) return done(a.duration);
  a.addEventListener("loadedmetadata", () => done(a.duration));
  a.addEventListener("error", () => done("error " + (a.error && a.error.code)));
})))"""


class Browser:
    """One page in headless Chromium that records console errors, page errors and every request it makes."""

    def __init__(self, pw):
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        self.browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        self.page = self.browser.new_page(viewport={"width": 1400, "height": 900})
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def open(self, path: Path):
        self.errors.clear()
        self.requests.clear()
        self.page.goto(path.as_uri())
        self.page.wait_for_load_state("load")
        return self.page


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.is_file():  # a missing browser fails the run: a skip would pass it unchecked
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's `chromium` package (the README's test command "
                    f"does)")
    with sync_playwright() as pw:
        b = Browser(pw)
        yield b
        b.browser.close()


def _rendered_page_checks(browser: Browser, html_path: Path, expected_seconds: list[float]) -> None:
    """What every report page must do in the browser; `expected_seconds`: each player's sample, in page order."""
    page = browser.open(html_path)
    durations = page.evaluate(DURATIONS)
    assert len(durations) == len(expected_seconds)
    for got, want in zip(durations, expected_seconds):
        assert isinstance(got, float), got  # not a media error
        assert abs(got - want) <= 0.01 * want, (got, want)
    assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    assert browser.errors == []
    assert all(u.startswith(("data:", "file:")) for u in browser.requests), browser.requests  # no network
    from PIL import Image

    shot = np.asarray(Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(shot, axis=0, return_counts=True)
    assert len(colours) > 100 and counts.max() < 0.95 * len(shot), "the page looks blank"


def _expected_seconds(report, outputs: list[tuple[np.ndarray, np.ndarray]], rate: int) -> list[float]:
    """Each example's reference and candidate duration, from the sessions' own outputs."""
    return [outputs[e.sample][k].size / rate for e in report.audio_examples for k in (0, 1)]


def test_a_tiny_vocoder_report_plays_and_renders(tmp_path, browser):
    ref = tiny_audio.vocoder_set(tmp_path / "ref", tiny_audio.vocoder(), RATE)
    model = tiny_audio.vocoder(noise=0.03, insert_at=40 * tiny_audio.HOP, gap=3000)
    cand = tiny_audio.vocoder_set(tmp_path / "cand", model, RATE)
    feeds = tiny_audio.mels(3)
    report = evaluate(ref, cand, feeds, family_of(ref))
    outputs = [tuple(session(ms.path("model")).run(None, f)[0].reshape(-1) for ms in (ref, cand)) for f in feeds]
    paths = write_reports(report, tmp_path / "run")
    assert len(report.audio_examples) == 2
    _rendered_page_checks(browser, paths["html"], _expected_seconds(report, outputs, RATE))


def _blocks_page(tmp_path: Path) -> Path:
    """A report page with a block table holding numbers, "inf" and "-" (missing) in one column."""
    report = blocks_report(12)
    values = [12.5, "inf", 3.0, None, 40.0, "inf", 7.25, 100.0, None, 0.5, 22.0, 9.0]
    for b, v in zip(report["blocks"], values):
        b["isolated"] = {**b["isolated"], "sqnr_db": v}
    path = tmp_path / "blocks.html"
    path.write_text(html_page(report, png=_png()))
    return path


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_the_block_table_sorts_by_any_column(tmp_path, browser):
    page = browser.open(_blocks_page(tmp_path))
    column = page.locator("thead th", has_text="isolated SQNR dB").first
    index = page.locator("thead th").all_inner_texts().index("isolated SQNR dB")

    def cells(i: int) -> list[str]:
        return page.eval_on_selector_all("table.sortable tbody tr", f"rows => rows.map(r => r.cells[{i}].textContent)")

    column.click()
    assert cells(index) == ["0.5", "3.0", "7.2", "9.0", "12.5", "22.0", "40.0", "100.0", "inf", "inf", "-", "-"]
    column.click()  # descending; missing values stay last
    assert cells(index) == ["inf", "inf", "100.0", "40.0", "22.0", "12.5", "9.0", "7.2", "3.0", "0.5", "-", "-"]
    page.locator("thead th", has_text="block").first.click()  # text, in the order of its characters
    assert cells(0) == sorted(cells(0))
    assert browser.errors == []


def test_a_token_family_report_plots_agreement_and_kl_per_step(tmp_path, browser):
    """A real ChatTTS check (small seeded model, one layer's weights broken): per-step numbers, and the plot."""
    from pipeline.families.chattts.check import compare_chattts
    from pipeline.families.chattts.exporter import export_modelset, load_weights
    from pipeline.evaluation.results import CheckReport

    root, *_ = write_assets(tmp_path / "asset")
    w = load_weights(root)
    export_modelset(w, tmp_path / "ref")
    w.gpt["layers.1.mlp.down_proj.weight"] = w.gpt["layers.1.mlp.down_proj.weight"] * 1.5
    export_modelset(w, tmp_path / "cand")
    shutil.copy(tmp_path / "ref" / "sample_head.onnx", tmp_path / "cand" / "sample_head.onnx")
    steps = 10
    report = CheckReport.from_json(compare_chattts(tmp_path / "ref", tmp_path / "cand", [[3, 14, 15, 92], [65, 35]],
                                                   steps=steps))
    for head in (report.tokens, report.tokens["code_head"]):
        per_step = head["teacher_forced_top1_per_step"]
        assert len(per_step) == steps and all(0 <= a <= 1 for a in per_step)
    assert report.tokens["teacher_forced_top1_agreement"] == pytest.approx(np.mean(report.tokens[
        "teacher_forced_top1_per_step"]))  # every prompt generates all its steps: equal weights
    paths = write_reports(report, tmp_path / "run")
    assert paths["tokens_png"].read_bytes().startswith(b"\x89PNG") and "report-audio" not in str(paths)
    assert "teacher-forced top-1 agreement and KL per step" in paths["html"].read_text()
    assert "(report-tokens.png)" in paths["md"].read_text()
    _rendered_page_checks(browser, paths["html"], [])


@pytest.mark.e2e
def test_a_real_voice_whose_durations_changed_marks_where(tmp_path, browser, piper_model):
    """The Piper voice against itself with its duration predictor's output projection nudged (2% noise):
    a frame gained or lost per sentence, as INT8 in /dp does; the page plays both and marks the divergence."""
    from onnx import numpy_helper

    from pipeline.engine.comparison import as_modelset
    from pipeline.families import detect_family

    family = detect_family(piper_model)
    voice = onnx.load(str(piper_model))
    for i, t in enumerate(voice.graph.initializer):
        if t.name == "dp.proj.weight":
            w = numpy_helper.to_array(t)
            w = w + 0.02 * np.abs(w).mean() * np.random.default_rng(0).standard_normal(w.shape)
            voice.graph.initializer[i].CopyFrom(numpy_helper.from_array(w.astype(np.float32), t.name))
    candidate = tmp_path / "cand" / piper_model.name
    candidate.parent.mkdir()
    onnx.save(voice, str(candidate))
    for sidecar in family.sidecars(piper_model):
        shutil.copy(sidecar, candidate.parent / sidecar.name)
    _, feeds = family.bench_inputs(piper_model, 3, None)
    ref_ms, cand_ms = as_modelset(piper_model, family), as_modelset(candidate, family)
    report = evaluate(ref_ms, cand_ms, feeds, family)
    rate = family.audio(ref_ms).sample_rate
    worst = report.audio_examples[0]
    assert worst.length_change != 0 and worst.divergence_s is not None
    assert 0 <= worst.divergence_s < min(worst.reference_s, worst.candidate_s)
    outputs = [tuple(session(p).run(None, f)[0].reshape(-1) for p in (piper_model, candidate)) for f in feeds]
    paths = write_reports(report, tmp_path / "run")
    assert f"durations diverge at {worst.divergence_s:.2f} s" in paths["html"].read_text()
    _rendered_page_checks(browser, paths["html"], _expected_seconds(report, outputs, rate))
