"""Reports of a check: terminal table, JSON, Markdown, and a self-contained HTML page with a plot.

They render a `pipeline.evaluation.results.CheckReport`, whose models document every field; report.json is its
`to_json()` (`"schema": "tts-onnx-pipeline/check/1"`):

    {"samples": N, "reference": str, "candidate": str, "notes": [str], "peak_rss_mb": float, "wall_s": float,
     "blocks": [{"block": id, "params": int, "bytes_reference": int, "bytes_candidate": int,
                 "precision": {"fp32"|"fp16"|"int8"|"other": nodes}, "weights": {dtype: bytes},
                 "matched": bool, "unmatched_tensors": [str], "outputs": [tensor],
                 "isolated": M, "accumulated": M, "amplification": float|"inf"|null,
                 "sensitivity": {...}?}],
     "outputs": [{"name": str, **M, "audio": {"log_mel_mean", "log_mel_max", "mcd_db_mean",
                  "length_diff_max_abs", "samples_with_length_change", "sample_rate",
                  "log_mel_pinned_max"?,
                  "per_sample": [{"log_mel", "mcd_db", "length_change", "divergence_s": float|null,
                                  "log_mel_pinned"?}]}?,
                  <family metric>: {...}?}],
     "tokens": {"teacher_forced_top1_agreement", "teacher_forced_kl_mean", "teacher_forced_kl_max",
                "teacher_forced_kl_per_step": [float], "teacher_forced_top1_per_step": [float],
                "first_divergence_steps": [int|null], "prompts_diverged", "first_divergence_min",
                "code_head": {...the same}?, ...}? (token families),
     "family": str, "key": str, "failures": [str], "rounds": [...]? (automatic fallback), "tune": {...}?,
     "audio_examples": [{"output": str, "sample": int, "why": "worst"|"typical", "log_mel", "length_change",
                         "divergence_s": float|null, "reference_s", "candidate_s",
                         "front_end": {"sample_rate", "n_fft", "hop", "n_mels", "fmin", "fmax"},
                         "reference_wav": file, "candidate_wav": file, "spectrogram": file}]? (audio families),
     "length_changes": [{"sample": int, "tensor": str, "block": str|null, "reference": int, "candidate": int,
                         "entries_changed": int|null, "isolated": bool|null}]? (samples whose length changed)}
    M = {"sqnr_db": float|"inf"|null, "cosine", "max_abs", "rel_l2", "samples", "shape_mismatches"}

Blocks are in graph order. SQNR "inf" means identical; null means no sample could be compared.

`write_reports` writes report.json, .md, .html, .png (per block), -tokens.png (token families) and, for audio
families, `report-audio/`: each example's reference and candidate as 16-bit PCM WAV and a PNG of their mel
spectrograms (the metric's own front end) and difference. The HTML page embeds all of it (data: URIs, no network)
and sorts its tables by any column; a report read back from report.json renders again from those files.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.audio import MelSettings, log_mel, read_wav, wav_bytes
from pipeline.core.errors import PipelineError
from pipeline.evaluation.results import CheckReport, as_float  # noqa: F401 (as_float: read report.json with it)

if TYPE_CHECKING:
    import numpy as np

    from pipeline.evaluation.results import AudioExample, BlockResult, FormatResult

# What the public functions render: a CheckReport, or report.json's form (as read back from a file), which is
# typed once on the way in.
Report = CheckReport | dict[str, Any]

WORST = 8  # blocks marked worst in the tables, and listed by the terminal summary by default
FIRST_LOOK = 3  # what `worst_blocks` names by default: the few blocks to look at first
# Files of report-audio/ that write_reports owns (and replaces when a new check writes its own).
_AUDIO_FILE = re.compile(r"sample\d+-(reference\.wav|candidate\.wav|spectrogram\.png)")


def typed(report: Report) -> CheckReport:
    """The report as a CheckReport: one already is; report.json's form is read into one."""
    return report if isinstance(report, CheckReport) else CheckReport.from_json(report)


def _fmt_db(x: float | None) -> str:
    """A dB figure: inf (identical), - (nothing compared), else one decimal."""
    if x is None or math.isnan(x):
        return "-"
    return "inf" if x == math.inf else f"{x:.1f}"


def _fmt_amplification(amp: float | None) -> str:
    return "-" if amp is None or math.isnan(amp) else ("inf" if amp == math.inf else f"{amp:.1f}x")


def worst_blocks(report: Report, n: int = FIRST_LOOK) -> list[str]:
    """Blocks with the lowest finite isolated SQNR: where the error is made."""
    report = typed(report)
    ranked = [(b.block, b.isolated.sqnr_db) for b in report.blocks if b.matched and math.isfinite(b.isolated.sqnr_db)]
    return [b for b, _ in sorted(ranked, key=lambda x: x[1])[:n]]


def ranked_blocks(report: Report) -> list[BlockResult]:
    """The blocks that add error, worst first (lowest finite isolated SQNR), then the unmatched ones;
    identical blocks and ones with nothing compared are left out."""
    report = typed(report)
    by_id = {b.block: b for b in report.blocks}
    worst = [by_id[b] for b in worst_blocks(report, len(by_id))]
    return worst + [b for b in report.blocks if not b.matched]


def _precision(p: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(p.items()) if k != "other") or "-"


def terminal_table(report: Report, limit: int | None = WORST):
    """The per-block table for a terminal: the `limit` worst blocks, worst first, when there are more blocks
    than that (68 rows of a Piper voice hide the few that matter); `limit` None: every block in graph order."""
    report = typed(report)
    from rich.table import Table

    blocks, caption = report.blocks, None
    if limit is not None and len(blocks) > limit:
        blocks = ranked_blocks(report)[:limit]
        caption = (f"{len(blocks)} worst of {len(report.blocks)} blocks" if blocks
                   else f"none of the {len(report.blocks)} blocks adds error")
        caption += " (--all-blocks for all; every block is in report.html)"
    # Abridged, every row is a worst one: the mark column would only repeat it, unless a block is unmatched.
    worst = set(worst_blocks(report, WORST)) if caption is None else set()
    marks = caption is None or any(not b.matched for b in blocks)
    title = f"per-block error, {report.samples} samples: {report.candidate} vs {report.reference}"
    table = Table(title=title, caption=caption)
    for col in ("block", "params", "iso SQNR dB", "acc SQNR dB", "amplif.", "iso cos", "acc max abs",
                "precision", "KB ref->cand", *([""] if marks else [])):
        table.add_column(col, justify="left" if col in ("block", "precision", "") else "right")
    for b in blocks:
        mark = "[bold red]<< worst[/]" if b.block in worst else ("[yellow]unmatched[/]" if not b.matched else "")
        table.add_row(b.block, f"{b.params:,}", _fmt_db(b.isolated.sqnr_db), _fmt_db(b.accumulated.sqnr_db),
                      _fmt_amplification(b.amplification), f"{b.isolated.cosine:.5f}",
                      f"{b.accumulated.max_abs:.3g}", _precision(b.precision),
                      f"{b.bytes_reference // 1024}->{b.bytes_candidate // 1024}", *([mark] if marks else []))
    return table


def outputs_lines(report: Report) -> list[str]:
    report = typed(report)
    lines = []
    t = report.tokens
    if t:
        lines.append(_token_line(t.get("head", "text head"), t, f"{t['decode_steps']} steps a prompt",
                                 report.samples))
        if t.get("code_head") and t["code_head"]["teacher_forced_top1_agreement"] is not None:
            lines.append(_token_line("code head", t["code_head"], "per codebook", report.samples))
    for o in report.outputs:
        line = (f"output {o.name}: SQNR {_fmt_db(o.sqnr_db)} dB, cosine {o.cosine:.5f}, "
                f"max abs {o.max_abs:.3g}, rel L2 {o.rel_l2:.4g}")
        if o.shape_mismatches:
            line += f" ({o.shape_mismatches} of {report.samples} samples changed length; {o.samples} compared)"
        a = o.audio
        if a:
            line += (f"; log-mel mean {a.log_mel_mean:.4f}, max {a.log_mel_max:.4f}"
                     + (f" (on the reference's durations: max {a.log_mel_pinned_max:.4f})"
                        if a.log_mel_pinned_max is not None else "")
                     + (f", MCD {a.mcd_db_mean:.2f} dB" if a.mcd_db_mean is not None else "") + "; "
                     f"length change max {a.length_diff_max_abs:.2%} "
                     f"({a.samples_with_length_change} of {report.samples} samples)")
        lines.append(line)
    if report.asr is not None:
        lines.append(report.asr.line())
    return lines + [_format_line(f) for f in report.formats or []]


def _format_line(f: FormatResult) -> str:
    """A file written beside ONNX: what it was compared with, and how far off it is (or why it was not)."""
    head = f"format {f.format} {f.file}"
    if f.sqnr_db is None or math.isnan(f.sqnr_db):  # (nan: report.json says null, as for a file not run)
        return f"{head}: not checked: {f.note or 'no check'}"
    line = f"{head}: {f.compared}: SQNR {'min ' if f.worst else ''}{_fmt_db(f.sqnr_db)} dB"
    line += f" ({f.worst})" if f.worst else ""
    line += f", log-mel max {f.log_mel_max:.4f}" if f.log_mel_max is not None else ""
    return line + (f"; {f.note}" if f.note else "")


def _token_line(head: str, t: dict[str, Any], what: str, samples: int) -> str:
    return (f"tokens ({head}, {what}): teacher-forced top-1 agreement {t['teacher_forced_top1_agreement']:.3f}, "
            f"KL mean {t['teacher_forced_kl_mean']:.4g} max {t['teacher_forced_kl_max']:.4g}; free-running greedy "
            f"diverged on {t['prompts_diverged']} of {samples} prompts"
            + (f", first at step {t['first_divergence_min']}" if t["first_divergence_min"] is not None else ""))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_png(report: Report) -> bytes:
    """Isolated and accumulated SQNR per block, in graph order (inf drawn at the top); every block named."""
    report = typed(report)
    plt = _pyplot()
    blocks = [b for b in report.blocks if b.matched]
    iso = [b.isolated.sqnr_db for b in blocks]
    acc = [b.accumulated.sqnr_db for b in blocks]
    finite = [v for v in iso + acc if math.isfinite(v)]
    top = (max(finite) if finite else 100) + 10

    def clip(v: float) -> float:
        return top if v == math.inf else v

    # A fixed width per block keeps 68 names legible; the page scrolls sideways rather than shrink them.
    fig, ax = plt.subplots(figsize=(max(8, 0.17 * len(blocks)), 5.5), dpi=110)
    x = range(len(blocks))
    ax.plot(x, [clip(v) for v in iso], "o-", ms=3, label="isolated (error the block adds)")
    ax.plot(x, [clip(v) for v in acc], "s-", ms=3, label="accumulated (error at its output)")
    ax.axhline(top, color="grey", lw=0.5, ls=":")
    ax.text(0, top, " identical (inf)", va="bottom", fontsize=7, color="grey")
    ax.set_xticks(list(x))
    ax.set_xticklabels([b.block for b in blocks], rotation=90, fontsize=7)
    ax.set_xlim(-0.5, len(blocks) - 0.5)
    ax.set_ylabel("SQNR dB (higher is better)")
    ax.set_title(f"{report.candidate} vs {report.reference}, {report.samples} samples")
    return _finished_png(fig, ax)


def _finished_png(fig, *axes) -> bytes:
    """A grid and the legend on each axis, and the figure as PNG bytes (the figure closed)."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _heads(report: CheckReport) -> list[tuple[str, dict[str, Any]]]:
    """(name, metrics) of each token head with per-step numbers: the main head, then the code head."""
    t = report.tokens or {}
    heads = [(t.get("head", "text head"), t), ("code head", t.get("code_head") or {})]
    return [(name, h) for name, h in heads
            if h.get("teacher_forced_kl_per_step") or h.get("teacher_forced_top1_per_step")]


def tokens_png(report: Report) -> bytes | None:
    """Teacher-forced top-1 agreement and KL per generated step, each head, with the step where free-running
    greedy decoding first diverged marked (dashed); None when the report has no per-step token numbers."""
    report = typed(report)
    heads = _heads(report)
    if not heads:
        return None
    plt = _pyplot()
    fig, (agree, kl) = plt.subplots(2, 1, sharex=True, figsize=(8, 6), dpi=110)
    for name, h in heads:
        per_step = h.get("teacher_forced_top1_per_step") or []  # reports before it had only KL
        line = agree.plot(range(len(per_step)), per_step, "o-", ms=3, label=name)[0] if per_step else None
        kls = h.get("teacher_forced_kl_per_step") or []
        line = kl.plot(range(len(kls)), kls, "o-", ms=3, color=line.get_color() if line else None, label=name)[0]
        first = h.get("first_divergence_min")
        if first is not None:
            label = (f"{name}: free-running greedy first diverges at step {first} "
                     f"({h['prompts_diverged']} of {report.samples} prompts diverge)")
            for ax in (agree, kl):
                ax.axvline(first, color=line.get_color(), ls="--", lw=1, label=label if ax is agree else None)
    agree.set_ylim(-0.03, 1.03)
    agree.set_ylabel("top-1 agreement")
    agree.set_title(f"teacher-forced, per generated step, mean over {report.samples} prompts")
    if all(v > 0 for _, h in heads for v in h.get("teacher_forced_kl_per_step") or []):
        kl.set_yscale("log")
    kl.set_ylabel("KL(reference || candidate)")
    kl.set_xlabel("generated step")
    return _finished_png(fig, agree, kl)


def spectrogram_png(reference: np.ndarray, candidate: np.ndarray, mel: MelSettings, title: str,
                    divergence_s: float | None = None) -> bytes:
    """Log-mel spectrograms of both (one colour scale) and their difference (diverging, over the common
    frames), on one time axis; a vertical line where the durations diverge."""
    import numpy as np

    plt = _pyplot()
    a, b = log_mel(reference, mel=mel), log_mel(candidate, mel=mel)
    n = min(a.shape[1], b.shape[1])
    diff = b[:, :n] - a[:, :n]
    seconds = mel.hop / mel.sample_rate
    low, high = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    span = max(float(np.percentile(np.abs(diff), 99.5)) if diff.size else 0.0, 1e-3)  # a few outliers saturate
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(10, 7), dpi=100)
    rows = ((a, "reference", "magma", low, high), (b, "candidate", "magma", low, high),
            (diff, "candidate - reference", "RdBu_r", -span, span))
    for ax, (data, name, cmap, vmin, vmax) in zip(axes, rows):
        image = ax.imshow(data, origin="lower", aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                          extent=(0, data.shape[1] * seconds, 0, data.shape[0]), interpolation="nearest")
        fig.colorbar(image, ax=ax, pad=0.01).set_label("log mel" if cmap == "magma" else "difference", fontsize=8)
        ax.set_ylabel(f"{name}\nmel band", fontsize=9)
        if divergence_s is not None:
            ax.axvline(divergence_s, color="#00e5ff", lw=1.5, ls="--",
                       label=f"durations diverge at {divergence_s:.2f} s" if ax is axes[0] else None)
    axes[0].set_xlim(0, max(a.shape[1], b.shape[1]) * seconds)
    axes[0].set_title(title, fontsize=10)
    axes[-1].set_xlabel("seconds")
    if divergence_s is not None:
        axes[0].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


COLUMNS = ("block", "params", "isolated SQNR dB", "accumulated SQNR dB", "amplification", "precision",
           "KB ref -> cand", "")


def _rows(report: CheckReport) -> list[list[str]]:
    """One row of cells per block, shared by the Markdown and HTML reports."""
    worst = set(worst_blocks(report, WORST))
    return [[b.block, f"{b.params:,}", _fmt_db(b.isolated.sqnr_db), _fmt_db(b.accumulated.sqnr_db),
             _fmt_amplification(b.amplification), _precision(b.precision),
             f"{b.bytes_reference // 1024} -> {b.bytes_candidate // 1024}",
             "worst" if b.block in worst else ("unmatched" if not b.matched else "")] for b in report.blocks]


def _round_lines(report: CheckReport) -> list[str]:
    return [f"round {r.round}: {len(r.kept)} blocks kept in {r.kept_in}; {r.summary}"
            + (f"; moved next: {', '.join(r.moved_next)}" if r.moved_next else "")
            for r in report.rounds or []]


TUNE_COLUMNS = ("candidate", "choices", "size x", "latency x", "log-mel max", "SQNR dB", "length change",
                "target", "")


def _tune_rows(report: CheckReport) -> list[list[str]]:
    rows = []
    for c in report.tune.candidates if report.tune else []:
        mark = "chosen" if c.chosen else ("Pareto" if c.pareto else "")
        rows.append([c.key[:8], c.choices, f"{c.size_ratio:.3f}",
                     "-" if c.latency_ratio is None else f"{c.latency_ratio:.2f}",
                     "-" if c.log_mel_max is None else f"{c.log_mel_max:.4f}", _fmt_db(c.sqnr_db),
                     f"{c.length_change_max:.2%}", "met" if c.met else "missed: " + "; ".join(c.misses), mark])
    return rows


def _tune_lines(report: CheckReport) -> list[str]:
    t = report.tune
    if not t:
        return []
    target = ", ".join(f"{k} {v}" for k, v in t.target.items() if v not in ({}, None))
    return [f"objective {t.objective}; target {target}", f"{t.blocks_searched} blocks searched, menu "
            f"{', '.join(t.menu)}; {t.trials} trials ({t.screening_trials} screening) on {t.executor}, "
            f"{t.wall_s:.0f} s", f"tune samples: {t.samples} (the table above is on the evaluation inputs)"]


def tune_png(report: Report) -> bytes | None:
    """Size against latency of every verified candidate: met, missed, the Pareto front and the chosen one."""
    report = typed(report)
    cands = [c for c in (report.tune.candidates if report.tune else []) if c.latency_ratio is not None]
    if not cands:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    for met, style, label in ((True, "o", "met the target"), (False, "x", "missed the target")):
        pts = [c for c in cands if c.met == met]
        ax.scatter([c.size_ratio for c in pts], [c.latency_ratio for c in pts], marker=style, label=label)
    front = sorted((c for c in cands if c.pareto), key=lambda c: c.size_ratio)
    if front:
        ax.plot([c.size_ratio for c in front], [c.latency_ratio for c in front], "-", color="grey", lw=1,
                label="Pareto front")
    for c in cands:
        if c.chosen:
            ax.scatter([c.size_ratio], [c.latency_ratio], s=220, facecolors="none", edgecolors="red",
                       label="chosen")
        ax.annotate(c.key[:6], (c.size_ratio, c.latency_ratio), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("size x (of the base)")
    ax.set_ylabel("latency x (of the base)")
    ax.set_title("pipeline tune: verified candidates")
    return _finished_png(fig, ax)


def headline(report: Report) -> list[str]:
    """What must come first in every report (seeded, untrained weights)."""
    report = typed(report)
    return [n for n in report.notes if n.startswith("SEEDED")]


def markdown(report: Report, png_name: str | None = None, tune_png_name: str | None = None,
             tokens_png_name: str | None = None, audio_dir: str | None = None) -> str:
    """The report as Markdown; the `*_name`s and `audio_dir` are paths relative to it (None: not written)."""
    report = typed(report)
    lines = [f"**{n}**" for n in headline(report)]
    lines += [f"# Per-block error: {report.candidate} vs {report.reference}", ""]
    lines += [f"{report.samples} samples. Peak RSS {report.peak_rss_mb:.0f} MB.", ""]
    lines += [f"- {n}" for n in report.notes if n not in headline(report)]
    lines += [f"- {line}" for line in outputs_lines(report)] + [""]
    lines += _audio_markdown(report, audio_dir)
    if tokens_png_name:
        lines += [f"![teacher-forced top-1 agreement and KL per step]({tokens_png_name})", ""]
    if png_name:
        lines += [f"![isolated and accumulated SQNR per block]({png_name})", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for cells in _rows(report):
        cells = [f"`{cells[0]}`", *cells[1:-1], f"**{cells[-1]}**" if cells[-1] == "worst" else cells[-1]]
        lines.append("| " + " | ".join(cells) + " |")
    if report.rounds:
        lines += ["", "## Automatic fallback", ""] + [f"- {line}" for line in _round_lines(report)]
    if report.tune:
        lines += ["", "## Precision search (pipeline tune)", ""] + [f"- {line}" for line in _tune_lines(report)]
        if tune_png_name:
            lines += ["", f"![verified candidates, size against latency]({tune_png_name})"]
        lines += ["", "| " + " | ".join(TUNE_COLUMNS) + " |", "|" + "---|" * len(TUNE_COLUMNS)]
        lines += ["| " + " | ".join(cells) + " |" for cells in _tune_rows(report)]
    return "\n".join(lines) + "\n"


def _example_line(e: AudioExample) -> str:
    """One line on an audio example: which sample, why, and how far off it is."""
    length = f"length {e.length_change:+.2%}" if e.length_change else "same length"
    line = f"sample {e.sample} ({e.why}): log-mel {e.log_mel:.4f}, {e.reference_s:.2f} s, {length}"
    if e.divergence_s is not None:
        line += f", durations diverge at {e.divergence_s:.2f} s"
    return line


AUDIO_HEADING = "Listen: the worst and a typical sample"


def _audio_markdown(report: CheckReport, audio_dir: str | None) -> list[str]:
    examples = report.audio_examples or []
    if not examples:
        return []
    lines = [f"## {AUDIO_HEADING}", "", f"Output `{examples[0].output}`, by log-mel distance.", ""]
    for e in examples:
        if audio_dir is None:
            lines += [f"- {_example_line(e)} (WAV files not written)"]
            continue
        links = f"[reference]({audio_dir}/{e.reference_wav}), [candidate]({audio_dir}/{e.candidate_wav})"
        picture = f"mel spectrograms of sample {e.sample}: reference, candidate, difference"
        lines += [f"- {_example_line(e)}: {links}", "", f"  ![{picture}]({audio_dir}/{e.spectrogram})", ""]
        if report.asr is not None and e.sample < len(report.asr.sentences):
            s = report.asr.sentences[e.sample]
            lines += [f"  text: {s.text}", f"  reference heard: {s.reference_transcript}",
                      f"  candidate heard: {s.candidate_transcript}", ""]
    return lines


SORT_SCRIPT = """
// Click a column header to sort its table; again to reverse. Numbers sort as numbers ("inf" highest),
// "-" or an empty cell (missing) always last, text alphabetically.
(function () {
  function key(cell) {
    var t = cell.textContent.trim();
    if (t === "-" || t === "") return null;
    if (t === "inf") return Infinity;
    if (t === "-inf") return -Infinity;
    var n = parseFloat(t.replace(/,/g, ""));
    return isNaN(n) || !/^[-+.\\d]/.test(t) ? t : n;
  }
  function compare(a, b) {
    if (typeof a === typeof b) return a < b ? -1 : a > b ? 1 : 0;
    return typeof a === "number" ? -1 : 1;
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var heads = table.querySelectorAll("thead th");
    heads.forEach(function (th, col) {
      th.addEventListener("click", function () {
        var up = th.getAttribute("aria-sort") !== "ascending";
        heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", up ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows).map(function (r, i) {
          return {row: r, key: key(r.cells[col]), at: i};
        });
        rows.sort(function (a, b) {
          if (a.key === null || b.key === null) return (a.key === null) - (b.key === null) || a.at - b.at;
          return (up ? 1 : -1) * compare(a.key, b.key) || a.at - b.at;
        });
        rows.forEach(function (r) { body.appendChild(r.row); });
      });
    });
  });
})();
"""

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1500px}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} td:first-child{text-align:left;font-family:monospace}
th{background:#f4f4f4;cursor:pointer;user-select:none;white-space:nowrap;position:sticky;top:0}
th[aria-sort=ascending]::after{content:" \\25B2"} th[aria-sort=descending]::after{content:" \\25BC"}
tr.worst{background:#fde2e2} img{max-width:100%} .seeded{font-weight:bold;color:#a00}
.wide{overflow-x:auto} .wide img{max-width:none}
.example{border-top:1px solid #ddd;padding-top:.5em} .players{display:flex;gap:2em;flex-wrap:wrap}
.players figure{margin:0} .missing{color:#a00}
.transcripts dt{font-weight:600;margin-top:.3em} .transcripts dd{margin-left:1em} mark{background:#fcc}"""


def html_page(report: Report, png: bytes | None = None, tune: bytes | None = None,
              audio_dir: Path | None = None, tokens: bytes | None = None) -> str:
    """A self-contained page (no network); `png`/`tokens`: the plots already drawn for this report (drawing
    takes about a second), else drawn here; `audio_dir`: where the audio examples' files lie."""
    report = typed(report)
    png = base64.b64encode(png if png is not None else plot_png(report)).decode()
    tokens = tokens if tokens is not None else tokens_png(report)
    notes = "".join(f"<li>{html.escape(n)}</li>"
                    for n in report.notes + outputs_lines(report) + _round_lines(report))
    title = html.escape(f"Per-block error: {report.candidate} vs {report.reference}")
    first = "".join(f'<p class="seeded">{html.escape(n)}</p>' for n in headline(report))
    worst = (f"Rows in red: the {WORST} blocks with the lowest isolated SQNR (where the error is made). "
             "Click a column header to sort.")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><link rel="icon" href="data:,">
<style>{STYLE}</style></head>
<body>{first}<h1>{title}</h1>
<p>{report.samples} samples; peak RSS {report.peak_rss_mb:.0f} MB. Isolated: the block in candidate precision
fed the reference's inputs (the error it adds itself). Accumulated: the whole candidate run (the error piled up at its
output). SQNR is pooled over all samples.</p>
<ul>{notes}</ul>
{_audio_html(report, audio_dir)}{_tokens_html(tokens)}
<h2>Per block</h2>
<div class="wide"><img alt="isolated and accumulated SQNR per block" src="data:image/png;base64,{png}"></div>
<p>{worst}</p>
{_table_html(COLUMNS, _rows(report), "worst")}
{_tune_html(report, tune)}
<script>{SORT_SCRIPT}</script>
</body></html>
"""


def _table_html(columns: tuple[str, ...], rows: list[list[str]], marked: str) -> str:
    """A sortable table; rows whose last cell is `marked` highlighted."""
    head = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
    body = "".join(("<tr class=\"worst\">" if cells[-1] == marked else "<tr>")
                   + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in rows)
    return f'<table class="sortable"><thead>{head}</thead><tbody>{body}</tbody></table>'


def _tokens_html(png: bytes | None) -> str:
    if png is None:
        return ""
    return ("<h2>Tokens, step by step</h2><p>Teacher-forced: the candidate predicts each next token of the "
            "reference's own continuation; dashed: the first step where its free-running greedy decode differs."
            f'</p><img alt="teacher-forced top-1 agreement and KL per step" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')


def _audio_html(report: CheckReport, audio_dir: Path | None) -> str:
    examples = report.audio_examples or []
    if not examples:
        return ""
    intro = (f"Output <code>{html.escape(examples[0].output)}</code>, by log-mel distance: reference and "
             "candidate as the check heard them (16-bit WAV). Spectrograms: the metric's own log-mel front end, "
             "reference and candidate on one colour scale; the difference (candidate - reference) over their common "
             "frames, red louder, blue quieter.")
    parts = [f"<h2>{AUDIO_HEADING}</h2><p>{intro}</p>"]
    parts += [f'<section class="example"><h3>{html.escape(_example_line(e))}</h3>{_example_media(e, audio_dir)}'
              f"{_transcripts_html(report, e.sample)}</section>" for e in examples]
    return "".join(parts) + "\n"


def _transcripts_html(report: CheckReport, sample: int) -> str:
    """What the ASR engine heard in the sample's two renderings, the candidate's words that differ from the
    reference's marked; nothing without an ASR check."""
    from pipeline.evaluation.asr import differing_words

    if report.asr is None or sample >= len(report.asr.sentences):
        return ""
    s = report.asr.sentences[sample]
    marked = " ".join(f"<mark>{html.escape(w)}</mark>" if differs else html.escape(w)
                      for w, differs in differing_words(s.reference_transcript, s.candidate_transcript))
    return ('<dl class="transcripts">'
            f"<dt>text</dt><dd>{html.escape(s.text)}</dd>"
            f"<dt>reference heard ({s.word_errors_reference} word errors)</dt><dd>{html.escape(s.reference_transcript)}</dd>"
            f"<dt>candidate heard ({s.word_errors_candidate} word errors; marked: words the reference's transcript "
            f"lacks)</dt><dd>{marked or '<em>(nothing)</em>'}</dd></dl>")


def _example_media(e: AudioExample, audio_dir: Path | None) -> str:
    """Players and spectrograms of one example, from its files in `audio_dir`; a note when they are missing."""
    wavs = [audio_dir / e.reference_wav, audio_dir / e.candidate_wav] if audio_dir is not None else []
    if not wavs or not all(w.is_file() for w in wavs):
        where = f"are not in {audio_dir.name}/ (removed since the check?)" if audio_dir else "were not written"
        return f'<p class="missing">The WAV files of sample {e.sample} {html.escape(where)}: nothing to play.</p>'
    try:
        spectrogram = _spectrogram(e, audio_dir)
    except PipelineError as err:
        return f'<p class="missing">{html.escape(str(err))}</p>'
    players = "".join(
        f"<figure><figcaption>{role} ({seconds:.2f} s)</figcaption><audio controls preload=\"auto\" "
        f'src="data:audio/wav;base64,{base64.b64encode(wav.read_bytes()).decode()}"></audio></figure>'
        for role, seconds, wav in zip(("reference", "candidate"), (e.reference_s, e.candidate_s), wavs))
    return (f'<div class="players">{players}</div><img alt="mel spectrograms of sample {e.sample}: reference, '
            f'candidate, difference" src="data:image/png;base64,{base64.b64encode(spectrogram).decode()}">')


def _spectrogram(e: AudioExample, audio_dir: Path) -> bytes:
    """The example's spectrogram PNG as written beside its WAVs, or drawn again from them."""
    png = audio_dir / e.spectrogram
    if png.is_file():
        return png.read_bytes()
    reference, _ = read_wav(audio_dir / e.reference_wav)
    candidate, _ = read_wav(audio_dir / e.candidate_wav)
    return spectrogram_png(reference, candidate, MelSettings(**e.front_end.model_dump()),
                           f"sample {e.sample} ({e.why}): reference, candidate, candidate - reference",
                           e.divergence_s)


def _tune_html(report: CheckReport, png: bytes | None) -> str:
    if not report.tune:
        return ""
    img = (f'<img alt="verified candidates, size against latency" src="data:image/png;base64,'
           f'{base64.b64encode(png).decode()}">') if png else ""
    lines = "".join(f"<li>{html.escape(line)}</li>" for line in _tune_lines(report))
    return (f"<h2>Precision search (pipeline tune)</h2><ul>{lines}</ul>{img}"
            f"{_table_html(TUNE_COLUMNS, _tune_rows(report), 'chosen')}")


def write_audio(result: CheckReport, audio_dir: Path) -> bool:
    """The check's audio examples as WAV files and spectrogram PNGs in `audio_dir`; True when it holds them.

    A report fresh from a check holds the waveforms: it replaces what an earlier check left there. One read
    back from report.json holds only the names: the files written with it stay (a missing spectrogram is
    drawn again from its WAVs)."""
    examples = result.audio_examples or []
    fresh = not examples or all(result.waveform(e.reference_wav) is not None for e in examples)
    if fresh and audio_dir.is_dir():
        for old in audio_dir.iterdir():
            if _AUDIO_FILE.fullmatch(old.name):
                old.unlink()
    if not examples:
        if audio_dir.is_dir() and not any(audio_dir.iterdir()):
            audio_dir.rmdir()
        return False
    audio_dir.mkdir(parents=True, exist_ok=True)
    for e in examples:
        if fresh:
            # What the page plays and draws is the 16-bit file, so draw from its samples, not the float ones.
            for name in (e.reference_wav, e.candidate_wav):
                (audio_dir / name).write_bytes(wav_bytes(result.waveform(name), e.front_end.sample_rate))
        if not (audio_dir / e.spectrogram).is_file() and (audio_dir / e.reference_wav).is_file():
            try:
                (audio_dir / e.spectrogram).write_bytes(_spectrogram(e, audio_dir))
            except PipelineError:
                pass  # a damaged WAV: the page says so where the example would be
    return True


def write_reports(result: CheckReport, folder: Path, stem: str = "report") -> dict[str, Path]:
    """report.json, .md, .html and .png of a check in `folder`, plus -tokens.png (token families) and the
    audio examples in <stem>-audio/ (audio families)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{stem}.json", "md": folder / f"{stem}.md", "html": folder / f"{stem}.html",
             "png": folder / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result.to_json(), indent=2) + "\n")
    png = plot_png(result)
    paths["png"].write_bytes(png)
    extra = {"tune_png": (f"{stem}-tune.png", tune_png(result)), "tokens_png": (f"{stem}-tokens.png",
                                                                               tokens_png(result))}
    for key, (name, data) in extra.items():
        if data is not None:
            paths[key] = folder / name
            paths[key].write_bytes(data)
    audio_dir = folder / f"{stem}-audio"
    if write_audio(result, audio_dir):
        paths["audio"] = audio_dir
    paths["md"].write_text(markdown(result, png_name=paths["png"].name, tune_png_name=extra["tune_png"][0]
                                    if "tune_png" in paths else None, tokens_png_name=extra["tokens_png"][0]
                                    if "tokens_png" in paths else None,
                                    audio_dir=audio_dir.name if "audio" in paths else None))
    paths["html"].write_text(html_page(result, png, extra["tune_png"][1], audio_dir=audio_dir,
                                       tokens=extra["tokens_png"][1]))
    return paths
