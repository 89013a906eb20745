"""Reports of a check: terminal table, JSON, Markdown, and a self-contained HTML page with a plot.

They render the JSON form of a `pipeline.results.CheckReport` (`"schema": "tts-onnx-pipeline/check/1"`),
whose models document every field:

    {"samples": N, "reference": str, "candidate": str, "notes": [str], "peak_rss_mb": float, "wall_s": float,
     "blocks": [{"block": id, "params": int, "bytes_reference": int, "bytes_candidate": int,
                 "precision": {"fp32"|"fp16"|"int8"|"other": nodes}, "weights": {dtype: bytes},
                 "matched": bool, "unmatched_tensors": [str], "outputs": [tensor],
                 "isolated": M, "accumulated": M, "amplification": float|"inf"|null,
                 "sensitivity": {...}?}],
     "outputs": [{"name": str, **M, "audio": {"log_mel_mean", "log_mel_max", "mcd_db_mean",
                  "length_diff_max_abs", "samples_with_length_change", "sample_rate"}?, <family metric>: {...}?}],
     "tokens": {...}? (token families), "family": str, "key": str, "failures": [str],
     "rounds": [...]? (automatic fallback)}
    M = {"sqnr_db": float|"inf"|null, "cosine", "max_abs", "rel_l2", "samples", "shape_mismatches"}

Blocks are in graph order. SQNR "inf" means identical; null means no sample could be compared.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .results import as_float

if TYPE_CHECKING:
    from .results import CheckReport

WORST = 3


def _fmt_db(v: Any) -> str:
    x = as_float(v)
    return "inf" if x == math.inf else ("-" if math.isnan(x) else f"{x:.1f}")


def worst_blocks(report: dict[str, Any], n: int = WORST) -> list[str]:
    """Blocks with the lowest finite isolated SQNR: where the error is made."""
    ranked = [(b["block"], as_float(b["isolated"]["sqnr_db"])) for b in report["blocks"]
              if b["matched"] and math.isfinite(as_float(b["isolated"]["sqnr_db"]))]
    return [b for b, _ in sorted(ranked, key=lambda x: x[1])[:n]]


def _precision(p: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(p.items()) if k != "other") or "-"


def terminal_table(report: dict[str, Any]):
    from rich.table import Table

    worst = set(worst_blocks(report))
    title = f"per-block error, {report['samples']} samples: {report['candidate']} vs {report['reference']}"
    table = Table(title=title)
    for col in ("block", "params", "iso SQNR dB", "acc SQNR dB", "amplif.", "iso cos", "acc max abs",
                "precision", "KB ref->cand", ""):
        table.add_column(col, justify="left" if col in ("block", "precision", "") else "right")
    for b in report["blocks"]:
        amp = b["amplification"]
        mark = "[bold red]<< worst[/]" if b["block"] in worst else ("[yellow]unmatched[/]" if not b["matched"] else "")
        table.add_row(b["block"], f"{b['params']:,}", _fmt_db(b["isolated"]["sqnr_db"]),
                      _fmt_db(b["accumulated"]["sqnr_db"]),
                      "-" if amp is None else ("inf" if amp == "inf" else f"{amp:.1f}x"),
                      f"{b['isolated']['cosine']:.5f}", f"{b['accumulated']['max_abs']:.3g}",
                      _precision(b["precision"]), f"{b['bytes_reference'] // 1024}->{b['bytes_candidate'] // 1024}",
                      mark)
    return table


def outputs_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    t = report.get("tokens")
    if t:
        lines.append(_token_line(t.get("head", "text head"), t, f"{t['decode_steps']} steps a prompt",
                                 report["samples"]))
        if t.get("code_head") and t["code_head"]["teacher_forced_top1_agreement"] is not None:
            lines.append(_token_line("code head", t["code_head"], "per codebook", report["samples"]))
    for o in report["outputs"]:
        line = (f"output {o['name']}: SQNR {_fmt_db(o['sqnr_db'])} dB, cosine {o['cosine']:.5f}, "
                f"max abs {o['max_abs']:.3g}, rel L2 {as_float(o['rel_l2']):.4g}")
        if o.get("shape_mismatches"):
            line += f" ({o['shape_mismatches']} samples with a different shape not compared)"
        a = o.get("audio")
        if a:
            line += (f"; log-mel mean {a['log_mel_mean']:.4f}, max {a['log_mel_max']:.4f}"
                     + (f", MCD {a['mcd_db_mean']:.2f} dB" if a.get("mcd_db_mean") is not None else "") + "; "
                     f"length change max {a['length_diff_max_abs']:.2%} "
                     f"({a['samples_with_length_change']} of {report['samples']} samples)")
        lines.append(line)
    return lines


def _token_line(head: str, t: dict[str, Any], what: str, samples: int) -> str:
    return (f"tokens ({head}, {what}): teacher-forced top-1 agreement {t['teacher_forced_top1_agreement']:.3f}, "
            f"KL mean {t['teacher_forced_kl_mean']:.4g} max {t['teacher_forced_kl_max']:.4g}; free-running greedy "
            f"diverged on {t['prompts_diverged']} of {samples} prompts"
            + (f", first at step {t['first_divergence_min']}" if t["first_divergence_min"] is not None else ""))


def plot_png(report: dict[str, Any]) -> bytes:
    """Isolated and accumulated SQNR per block, in graph order (inf drawn at the top)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = [b for b in report["blocks"] if b["matched"]]
    iso = [as_float(b["isolated"]["sqnr_db"]) for b in blocks]
    acc = [as_float(b["accumulated"]["sqnr_db"]) for b in blocks]
    finite = [v for v in iso + acc if math.isfinite(v)]
    top = (max(finite) if finite else 100) + 10

    def clip(v: float) -> float:
        return top if v == math.inf else v

    fig, ax = plt.subplots(figsize=(max(8, 0.22 * len(blocks)), 5), dpi=110)
    x = range(len(blocks))
    ax.plot(x, [clip(v) for v in iso], "o-", ms=3, label="isolated (error the block adds)")
    ax.plot(x, [clip(v) for v in acc], "s-", ms=3, label="accumulated (error at its output)")
    ax.axhline(top, color="grey", lw=0.5, ls=":")
    ax.text(0, top, " identical (inf)", va="bottom", fontsize=7, color="grey")
    ax.set_xticks(list(x))
    ax.set_xticklabels([b["block"] for b in blocks], rotation=90, fontsize=6)
    ax.set_ylabel("SQNR dB (higher is better)")
    ax.set_title(f"{report['candidate']} vs {report['reference']}, {report['samples']} samples")
    return _finished_png(fig, ax)


def _finished_png(fig, ax) -> bytes:
    """A grid, the legend, and the figure as PNG bytes (the figure closed)."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


COLUMNS = ("block", "params", "isolated SQNR dB", "accumulated SQNR dB", "amplification", "precision",
           "KB ref -> cand", "")


def _rows(report: dict[str, Any]) -> list[list[str]]:
    """One row of cells per block, shared by the Markdown and HTML reports."""
    worst = set(worst_blocks(report))
    rows = []
    for b in report["blocks"]:
        amp = b["amplification"]
        rows.append([b["block"], f"{b['params']:,}", _fmt_db(b["isolated"]["sqnr_db"]),
                     _fmt_db(b["accumulated"]["sqnr_db"]),
                     "-" if amp is None else ("inf" if amp == "inf" else f"{amp:.1f}x"),
                     _precision(b["precision"]), f"{b['bytes_reference'] // 1024} -> {b['bytes_candidate'] // 1024}",
                     "worst" if b["block"] in worst else ("unmatched" if not b["matched"] else "")])
    return rows


def _round_lines(report: dict[str, Any]) -> list[str]:
    return [f"round {r['round']}: {len(r['kept'])} blocks kept in {r['kept_in']}; {r['summary']}"
            + (f"; moved next: {', '.join(r['moved_next'])}" if r["moved_next"] else "")
            for r in report.get("rounds", [])]


TUNE_COLUMNS = ("candidate", "choices", "size x", "latency x", "log-mel max", "SQNR dB", "length change",
                "target", "")


def _tune_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for c in (report.get("tune") or {}).get("candidates", []):
        mark = "chosen" if c["chosen"] else ("Pareto" if c["pareto"] else "")
        rows.append([c["key"][:8], c["choices"], f"{c['size_ratio']:.3f}",
                     "-" if c["latency_ratio"] is None else f"{c['latency_ratio']:.2f}",
                     "-" if c["log_mel_max"] is None else f"{c['log_mel_max']:.4f}", _fmt_db(c["sqnr_db"]),
                     f"{c['length_change_max']:.2%}", "met" if c["met"] else "missed: " + "; ".join(c["misses"]),
                     mark])
    return rows


def _tune_lines(report: dict[str, Any]) -> list[str]:
    t = report.get("tune")
    if not t:
        return []
    target = ", ".join(f"{k} {v}" for k, v in t["target"].items() if v not in ({}, None))
    return [f"objective {t['objective']}; target {target}", f"{t['blocks_searched']} blocks searched, menu "
            f"{', '.join(t['menu'])}; {t['trials']} trials ({t['screening_trials']} screening) on {t['executor']}, "
            f"{t['wall_s']:.0f} s", f"tune samples: {t['samples']} (the table above is on the evaluation inputs)"]


def tune_png(report: dict[str, Any]) -> bytes | None:
    """Size against latency of every verified candidate: met, missed, the Pareto front and the chosen one."""
    cands = [c for c in (report.get("tune") or {}).get("candidates", []) if c["latency_ratio"] is not None]
    if not cands:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    for met, style, label in ((True, "o", "met the target"), (False, "x", "missed the target")):
        pts = [c for c in cands if c["met"] == met]
        ax.scatter([c["size_ratio"] for c in pts], [c["latency_ratio"] for c in pts], marker=style, label=label)
    front = sorted((c for c in cands if c["pareto"]), key=lambda c: c["size_ratio"])
    if front:
        ax.plot([c["size_ratio"] for c in front], [c["latency_ratio"] for c in front], "-", color="grey", lw=1,
                label="Pareto front")
    for c in cands:
        if c["chosen"]:
            ax.scatter([c["size_ratio"]], [c["latency_ratio"]], s=220, facecolors="none", edgecolors="red",
                       label="chosen")
        ax.annotate(c["key"][:6], (c["size_ratio"], c["latency_ratio"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("size x (of the base)")
    ax.set_ylabel("latency x (of the base)")
    ax.set_title("pipeline tune: verified candidates")
    return _finished_png(fig, ax)


def headline(report: dict[str, Any]) -> list[str]:
    """What must come first in every report (seeded, untrained weights)."""
    return [n for n in report.get("notes", []) if n.startswith("SEEDED")]


def markdown(report: dict[str, Any], png_name: str | None = None, tune_png_name: str | None = None) -> str:
    lines = [f"**{n}**" for n in headline(report)]
    lines += [f"# Per-block error: {report['candidate']} vs {report['reference']}", ""]
    lines += [f"{report['samples']} samples. Peak RSS {report['peak_rss_mb']:.0f} MB.", ""]
    lines += [f"- {n}" for n in report.get("notes", []) if n not in headline(report)]
    lines += [f"- {line}" for line in outputs_lines(report)] + [""]
    if png_name:
        lines += [f"![isolated and accumulated SQNR per block]({png_name})", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for cells in _rows(report):
        cells = [f"`{cells[0]}`", *cells[1:-1], f"**{cells[-1]}**" if cells[-1] == "worst" else cells[-1]]
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("rounds"):
        lines += ["", "## Automatic fallback", ""] + [f"- {line}" for line in _round_lines(report)]
    if report.get("tune"):
        lines += ["", "## Precision search (pipeline tune)", ""] + [f"- {line}" for line in _tune_lines(report)]
        if tune_png_name:
            lines += ["", f"![verified candidates, size against latency]({tune_png_name})"]
        lines += ["", "| " + " | ".join(TUNE_COLUMNS) + " |", "|" + "---|" * len(TUNE_COLUMNS)]
        lines += ["| " + " | ".join(cells) + " |" for cells in _tune_rows(report)]
    return "\n".join(lines) + "\n"


def html_page(report: dict[str, Any], png: bytes | None = None, tune: bytes | None = None) -> str:
    """A self-contained page; `png`: the plot already drawn for this report (drawing it takes about a second)."""
    png = base64.b64encode(png if png is not None else plot_png(report)).decode()
    head = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS) + "</tr>"
    body = []
    for cells in _rows(report):
        cls = ' class="worst"' if cells[-1] == "worst" else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    notes = "".join(f"<li>{html.escape(n)}</li>"
                    for n in report.get("notes", []) + outputs_lines(report) + _round_lines(report))
    title = html.escape(f"Per-block error: {report['candidate']} vs {report['reference']}")
    first = "".join(f'<p class="seeded">{html.escape(n)}</p>' for n in headline(report))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} td:first-child{{text-align:left;font-family:monospace}}
tr.worst{{background:#fde2e2}} img{{max-width:100%}} .seeded{{font-weight:bold;color:#a00}}</style></head>
<body>{first}<h1>{title}</h1>
<p>{report['samples']} samples; peak RSS {report['peak_rss_mb']:.0f} MB. Isolated: the block in candidate precision
fed the reference's inputs (the error it adds itself). Accumulated: the whole candidate run (the error piled up at its
output). SQNR is pooled over all samples.</p>
<ul>{notes}</ul>
<img alt="isolated and accumulated SQNR per block" src="data:image/png;base64,{png}">
<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>
{_tune_html(report, tune)}
</body></html>
"""


def _tune_html(report: dict[str, Any], png: bytes | None) -> str:
    if not report.get("tune"):
        return ""
    head = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in TUNE_COLUMNS) + "</tr>"
    chosen = ' class="worst"'
    body = "".join(f"<tr{chosen if cells[-1] == 'chosen' else ''}>"
                   + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in _tune_rows(report))
    img = (f'<img alt="verified candidates, size against latency" src="data:image/png;base64,'
           f'{base64.b64encode(png).decode()}">') if png else ""
    lines = "".join(f"<li>{html.escape(line)}</li>" for line in _tune_lines(report))
    return (f"<h2>Precision search (pipeline tune)</h2><ul>{lines}</ul>{img}"
            f"<table><thead>{head}</thead><tbody>{body}</tbody></table>")


def write_reports(result: CheckReport, folder: Path, stem: str = "report") -> dict[str, Path]:
    """report.json, .md, .html and .png of a check in `folder`."""
    report = result.to_json()
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{stem}.json", "md": folder / f"{stem}.md", "html": folder / f"{stem}.html",
             "png": folder / f"{stem}.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    png = plot_png(report)
    paths["png"].write_bytes(png)
    tune = tune_png(report)
    if tune is not None:
        paths["tune_png"] = folder / f"{stem}-tune.png"
        paths["tune_png"].write_bytes(tune)
    paths["md"].write_text(markdown(report, png_name=paths["png"].name,
                                    tune_png_name=paths["tune_png"].name if tune else None))
    paths["html"].write_text(html_page(report, png, tune))
    return paths
