"""`pipeline`: run, validate, inspect and benchmark ONNX shrinking recipes."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline import __version__
from pipeline.core.errors import PipelineError, during, one_line, user_message

if TYPE_CHECKING:
    from pipeline.evaluation.results import CheckReport

console = Console(stderr=True, highlight=False)
# Rich falls back to 80 columns when piped, which truncates the wide tables.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


class _Group(click.Group):
    """Turns user errors into one line and a non-zero exit; tracebacks only with --debug."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            from pipeline.engine.runfolder import RunInterrupted

            console.print(escape(e.hint) if isinstance(e, RunInterrupted) else "interrupted", soft_wrap=True)
            sys.exit(130)
        except click.UsageError as e:  # a bad option or argument: one line, as for any other bad input
            command = e.ctx.command_path if e.ctx else "pipeline"
            console.print(f"[bold red]error:[/] {escape(one_line(e.format_message(), 2000))} (see {command} --help)",
                          soft_wrap=True)
            sys.exit(2)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except Exception as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            message = user_message(e)  # the user's input or the machine (a full disk): one line, exit 2
            if message is not None:
                console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
                sys.exit(2)
            # a bug: still one line unless asked for the traceback
            console.print(f"[bold red]internal error:[/] {type(e).__name__}: {escape(one_line(e, 500))} "
                          f"(re-run with --debug for the traceback)", soft_wrap=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(__version__, prog_name="pipeline")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Shrink text-to-speech ONNX models (FP16, INT8) from a YAML recipe, block by block.

    Start with `pipeline run piper_int8`; `pipeline recipes` lists the installed recipes.
    """
    ctx.obj = {"debug": debug}


def _display(quiet: bool):
    """Live bars on a terminal, plain lines in a log (CI, a pipe), nothing with --quiet."""
    from pipeline.core.progress import Display

    return Display(console, "quiet" if quiet else ("rich" if console.is_terminal else "plain"))


quiet_option = click.option("--quiet", "-q", is_flag=True,
                            help="Print only the result: no progress, no step log, no block table.")
all_blocks_option = click.option("--all-blocks", is_flag=True,
                                 help="Show every block in the terminal table (default: the worst few; "
                                      "report.html always has all).")
class OutputPath(click.ParamType):
    """A path the command writes: never blank (an unset shell variable would make it the current folder, or a
    file named ' ')."""

    name = "path"

    def __init__(self, what: str, file: bool = True):
        self.what, self.file = what, file

    def convert(self, value, param, ctx) -> Path:
        if isinstance(value, Path):
            return value
        if not str(value).strip():
            self.fail(f"empty: give {self.what} (an unset shell variable?)", param, ctx)
        if self.file and Path(value).name in ("", ".", ".."):  # `.`, `/`, `dir/..`: no file name to write
            self.fail(f"{value!r} names no file: give {self.what}", param, ctx)
        return Path(value)


out_option = click.option("--out", "out_dir",
                          type=OutputPath("a folder for the run; a run replaces what it made there", file=False),
                          help="Run folder: a new or empty folder, or one a run made (default: the recipe's "
                               "`output`, else runs/<recipe name>).")
THREADS = click.IntRange(1, 1024)


class CountOrAll(click.ParamType):
    """A positive number, or `all` (as a recipe's `samples: all`)."""

    name = "N|all"

    def convert(self, value, param, ctx) -> int | str:
        if value == "all" or isinstance(value, int):
            return value
        try:
            number = int(value)
        except ValueError:
            number = 0
        if number < 1:
            self.fail(f"{value!r}: give a positive number or 'all'", param, ctx)
        return number


def audio_options(command):
    """--sample-rate, --audio-output, --durations: what a recipe's `model.audio` says, as options."""
    options = [
        click.option("--sample-rate", type=click.IntRange(1000, 384000),
                     help="Hz of the audio output: measure it as audio (log-mel, MCD, length) where no family "
                          "says so, or in place of the family's rate."),
        click.option("--audio-output", help="The output that is audio (default: the family's, else the first)."),
        click.option("--durations", help="Tensor whose reference values pin the candidate's durations where "
                                         "lengths differ (`pipeline inspect MODEL` lists candidates)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def declared_family(family, sample_rate: int | None, audio_output: str | None, durations: str | None):
    """`family` with the audio the options declare (itself when none is given)."""
    from pipeline.core.recipe import AudioSpec
    from pipeline.families import declare_audio

    if sample_rate is None and audio_output is None and durations is None:
        return family
    spec = AudioSpec(sample_rate=sample_rate, output=audio_output, durations=durations)
    return declare_audio(family, spec, where="--sample-rate/--audio-output/--durations: the audio")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@out_option
@quiet_option
@all_blocks_option
def run(recipe: Path, out_dir: Path | None, quiet: bool, all_blocks: bool) -> None:
    """Run RECIPE (a file, or the name of an installed recipe: see `pipeline recipes`): base model, then
    each step; finished steps are reused on a re-run, and an interrupted run resumes.

    A recipe with a `tune:` section runs the precision search first (as `pipeline tune`). One with
    `targets:` also writes those formats (gguf, torchscript, coreml) from the family's PyTorch model into
    final/<format>/, and its check measures them too."""
    _run_recipe(recipe, out_dir, quiet, all_blocks)


def _run_recipe(recipe: Path, out_dir: Path | None, quiet: bool, all_blocks: bool, need_tune: bool = False) -> None:
    from pipeline.core.progress import activity
    from pipeline.core.recipe import load_recipe
    from pipeline.search.run import check_recipe, run_recipe

    r = load_recipe(recipe)
    if need_tune and r.tune is None:
        raise PipelineError(f"{recipe}: no 'tune' section (menu, target, budget); `pipeline recipes` lists the "
                            f"installed recipes, those with one among them")
    target = out_dir or Path(r.output or f"runs/{r.name}")
    with _display(quiet) as display:
        with activity("checking the recipe"):
            plan = check_recipe(r)
        result = run_recipe(plan, target, log=display.log, resume_hint=_resume_hint(target))
    _print_result(result, quiet, all_blocks)


def _resume_hint(target: Path) -> str:
    """The command line that resumes this run: the same command, with the run folder spelled out."""
    import shlex

    args = sys.argv[1:]
    if "--out" not in args:
        args = [*args, "--out", str(target)]
    return "pipeline " + shlex.join(args)


def _print_result(result, quiet: bool, all_blocks: bool) -> None:
    from pipeline.formats.targets import files_line

    if not quiet:
        _print_run_summary(result)
    else:
        out.print(escape(f"final model: {result.out_dir / 'final'}"))
    for target in result.targets:
        out.print(escape(f"{target['format']}: {result.out_dir / 'final' / target['format']}: "
                         f"{files_line(target['files'])}"))
        for note in [] if quiet else target["notes"]:
            out.print(escape(f"    {note}"), style="dim")
    if result.report is None:
        return
    from pipeline.report.render import headline, outputs_lines, terminal_table

    report = result.report
    for line in headline(report):
        out.print(escape(line), style="bold red")
    if not quiet:
        out.print(terminal_table(report, limit=None if all_blocks else 8))
    notes = [] if quiet else [n for n in report.notes if n not in headline(report)]
    for line in notes + outputs_lines(report):
        out.print(escape(line))
    for failure in result.report.failures or []:
        out.print(escape(f"check (warn): {failure}"))
    out.print(escape(f"report: {result.out_dir / 'report.html'} (also .md, .json, .png)"))


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@out_option
@quiet_option
@all_blocks_option
def tune(recipe: Path, out_dir: Path | None, quiet: bool, all_blocks: bool) -> None:
    """Search every block's precision from RECIPE's `tune:` menu under its target.

    Measures each block under each menu item alone, chooses a combination with an additive model,
    verifies it whole and corrects the model until the target holds. Writes resolved_recipe.yaml
    (explicit steps that rebuild the model without the search), tune/trials.jsonl, and the model in
    final/ with its check report. Trials are cached: a re-run resumes. `pipeline run` on the same
    recipe does the same.
    """
    _run_recipe(recipe, out_dir, quiet, all_blocks, need_tune=True)


def _print_run_summary(result) -> None:
    table = Table(title=f"run folder: {result.out_dir}")
    for col in ("step", "pass", "cached", "MB", "nodes", "time s"):
        table.add_column(col, justify="right" if col in ("MB", "nodes", "time s") else "left")
    for rec in result.steps:
        m = rec.manifest
        graphs = m.get("graphs", {})
        table.add_row(rec.folder, m.get("pass", ""), "yes" if rec.cached else "no",
                      f"{sum(g['bytes'] for g in graphs.values()) / 1e6:.1f}",
                      str(sum(g["nodes"] for g in graphs.values())), f"{m.get('wall_s', 0):.1f}")
    out.print(table)
    files = ", ".join(g.file for g in result.final.graphs)
    out.print(escape(f"final model: {result.out_dir / 'final'} ({files}); total {result.wall_s:.1f} s"))


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
def validate(recipe: Path) -> None:
    """Check RECIPE (schema, passes, parameters, scopes, model, calibration) without running it."""
    from pipeline.core.recipe import load_recipe
    from pipeline.search.run import check_recipe

    r = load_recipe(recipe)
    plan = check_recipe(r)
    n = len(plan.calibration) if plan.calibration else 0
    targets = f", targets {', '.join(t.format for t in plan.targets)}" if plan.targets else ""
    out.print(escape(f"{recipe}: ok ({len(plan.steps)} steps" + (f", {n} calibration samples" if n else "")
                     + targets + ")"))
    for line in getattr(plan.family, "lacks", []):  # taken for a generic model, though it looks like another
        out.print(escape(f"note: {line}"))


@main.command()
@click.option("--markdown", is_flag=True, help="Print the README's pass table (Markdown) instead.")
def passes(markdown: bool) -> None:
    """List every pass with its parameters, defaults and what each does."""
    import textwrap

    from passes import PASSES, default_text, markdown_table, summary, type_name

    if markdown:
        click.echo(markdown_table(), nl=False)  # plain: rich would wrap and restyle the table
        return
    for name, cls in sorted(PASSES.items()):
        out.print(f"[bold]{name}[/]" + ("" if cls.scoped else "  (whole graph, no scope)"))
        out.print(escape(f"  {summary(cls)}"))
        for field_name, field in cls.Params.model_fields.items():
            out.print(escape(f"    {field_name}: {type_name(field.annotation)} ({default_text(field)})"))
            if field.description:
                text = textwrap.fill(field.description, width=110, initial_indent=" " * 8, subsequent_indent=" " * 8)
                out.print(escape(text), style="dim", soft_wrap=True)


@main.command()
def families() -> None:
    """List the model families this install knows (built-in and plug-ins), with their exporters and sources."""
    from pipeline.families import ENTRY_POINT_GROUP, plugin_problems
    from pipeline.families import families as known

    for name, cls in sorted(known().items()):
        out.print(f"[bold]{escape(name)}[/]  {escape(cls.description)}")
        exporters = ", ".join(e.name for e in cls.exporters) or "-"
        sources = ", ".join(s.name for s in cls.sources) or "-"
        targets = ", ".join(t.format for t in cls.targets) or "-"
        out.print(escape(f"    exporters: {exporters}; calibration sources: {sources}; targets: {targets}; "
                         f"module {cls.__module__}"))
    out.print(escape(f"plug-ins register a Family subclass under the entry-point group {ENTRY_POINT_GROUP}"),
              style="dim")
    # A plug-in set aside is not fatal: the listing above still works, and this is where its author learns why.
    for problem in plugin_problems():
        console.print(f"[yellow]warning:[/] {escape(problem)}", soft_wrap=True)


@main.command("recipes")
def recipes_list() -> None:
    """List the recipes installed with the package, with their descriptions; run one by name."""
    from pipeline.core.recipe import installed_recipes, load_recipe

    found = installed_recipes()
    if not found:
        raise PipelineError("no recipes installed with this package (reinstall it: pip install tts-onnx-pipeline)")
    width = max(map(len, found))
    for name, path in found.items():
        # Loaded through the schema, not just read: a listed recipe is one that `pipeline run NAME` accepts.
        out.print(f"[bold]{escape(name.ljust(width))}[/]  {escape(load_recipe(path).description)}", soft_wrap=True)
    folder = next(iter(found.values())).parent
    out.print(escape(f"in {folder}: run one by name from any folder, `pipeline run NAME` (into runs/NAME); "
                     f"copy its file to change it"), style="dim", soft_wrap=True)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--blocks", "pattern", is_flag=False, flag_value="", default=None, metavar="[RE]",
              help="Show the blocks as a tree of their scopes, inner rows summing their children. Alone: the "
              "default partition (node-name scopes such as /dec/ups.0); with a regex over node names: capture "
              "groups form the block id.")
@click.option("--on", type=click.Choice(["name", "namespace"]), default="name", show_default=True,
              help="Match the regex against node names or the `namespace` metadata.")
@click.option("--npz", type=click.Path(path_type=Path), metavar="FOLDER",
              help="Folder of .npz feed dicts: run the model once on the first (ONNX Runtime's profiler on) and "
              "show each block's FLOPs and share of kernel time for that input.")
def inspect(model: Path, pattern: str | None, on: str, npz: Path | None) -> None:
    """List the blocks of MODEL (an .onnx file): nodes, parameters, top op types, share of the weight bytes, and
    with --npz FLOPs and kernel time measured on a real input; then the durations candidates (Round/Ceil outputs
    that set a length downstream), for a recipe's model.audio.durations or --durations.

    MODEL may instead be a run folder (or its final/): then each graph with its size and weight precision,
    and each format the recipe's targets wrote beside ONNX (final/<format>/), with its files and sizes.
    """
    from pydantic import ValidationError

    from pipeline.core.blocks import BlockPartition
    from pipeline.core.graph_stats import TreeRow, durations_candidates, scope_tree
    from pipeline.core.onnx_io import load_onnx
    from pipeline.core.recipe import BlockSpec
    from pipeline.engine.profile import block_stats, first_feed, measure, profile_run

    if model.is_dir():
        if pattern is not None or npz is not None:
            raise PipelineError(f"--blocks and --npz take one .onnx file; {model} is a folder")
        _inspect_folder(model)
        return
    m = load_onnx(model)
    spec = None
    if pattern:
        try:
            spec = BlockSpec(patterns=[pattern], on=on)
        except ValidationError as e:
            raise PipelineError(f"--blocks: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    partition = BlockPartition(m, spec)
    measured = None
    if npz is not None:
        feed_file, feeds = first_feed(npz, m)
        measured = measure(m, partition, profile_run(model, feeds), feed_file)
    stats = block_stats(m, partition, measured)
    rows = scope_tree(stats) if pattern is not None else [TreeRow(b, 0, s, True) for b, s in stats.items()]
    out.print(_blocks_table(f"{model.name}: {len(m.graph.node)} nodes, {len(partition.blocks)} blocks", rows))
    _print_measured_note(measured)
    found = durations_candidates(m, partition)
    listed = "; ".join(f"{c.tensor} (node {c.node}, block {c.block})" for c in found)
    out.print(escape(f"durations candidates (for a recipe's model.audio.durations or --durations): "
                     f"{listed or 'none (no Round/Ceil output sets a length downstream)'}"), soft_wrap=True)


def _blocks_table(title: str, rows) -> Table:
    """The blocks (or the scope tree) with their shares of the model's weight bytes, FLOPs and kernel time."""
    top = [r for r in rows if r.depth == 0]
    totals = {key: sum(getattr(r.stats, key) or 0 for r in top) for key in ("weight_bytes", "macs", "kernel_us")}

    def share(value: int | None, key: str) -> str:
        return "-" if value is None else f"{100 * value / totals[key]:.1f}%" if totals[key] else "0.0%"

    table = Table(title=title)
    for col in ("block", "nodes", "params", "weights %", "FLOPs", "FLOPs %", "time %", "op types"):
        table.add_column(col, justify="left" if col in ("block", "op types") else "right")
    for row in rows:
        s = row.stats
        ops = ", ".join(f"{op} {n}" for op, n in s.ops.most_common(3))
        more = len(s.ops) - 3
        table.add_row(escape("  " * row.depth + row.label), str(s.nodes), f"{s.params:,}",
                      share(s.weight_bytes, "weight_bytes"), "-" if s.macs is None else _count(2 * s.macs),
                      share(s.macs, "macs"), share(s.kernel_us, "kernel_us"),
                      escape(ops + (f" +{more}" if more > 0 else "")))
    return table


def _count(n: int) -> str:
    """12345678 -> `12.3 M`; counts below 10,000 exact."""
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= max(size, 1e4):
            return f"{n / size:.3g} {unit}"
    return f"{n:,}"


def _print_measured_note(measured) -> None:
    """Where the FLOPs and times come from, and what of the graph they cover."""
    if measured is None:
        out.print("FLOPs and time: give --npz FOLDER (.npz feed dicts) to measure them on a real input", style="dim")
        return
    total_macs = sum(measured.macs.values()) + measured.stray_macs
    note = (f"measured on {measured.feed_file.name}: {_count(2 * total_macs)} FLOPs, "
            f"{measured.total_us / 1e3:.1f} ms of kernel time; FLOPs counted for {measured.counted_nodes} of "
            f"{measured.countable_nodes} Conv/MatMul-type nodes of the graph")
    if measured.counted_nodes < measured.countable_nodes:
        note += " (the rest fused away by ONNX Runtime, not run on this input, or of unknown shapes)"
    if measured.stray_us:
        kinds = ", ".join(f"{op} {n}" for op, n in measured.stray_ops.most_common(3))
        note += (f"; {100 * measured.stray_us / measured.total_us:.1f}% of kernel time in nodes ONNX Runtime "
                 f"added ({kinds}), in no block")
    out.print(escape(note), soft_wrap=True)


def _inspect_folder(folder: Path) -> None:
    from pipeline.core.modelset import ModelSet
    from pipeline.core.onnx_io import load_light
    from pipeline.core.precision import weight_precision
    from pipeline.formats.targets import TARGET_MANIFEST

    root = folder / "final" if (folder / "final" / "modelset.json").is_file() else folder
    ms = ModelSet.read(root)
    table = Table(title=f"{root}: {len(ms.graphs)} graphs, {ms.total_bytes() / 1e6:.1f} MB")
    for col in ("graph", "file", "MB", "nodes", "weights"):
        table.add_column(col, justify="right" if col in ("MB", "nodes") else "left")
    for g in ms.graphs:
        m = load_light(root / g.file)
        table.add_row(g.name, g.file, f"{(root / g.file).stat().st_size / 1e6:.1f}", str(len(m.graph.node)),
                      weight_precision(m))
    out.print(table)
    targets = sorted(p for p in root.iterdir() if (p / TARGET_MANIFEST).is_file())
    if not targets:
        out.print(escape(f"formats beside ONNX: none (a recipe's targets: section writes them into {root}/<format>/)"))
        return
    table = Table(title="formats beside ONNX")
    for col in ("format", "file", "MB", "notes"):
        table.add_column(col, justify="right" if col == "MB" else "left")
    for path in targets:
        record = json.loads((path / TARGET_MANIFEST).read_text())
        for i, (name, size) in enumerate(record["files"].items()):
            table.add_row(record["format"] if i == 0 else "", f"{path.name}/{name}", f"{size / 1e6:.1f}",
                          "; ".join(record.get("notes", [])) if i == 0 else "")
    out.print(table)


@main.command()
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path),
              help="Take the block spec and the inputs (check source or calibration) from this recipe.")
@click.option("--blocks", "pattern", help="Regex over node names; capture groups form the block id "
              "(default: node-name scopes such as /enc_p/encoder/attn_layers.3).")
@click.option("--on", type=click.Choice(["name", "namespace"]), default="name", show_default=True,
              help="Match --blocks against node names or the `namespace` metadata.")
@click.option("--samples", type=CountOrAll(),
              help="How many input samples to compare on, or `all` (default: up to 8; more than the "
              "inputs hold is an error).")
@click.option("--npz", type=click.Path(path_type=Path), help="Folder of .npz feed dicts to use as inputs.")
@click.option("--sensitivity", is_flag=True, help="Also measure, per block, the end-output error with only "
              "that block in candidate precision (one extra session per differing block).")
@click.option("--asr", is_flag=True, help="Transcribe both models' speech with the offline ASR engine "
              "(Moonshine base-en; pip install 'tts-onnx-pipeline[asr]') and report WER and CER against the "
              "evaluation text, and the increase.")
@click.option("--json", "json_path", type=OutputPath("a file name"),
              help="Write the report as JSON (into a folder that exists; never onto an input).")
@click.option("--html", "html_path", type=OutputPath("a file name"),
              help="Write a self-contained HTML report (+ <stem>-audio/ beside it).")
@click.option("--md", "md_path", type=OutputPath("a file name"),
              help="Write a Markdown report (+ PNG and <stem>-audio/ beside it).")
@audio_options
@quiet_option
@all_blocks_option
def compare(reference: Path, candidate: Path, recipe_path: Path | None, pattern: str | None, on: str,
            samples: int | str | None, npz: Path | None, sensitivity: bool, asr: bool, json_path: Path | None,
            html_path: Path | None,
            md_path: Path | None, sample_rate: int | None, audio_output: str | None, durations: str | None,
            quiet: bool, all_blocks: bool) -> None:
    """Attribute CANDIDATE's error vs REFERENCE to blocks: isolated and accumulated, per block.

    REFERENCE and CANDIDATE are .onnx files or run folders' final/. The model's
    family (a Piper voice, recognized by its .onnx.json; a vocoder taking 80-band
    mels) gives the default inputs (its evaluation sentences, noise at 0) and the
    output metrics, unless --recipe or --npz says otherwise.
    """
    from pydantic import ValidationError

    from pipeline.engine.comparison import asr_texts, eval_feeds, family_of_file, input_files, model_file, \
        run_compare
    from pipeline.core.recipe import BlockSpec, load_recipe
    from pipeline.report.render import outputs_lines, terminal_table
    from pipeline.engine.runfolder import check_report_paths

    from pipeline.families import declare_audio

    recipe = load_recipe(recipe_path) if recipe_path else None
    family = family_of_file(reference)
    if recipe is not None:
        family = declare_audio(family, recipe.model.audio, f"{recipe_path}: model.audio")
    family = declared_family(family, sample_rate, audio_output, durations)
    inputs = [*input_files(reference, family), *input_files(candidate, family),
              *[p for p in (recipe_path, npz) if p is not None], *(recipe.input_paths() if recipe else [])]
    check_report_paths({"--json": [json_path] if json_path else [],
                        "--html": [html_path, html_path.with_name(f"{html_path.stem}-audio")] if html_path else [],
                        "--md": [md_path, md_path.with_suffix(".png"), md_path.with_name(f"{md_path.stem}-audio")]
                        if md_path else []}, inputs)
    spec = recipe.blocks if recipe else None
    if pattern:
        try:
            spec = BlockSpec(patterns=[pattern], on=on)
        except ValidationError as e:
            raise PipelineError(f"--blocks: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    inputs = eval_feeds(model_file(reference), 8 if samples is None else samples, family, recipe,
                        recipe.check if recipe else None, npz, strict=samples is not None)
    texts = asr_texts(inputs, family, True, "--asr") if asr else None
    from pipeline.core.progress import status

    with _display(quiet):
        result = run_compare(reference, candidate, inputs.feeds, spec, family, sensitivity=sensitivity,
                             asr_texts=texts, progress=status("comparing"))
    if not quiet:
        out.print(terminal_table(result, limit=None if all_blocks else 8))
    for line in result.notes + outputs_lines(result):
        out.print(escape(line))
    out.print(f"peak RSS {result.peak_rss_mb:.0f} MB, {result.wall_s:.1f} s")
    if json_path:
        _write_json(json_path, result.to_json())
    with during("writing the report pages"):
        _write_compare_pages(result, html_path, md_path)


def _write_compare_pages(result: CheckReport, html_path: Path | None, md_path: Path | None) -> None:
    from pipeline.report.render import html_page, markdown, plot_png, write_audio

    if html_path:  # the audio examples' files beside the page (it embeds them too)
        audio_dir = html_path.with_name(f"{html_path.stem}-audio")
        html_path.write_text(html_page(result, audio_dir=audio_dir if write_audio(result, audio_dir) else None))
    if md_path:
        png = md_path.with_suffix(".png")
        png.write_bytes(plot_png(result))
        audio_dir = md_path.with_name(f"{md_path.stem}-audio")
        md_path.write_text(markdown(result, png_name=png.name,
                                    audio_dir=audio_dir.name if write_audio(result, audio_dir) else None))


@main.command()
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidates", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--sentences", "count", type=click.IntRange(min=1),
              help="Evaluation inputs to use (default: up to 5; more than the "
              "evaluation set holds is an error).")
@click.option("--sentences-file", type=click.Path(path_type=Path), help="Text file, one sentence a line "
              "(default: the shipped evaluation set, disjoint from the calibration set).")
@click.option("--repeat", default=5, show_default=True, type=click.IntRange(1, 10_000),
              help="Interleaved latency repetitions.")
@click.option("--threads", default=2, show_default=True, type=THREADS, help="ONNX Runtime intra-op threads.")
@click.option("--no-rss", is_flag=True, help="Skip the per-variant peak-RSS child processes.")
@click.option("--npz", type=click.Path(path_type=Path), help="Folder of .npz feed dicts to run on, in place of "
              "the family's evaluation inputs (any model).")
@click.option("--asr", is_flag=True, help="Transcribe every variant's speech with the offline ASR engine "
              "(pip install 'tts-onnx-pipeline[asr]') and add WER columns: against the sentences spoken (an --npz "
              "folder needs a texts.txt), and the increase over the reference's.")
@click.option("--json", "json_path", type=OutputPath("a file name"), help="Write the results as JSON here.")
@audio_options
@quiet_option
def bench(reference: Path, candidates: tuple[Path, ...], count: int | None, sentences_file: Path | None, repeat: int,
          threads: int, no_rss: bool, npz: Path | None, asr: bool, json_path: Path | None, sample_rate: int | None,
          audio_output: str | None, durations: str | None, quiet: bool) -> None:
    """Compare CANDIDATES with REFERENCE (.onnx files or run folders' final/, one graph each).

    Size ratio, latency ratio (interleaved in one process), peak RSS, and
    quality on the family's evaluation inputs (a voice's real sentences, noise
    at 0; a vocoder's real mels): output SNR where lengths match and, for audio,
    length difference and log-mel distance over the common length at the
    family's sample rate.
    """

    from pipeline.engine.bench import BENCH_NOTE, npz_inputs, resolve_variant, results_table, run_bench
    from pipeline.engine.comparison import as_modelset, family_of_file, input_files
    from pipeline.engine.runfolder import check_report_paths

    if npz is not None and sentences_file is not None:
        raise PipelineError("bench: give --npz or --sentences-file, not both")
    family = declared_family(family_of_file(reference), sample_rate, audio_output, durations)
    check_report_paths({"--json": [json_path] if json_path else []},
                       [p for path in (reference, *candidates, sentences_file, npz) if path is not None
                        for p in input_files(path, family)])
    variants = [resolve_variant(reference)] + [resolve_variant(c) for c in candidates]
    labels = [v.label for v in variants]
    for i, v in enumerate(variants):  # two final/ folders of different runs must stay apart
        if labels.count(v.label) > 1:
            v.label = f"{v.label}#{i}"
    if asr:
        from pipeline.engine.comparison import require_transcribable

        require_transcribable(family, "--asr")
        if npz is not None and not (npz / "texts.txt").is_file():
            raise PipelineError(f"--asr: {npz} has no texts.txt (one line per .npz file, in name order): no text "
                                f"to score the transcripts against")
    texts, feeds = npz_inputs(variants[0], npz, count or 5) if npz is not None else \
        family.bench_inputs(variants[0].path, count or 5, sentences_file)
    if count is not None and len(feeds) < count:  # a number the user gave is held to; the default is "up to"
        raise PipelineError(f"bench: --sentences: {count} inputs asked, but the evaluation set holds {len(feeds)}; "
                            f"ask for at most {len(feeds)}")
    from pipeline.core.progress import status

    with _display(quiet):
        result = run_bench(variants, feeds, texts, repeat=repeat, threads=threads, measure_rss=not no_rss,
                           progress=status("benchmarking"),
                           audio=family.audio(as_modelset(variants[0].path, family)), asr=asr)
    result["family"] = family.name
    out.print(results_table(result))
    out.print(BENCH_NOTE)
    if json_path:
        _write_json(json_path, result)


def _write_json(path: Path, data) -> None:
    """A command's --json file (checked before the work by runfolder.check_report_paths)."""
    with during(f"writing --json {path}"):
        path.write_text(json.dumps(data, indent=2) + "\n")


def _ids(ids: str | None) -> list[int] | None:
    if ids is None:
        return None
    try:
        return [int(x) for x in ids.split(",") if x.strip()]
    except ValueError:
        raise PipelineError(f"--ids: not a comma-separated list of integers: {ids!r}") from None


@main.command()
@click.argument("modelset", type=click.Path(path_type=Path))
@click.option("--steps", default=32, show_default=True, type=click.IntRange(1, 1_000_000),
              help="Tokens (or frames) to generate.")
@click.option("--mode", help="What to generate, as the family names it (ChatTTS: text, the default, or code).")
@click.option("--greedy/--sample", default=True, show_default=True,
              help="Greedy decoding, or the family's sampling through its sample head.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1),
              help="Seed of the uniform noise that sampling draws from.")
@click.option("--ids", "--text-ids", "ids", help="Prompt as comma-separated text token ids, e.g. 3,14,15.")
@click.option("--prompt", help="Prompt text, tokenized with --tokenizer.")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="The model's tokenizer folder, for --prompt.")
@click.option("--threads", default=2, show_default=True, type=THREADS,
              help="ONNX Runtime threads: one pool that every graph's session shares.")
@click.option("--conditioning", type=click.Path(path_type=Path),
              help="A .npy the family conditions on (a voice's conditioning latent).")
@click.option("--json", "json_path", type=OutputPath("a file name"),
              help="Write ids and timings as JSON (a family with arrays to keep writes them beside it).")
def generate(modelset: Path, steps: int, mode: str | None, greedy: bool, seed: int, ids: str | None,
             prompt: str | None, tokenizer: Path | None, threads: int, conditioning: Path | None,
             json_path: Path | None) -> None:
    """Generate with a token model set (e.g. runs/<recipe>/final) in ONNX Runtime, as its family does.

    Prints the generated ids and the per-step decode latency.
    """

    from pipeline.families import GenerateRequest, family_of
    from pipeline.core.modelset import ModelSet
    from pipeline.core.onnx_io import share_one_thread_pool

    from pipeline.engine.comparison import input_files
    from pipeline.engine.runfolder import check_report_paths

    inputs = [modelset, *[p for p in (tokenizer, conditioning) if p is not None]]
    check_report_paths({"--json": [json_path, json_path.with_suffix(".npz")] if json_path else []},
                       [p for path in inputs for p in input_files(path, None)])
    share_one_thread_pool(threads)  # this process only generates: its sessions run one after another
    request = GenerateRequest(_ids(ids), prompt, tokenizer, steps, greedy, seed, mode, threads, conditioning,
                              json_path)
    ms = ModelSet.read(modelset)
    result = family_of(ms).generate(ms, request)
    for line in result.lines:
        out.print(escape(line))
    if json_path:
        _write_json(json_path, result.data)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("text")
@click.option("--voice", help="The voice, for a family with several (Kokoro: a name in its voices file, default "
                              "jf_alpha); a Piper voice is its own model.")
@click.option("-o", "--out", "out_path", required=True, type=OutputPath("a .wav file name"),
              help="The WAV file to write (16-bit PCM at the model's sample rate).")
@click.option("--force", is_flag=True, help="Replace the --out file when it exists.")
@click.option("--threads", default=2, show_default=True, type=THREADS, help="ONNX Runtime threads.")
def say(model: Path, text: str, voice: str | None, out_path: Path, force: bool, threads: int) -> None:
    """Speak TEXT with MODEL and write it to a WAV file: listen to a result before and after.

    MODEL is a run folder (its final/ model), a model set folder, or a .onnx file with its sidecars beside it
    (a Piper voice's .onnx.json). The model's family turns the text into its inputs: Piper and Kokoro do. Kokoro
    speaks a text over 510 phonemes in several passes, cut at sentence, clause or word boundaries.

        pipeline say runs/kokoro_int8 "The quick brown fox." -o int8.wav
    """
    from pipeline.core.audio import wav_bytes
    from pipeline.engine.comparison import input_files
    from pipeline.engine.runfolder import check_report_paths
    from pipeline.engine.speak import speak

    if out_path.suffix.lower() != ".wav":
        raise PipelineError(f"--out {out_path}: give a .wav file name")
    check_report_paths({"--out": [out_path]}, input_files(model, None))
    if out_path.exists() and not force:
        raise PipelineError(f"--out {out_path} exists: give another name, or --force to replace it")
    speech = speak(model, text, voice, threads)
    out_path.write_bytes(wav_bytes(speech.audio, speech.sample_rate))
    split = f" in {len(speech.batches)} passes (split at <= 510 phonemes)" if len(speech.batches) > 1 else ""
    out.print(escape(f"{out_path}: {speech.duration:.2f} s of audio at {speech.sample_rate} Hz ({speech.family}"
                     f"{split}), spoken in {speech.seconds:.2f} s (real-time factor "
                     f"{speech.seconds / max(speech.duration, 1e-9):.2f})"))


if __name__ == "__main__":
    main()
