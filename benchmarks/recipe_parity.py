"""Refactor parity: every shipped recipe's final graphs, run on fixed inputs, give the same bytes.

    python benchmarks/recipe_parity.py record --out runs/parity.json   # before a refactor
    python benchmarks/recipe_parity.py verify runs/parity.json         # after it: exit 1 on any difference

Each recipe in recipes/ is run into runs/parity/<name>; each graph of its final/
folder is run in ONNX Runtime on fixed inputs and its outputs hashed (sha256 of
the raw bytes, per output). Inputs, chosen by the graph's own input names:
real speech (phonemized evaluation sentences, noise at 0) for a voice, real
mels of Piper speech for a vocoder, seeded feeds for every other graph. The
names of the files under final/ are recorded too. Graph files themselves may
differ in provenance metadata (the recipe hash), so outputs are what is compared.

This script deliberately reads only modelset.json, ONNX Runtime and the
calibration sources, so it runs unchanged before and after the refactor.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's calibration sources, even beside another editable install
TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
         "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _seeded(sess: ort.InferenceSession, seed: int) -> dict[str, np.ndarray]:
    """Seeded values for every input; symbolic dims take 3 (past lengths included, so caches are real)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 3 for d in i.shape]
        dtype = TYPES[i.type]
        if np.issubdtype(dtype, np.integer):
            feeds[i.name] = np.asarray(rng.integers(0, 100, size=shape)).astype(dtype)
        elif dtype == np.bool_:
            feeds[i.name] = np.asarray(rng.random(shape) > 0.5)
        else:
            feeds[i.name] = np.asarray(rng.random(shape)).astype(dtype)
    return feeds


def _real_inputs(model_path: Path, input_names: set[str]) -> list[dict[str, np.ndarray]] | None:
    from calibration import SourceContext
    try:  # the source registry moved from calibration to the family layer; this script runs on both sides
        from pipeline.families import make_source
    except ImportError:
        from calibration import make_source

    if {"input", "input_lengths", "scales"} <= input_names:
        configs = sorted(model_path.parent.glob("*.onnx.json"))  # a split voice keeps it beside its encoder
        source = make_source("piper", {"count": 3, "config": str(configs[0])}, SourceContext(model_path))
    elif input_names == {"mel"}:
        source = make_source("piper_mels", {"count": 2}, SourceContext(model_path))
    else:
        return None
    return list(source.feeds())


def _digest(values: list[np.ndarray]) -> list[str]:
    return [hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() + f":{v.dtype}:{list(v.shape)}"
            for v in values]


def _run_digest(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[str] | str:
    try:
        return _digest(sess.run(None, feeds))
    except Exception as e:  # seeded values a graph rejects: the same rejection on both sides is parity too
        return f"error: {type(e).__name__}"


def graph_outputs(final: Path) -> dict[str, object]:
    """{graph: [[output digests] per input]} for a final/ folder, chains run in dataflow order."""
    manifest = json.loads((final / "modelset.json").read_text())
    edges = [(e["from"].split(".", 1), e["to"].split(".", 1)) for e in manifest.get("chain", [])
             if "." in e.get("from", "") and "|" not in e["from"] + e.get("to", "")]
    fed = {dst[0] for _, dst in edges}
    sessions = {g["name"]: _session(final / g["file"]) for g in manifest["graphs"]}
    result: dict[str, object] = {}
    entry = [g for g in sessions if g not in fed]
    # Real inputs for the entry graph where it is a voice or a vocoder; a chain runs downstream from them.
    if edges and len(entry) == 1:
        names = {i.name for i in sessions[entry[0]].get_inputs()}
        inputs = _real_inputs(final / manifest["graphs"][0]["file"], names) or [_seeded(sessions[entry[0]], 0)]
        for k, feeds in enumerate(inputs):
            produced: dict[str, dict[str, np.ndarray]] = {}
            for g in [entry[0]] + [d[0] for _, d in edges if d[0] != entry[0]]:
                sess = sessions[g]
                f = {}
                for i in sess.get_inputs():
                    src = next((s for s, d in edges if d == [g, i.name]), None)
                    f[i.name] = produced[src[0]][src[1]] if src else feeds[i.name]
                outs = sess.run(None, f)
                produced[g] = dict(zip([o.name for o in sess.get_outputs()], outs))
                result.setdefault(g, []).append(_digest(outs))
        return result
    for name, sess in sessions.items():
        names = {i.name for i in sess.get_inputs()}
        inputs = _real_inputs(final / next(g["file"] for g in manifest["graphs"] if g["name"] == name), names)
        inputs = inputs or [_seeded(sess, seed) for seed in range(2)]
        result[name] = [_run_digest(sess, f) for f in inputs]
    return result


def record(recipes: list[Path], runs: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for recipe in recipes:
        folder = runs / recipe.stem
        print(f"running {recipe.name} ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--out", str(folder)],
                              cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{recipe.name}: pipeline run failed:\n{proc.stderr[-2000:]}")
        final = folder / "final"
        out[recipe.stem] = {"files": sorted(p.name for p in final.iterdir() if not p.name.startswith(".")),
                            "outputs": graph_outputs(final)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["record", "verify"])
    ap.add_argument("file", nargs="?", type=Path, default=ROOT / "runs" / "parity.json")
    ap.add_argument("--out", type=Path, help="where `record` writes (default: FILE)")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "parity")
    ap.add_argument("--recipes", nargs="*", type=Path, help="default: every recipe in recipes/")
    args = ap.parse_args()
    recipes = args.recipes or sorted((ROOT / "recipes").glob("*.yaml"))
    got = record(recipes, args.runs)
    if args.mode == "record":
        target = args.out or args.file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(got)} recipes in {target}")
        return
    want = json.loads(args.file.read_text())
    bad = [name for name in got if got[name] != want.get(name)]
    for name in got:
        status = "MISSING in record" if name not in want else ("DIFFERENT" if name in bad else "identical")
        graphs = len(got[name]["outputs"])
        print(f"{name}: {graphs} graphs, files {len(got[name]['files'])}: {status}")
    if bad:
        raise SystemExit(f"{len(bad)} recipes differ: {', '.join(bad)}")
    print(f"all {len(got)} recipes: bitwise the same outputs, same files under final/")


if __name__ == "__main__":
    main()
