"""ChatTTS GPT decode step, our ONNX models against PyTorch eager and ONNX Runtime GenAI, side by side.

    python benchmarks/bench_chattts.py [--out runs/bench] [--rounds 3] [--steps 32] [--cache 128] [--threads 2]
        [--fp32 R] [--int8 R] [--int4 R]   (R: a recipe, run folder or model set; default recipes/chattts_*.yaml)
        [--accuracy] [--json PATH]
    pip install -e '.[genai]'     # for the genai_* variants (onnxruntime-genai)

Full size, seeded random weights (ChatTTS's config: hidden 768, 20 layers, 12 heads, text vocab 21178).
Variants: eager_fp32 (PyTorch, our ChatTTSGPT modules), ours_fp32/int8/int4 (our ModelSets through
ChatTTSRuntime: embedding, 20 layers, norm, text head), genai_fp32/int8/int4 (the same Llama built by
GenAI's model builder into OUT/genai, once; its FP32 is checked equal to ours). Ours come from
`pipeline run RECIPE --out OUT/<recipe>` (cached by the runner), or a run or model set folder.
A variant whose recipe, build or run fails is skipped with one line saying why; the rest still run.

Each variant is timed in a fresh process of its own (this script with --worker), the variants in turn
(A B C ... A B C ...) for --rounds rounds: prefill --cache seeded tokens, 1 warm-up step, --steps timed
decode steps of one token each (the greedy pick included), --threads intra-op threads. Reported: the
median over rounds of each worker's median (and the spread of the round medians), the ratio to eager,
the weight bytes a step reads (from the files; the embedding table counts one row) as GB/s against the
measured memory read bandwidth, and each worker's peak RSS. Then the issue's targets, PASS/FAIL from
this run alone. --accuracy adds SQNR of the final hidden states and teacher-forced top-1 agreement
against FP32 eager on prompt + 32 greedy tokens. Progress goes to stderr, the report to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ORDER = ("eager_fp32", "ours_fp32", "ours_int8", "ours_int4", "genai_fp32", "genai_int8", "genai_int4")
GENAI_MISSING = "onnxruntime-genai is not installed (pip install -e '.[genai]')"
WORKER_TIMEOUT_S = 1800


@dataclass
class Variant:
    name: str
    path: Path | None = None
    source: str = ""
    skipped: str = ""  # why, when skipped
    rounds: list[dict] = field(default_factory=list)
    weight_bytes: int | None = None

    @property
    def kind(self) -> str:
        return self.name.split("_")[0]

    @property
    def ms(self) -> float | None:
        return statistics.median(r["median_ms"] for r in self.rounds) if self.rounds else None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- workers ----------------------------------------------------------------------------------------------

def worker(args: argparse.Namespace) -> dict:
    """What one worker process computes (see chattts_peers)."""
    import chattts_peers as peers

    kind = args.variant.split("_")[0] if args.variant else None
    if args.worker == "time":
        return peers.time_decode(kind, args.path, args.threads, args.cache, args.steps)
    if args.worker == "bandwidth":
        return {"gbs": peers.bandwidth_gbs(args.threads)}
    if args.worker == "check":
        return peers.genai_check(args.path, args.ref, args.threads, args.cache)
    if args.worker == "hf":
        import genai_peer

        genai_peer.write_hf_folder(args.path)
        return {}
    if args.worker == "reference":
        return peers.write_reference(args.path, args.threads, args.cache)
    return peers.accuracy(kind, args.path, args.ref, args.threads)


def spawn(args: argparse.Namespace, kind: str, variant: str = "", path: Path | None = None,
          ref: Path | None = None, threads: int | None = None) -> dict:
    """Run one worker in a fresh process; its result, or {"error": its last line}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--variant", variant,
           "--threads", str(threads or args.threads), "--cache", str(args.cache), "--steps", str(args.steps)]
    cmd += ["--path", str(path)] if path else []
    cmd += ["--ref", str(ref)] if ref else []
    from worker_process import run_worker

    return run_worker(cmd, REPO, WORKER_TIMEOUT_S)


# --- preparing the variants -----------------------------------------------------------------------------

def run_recipe(recipe: Path, out: Path) -> str:
    """Run (or reuse) a recipe into `out`; '' or why it failed."""
    log(f"pipeline run {recipe} --out {out}")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--out", str(out)],
                         capture_output=True, text=True, cwd=REPO)
    if res.returncode:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()] or ["no message"]
        return f"{recipe}: recipe run failed: {lines[-1][-300:]}"
    return ""


def resolve_ours(v: Variant, spec: str, out: Path, done: dict[Path, str]) -> None:
    """A recipe (run into OUT/<stem>, its final/), a run folder (its final/), or a model set folder."""
    p = Path(spec)
    p = REPO / p if not p.exists() and (REPO / p).exists() else p
    v.source = spec
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            v.skipped = f"{spec} not found"
            return
        run = out / p.stem
        if run not in done:
            done[run] = run_recipe(p, run)
        v.skipped, v.path = done[run], run / "final"
    elif (p / "modelset.json").is_file():
        v.path = p
    elif (p / "final" / "modelset.json").is_file():
        v.path = p / "final"
    else:
        v.skipped = f"{spec}: neither a recipe, a run folder nor a model set folder"


def prepare_ours(args: argparse.Namespace, variants: dict[str, Variant]) -> None:
    done: dict[Path, str] = {}
    for name, spec in (("ours_fp32", args.fp32), ("ours_int8", args.int8), ("ours_int4", args.int4)):
        resolve_ours(variants[name], spec, args.out, done)


def prepare_genai(args: argparse.Namespace, names: list[str]) -> dict[str, Path | str]:
    """Build GenAI's models (`names`, e.g. fp32, int8_hidden) into OUT/genai; name -> folder, or why not."""
    import genai_peer

    root = args.out / "genai"
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "hf" / "bench.json").is_file():
        log(f"writing the Hugging Face Llama folder {root / 'hf'}")
        res = spawn(args, "hf", path=root / "hf")
        if "error" in res:
            return {n: f"writing the Hugging Face folder failed: {res['error']}" for n in names}
    built: dict[str, Path | str] = {}
    for name in names:
        if not genai_peer.is_built(root, name):
            log(f"GenAI model builder: {name} {' '.join(genai_peer.build_options(name)[1])}")
        try:
            built[name] = genai_peer.build(root, name)
        except RuntimeError as e:
            built[name] = str(e)
    return built


def prepare(args: argparse.Namespace) -> dict[str, Variant]:
    variants = {n: Variant(n) for n in ORDER}
    variants["eager_fp32"].source = "PyTorch eager, our ChatTTSGPT modules"
    prepare_ours(args, variants)
    genai = [variants[f"genai_{p}"] for p in ("fp32", "int8", "int4")]
    if args.genai_version is None:
        for v in genai:
            v.skipped = GENAI_MISSING
        return variants
    import genai_peer

    for v, (name, res) in zip(genai, prepare_genai(args, ["fp32", "int8", "int4"]).items()):
        v.source = f"GenAI builder -p {name} {' '.join(genai_peer.OPTIONS[name])}".strip()
        v.path, v.skipped = (res, "") if isinstance(res, Path) else (None, res)
    return variants


# --- measuring ----------------------------------------------------------------------------------------------

def run_rounds(args: argparse.Namespace, variants: dict[str, Variant]) -> None:
    """Every live variant once per round, in turn; a variant that fails once is dropped, saying why."""
    for r in range(args.rounds):
        for v in variants.values():
            if v.skipped:
                continue
            res = spawn(args, "time", v.name, v.path)
            if "error" in res:
                v.skipped = f"worker failed: {res['error']}"
                log(f"round {r + 1}: {v.name} failed: {res['error']}")
                continue
            v.rounds.append(res)
            log(f"round {r + 1}/{args.rounds} {v.name}: {res['median_ms']:.1f} ms (peak RSS {res['peak_rss_mb']:.0f} MB)")


def weight_bytes(variants: dict[str, Variant]) -> None:
    import chattts_peers as peers

    for v in variants.values():
        if v.skipped:
            continue
        try:
            v.weight_bytes = (v.rounds[0]["weight_bytes"] if v.kind == "eager" else
                              (peers.ours_step_bytes if v.kind == "ours" else peers.genai_step_bytes)(v.path))
        except Exception as e:  # noqa: BLE001 - the table says n/a, the log why
            log(f"{v.name}: weight bytes not computed: {e}")


def bandwidths(args: argparse.Namespace) -> dict[int, float | None]:
    out = {}
    for n in sorted({1, 2, args.threads}):
        res = spawn(args, "bandwidth", threads=n)
        out[n] = res.get("gbs")
    return out


def fp32_check(args: argparse.Namespace, variants: dict[str, Variant]) -> dict | None:
    ours, genai = variants["ours_fp32"], variants["genai_fp32"]
    if ours.skipped or genai.skipped:
        return None
    return spawn(args, "check", path=ours.path, ref=genai.path)


def run_accuracy(args: argparse.Namespace, variants: dict[str, Variant]) -> dict:
    """Reference from FP32 eager, then each model's teacher-forced prefill against it."""
    ref = args.out / "accuracy_reference.npz"
    res = spawn(args, "reference", path=ref)
    if "error" in res:
        return {"error": f"FP32 eager reference failed: {res['error']}"}
    models = {n: variants[n].path for n in ("ours_fp32", "ours_int8", "ours_int4") if not variants[n].skipped}
    if args.genai_version is not None:
        for name, built in prepare_genai(args, ["fp32_hidden", "int8_hidden", "int4_hidden"]).items():
            models[f"genai_{name.split('_')[0]}"] = built
    out = {}
    for name, path in models.items():
        out[name] = spawn(args, "accuracy", name, path, ref=ref) if isinstance(path, Path) else {"error": path}
        log(f"accuracy {name}: {out[name]}")
    return out


# --- the report -------------------------------------------------------------------------------------------

# (label, a, factor, b): PASS when a's step time x factor <= b's
TARGETS = [("ours_int8 <= genai_int8", "ours_int8", 1.0, "genai_int8"),
           ("ours_int4 <= genai_int4", "ours_int4", 1.0, "genai_int4"),
           ("ours_int8 >= 3x eager", "ours_int8", 3.0, "eager_fp32"),
           ("ours_int4 >= 4.5x eager", "ours_int4", 4.5, "eager_fp32"),
           ("ours_fp32 not slower than eager", "ours_fp32", 1.0, "eager_fp32")]


def fmt(x, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def versions() -> dict[str, str | None]:
    out = {}
    for pkg in ("onnxruntime", "onnxruntime-genai", "torch", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def header(args: argparse.Namespace, bw: dict[int, float | None], load: list[float]) -> list[str]:
    from pipeline.core.procinfo import machine_line

    v = versions()
    return [f"{machine_line()} (figures from different CPUs are not comparable)",
            f"load average (1 min) at start {load[0]:.2f}, at the end {load[1]:.2f}: other processes on the cores "
            "skew every figure, PyTorch eager's (OpenMP) the most",
            "versions: " + ", ".join(f"{k} {fmt(x, 's')}" for k, x in v.items()),
            f"ChatTTS GPT full size, seeded random weights (untrained). Decode step: 1 token through embedding, "
            f"20 layers, norm, text head, greedy pick; {args.cache}..{args.cache + args.steps} cached tokens; "
            f"{args.threads} intra-op threads; each variant in a fresh process, {args.rounds} round"
            f"{'s' * (args.rounds > 1)} in turn; per worker the median of {args.steps} steps (GenAI: its default "
            "session options but the threads)",
            "memory read bandwidth (torch sum over 1 GiB, best of 5): "
            + ", ".join(f"{n} thread{'s' * (n > 1)} {fmt(g)} GB/s" for n, g in bw.items())]


def check_line(check: dict | None) -> str:
    if check is None:
        return "GenAI FP32 = ours FP32: n/a (one of them is skipped)"
    if "error" in check:
        return f"GenAI FP32 = ours FP32: check failed: {check['error']}"
    same = check["tokens_equal"] == check["steps"] and check["logits_max_abs_diff"] <= 1e-3 * check["logits_max_abs"]
    return (f"GenAI FP32 = ours FP32: {'yes' if same else 'NO'}: logits at the prompt max |diff| "
            f"{check['logits_max_abs_diff']:.2e} (max |logit| {check['logits_max_abs']:.3f}); greedy "
            f"{check['tokens_equal']}/{check['steps']} tokens equal (EOS suppressed on both)")


def table(args: argparse.Namespace, variants: dict[str, Variant], bw: dict[int, float | None]) -> list[str]:
    eager, floor = variants["eager_fp32"].ms, bw.get(args.threads)
    head = (f"{'variant':11s} {'step ms':>8s} {'round medians':>15s} {'vs eager':>8s} {'MB/step':>8s} "
            f"{'GB/s':>6s} {'of bw':>6s} {'peak RSS MB':>11s}")
    lines = [head, "-" * len(head)]
    for v in variants.values():
        if not v.rounds:
            continue
        meds = [r["median_ms"] for r in v.rounds]
        gbs = v.weight_bytes / v.ms / 1e6 if v.weight_bytes else None
        lines.append(f"{v.name:11s} {v.ms:8.1f} {f'{min(meds):.1f}..{max(meds):.1f}':>15s} "
                     f"{fmt(eager / v.ms if eager else None, '.2f') + 'x':>8s} "
                     f"{fmt(v.weight_bytes / 1e6 if v.weight_bytes else None, '.0f'):>8s} {fmt(gbs):>6s} "
                     f"{fmt(gbs / floor if gbs and floor else None, '.2f'):>6s} "
                     f"{max(r['peak_rss_mb'] for r in v.rounds):11.0f}")
    lines.append(f"(MB/step: weight bytes a step reads, from the files, the embedding table as one row; of bw: "
                 f"GB/s over the measured {args.threads}-thread read bandwidth; peak RSS: the worker's, the largest "
                 "over rounds; eager's includes generating the seeded weights)")
    return lines


def target_lines(variants: dict[str, Variant]) -> tuple[list[str], list[dict]]:
    lines, out = ["targets (this run only):"], []
    for label, a, factor, b in TARGETS:
        ta, tb = variants[a].ms, variants[b].ms
        ok = None if ta is None or tb is None else ta * factor <= tb
        verdict = "n/a" if ok is None else "PASS" if ok else "FAIL"
        lines.append(f"  {verdict:4s} {label}: {a} {fmt(ta)} ms, {b} {fmt(tb)} ms"
                     + (f" ({tb / ta:.2f}x)" if ok is not None else ""))
        out.append({"target": label, "result": verdict, a: ta, b: tb})
    return lines, out


def accuracy_lines(acc: dict) -> list[str]:
    if "error" in acc:
        return [f"accuracy: {acc['error']}"]
    lines = ["accuracy vs FP32 eager (seeded prompt + its 32 greedy tokens, teacher-forced; GenAI models built "
             "with include_hidden_states=1, whose hidden_states is the final norm's output: its graph has no "
             "pre-norm tensor, the last residual add is fused into the norm):",
             f"  {'model':11s} {'SQNR final norm dB':>18s} {'SQNR last layer dB':>18s} {'top-1 agreement':>15s}"]
    for name, r in acc.items():
        if "error" in r:
            lines.append(f"  {name:11s} failed: {r['error']}")
            continue
        lines.append(f"  {name:11s} {fmt(r['sqnr_final_norm_db']):>18s} {fmt(r['sqnr_last_layer_db']):>18s} "
                     f"{r['top1_agreement']:>15.3f}")
    return lines


def sources(variants: dict[str, Variant]) -> list[str]:
    """Where each variant comes from, or one line saying why it was skipped (genai_* once when GenAI is missing)."""
    lines = []
    for v in variants.values():
        if v.skipped == GENAI_MISSING:
            line = f"skipped genai_*: {GENAI_MISSING}"
            lines += [] if line in lines else [line]
        elif v.skipped:
            lines.append(f"skipped {v.name}: {v.skipped}")
        elif v.kind != "eager":
            lines.append(f"  {v.name}: {v.source}" + (f" -> {v.path}" if str(v.path) != v.source else ""))
    return lines


# --- main -------------------------------------------------------------------------------------------------

def write_json(path: Path, data: dict) -> None:
    from pipeline.core.procinfo import cpu_description

    data["variants"] = {n: {**asdict(v), "path": str(v.path) if v.path else None, "step_ms": v.ms}
                        for n, v in data["variants"].items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": cpu_description(), **data}, indent=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench", help="recipe runs, GenAI builds")
    ap.add_argument("--rounds", type=int, default=3, help="every variant once per round, in turn")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per worker")
    ap.add_argument("--cache", type=int, default=128, help="prompt tokens prefilled before the decode steps")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every variant")
    ap.add_argument("--int8", default="recipes/chattts_int8.yaml", help="recipe, run folder or model set")
    ap.add_argument("--int4", default="recipes/chattts_int4.yaml", help="recipe, run folder or model set")
    ap.add_argument("--fp32", default="recipes/chattts_fp32.yaml", help="recipe, run folder or model set")
    ap.add_argument("--accuracy", action="store_true", help="also SQNR and top-1 agreement vs FP32 eager")
    ap.add_argument("--json", type=Path, help="write everything there too")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="", help=argparse.SUPPRESS)
    ap.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--ref", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main() -> int:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    t0, load = time.perf_counter(), [os.getloadavg()[0]]
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    import genai_peer

    args.genai_version = genai_peer.version()
    variants = prepare(args)
    bw = bandwidths(args)
    check = fp32_check(args, variants)
    run_rounds(args, variants)
    weight_bytes(variants)
    acc = run_accuracy(args, variants) if args.accuracy else None
    targets, target_json = target_lines(variants)
    load.append(os.getloadavg()[0])
    lines = [*header(args, bw, load), check_line(check), *sources(variants), *table(args, variants, bw), *targets]
    lines += accuracy_lines(acc) if acc is not None else []
    lines.append(f"benchmark wall time {time.perf_counter() - t0:.0f} s")
    print("\n".join(lines))
    if args.json:
        write_json(args.json, {"versions": versions(), "args": {k: str(v) for k, v in vars(args).items()},
                               "bandwidth_gbs": bw, "genai_fp32_check": check, "targets": target_json,
                               "accuracy": acc, "variants": variants, "report": lines})
    return 0


if __name__ == "__main__":
    sys.exit(main())
