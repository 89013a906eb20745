"""Families as plug-ins: a family-free core, thresholds owned by metrics, a toy family from outside."""
from __future__ import annotations

import io
import json
import re
import textwrap
import tokenize
from pathlib import Path

import numpy as np
import onnx
import pytest
import tiny
from conftest import REPO, cli, run_cli

from pipeline.families import families

# Every module outside the families (and the plug-in API, which re-exports theirs): the layers that must name none.
# Except the KV-cache convention (past_key/past_value: the ONNX decoder naming every exporter here and
# Hugging Face's use), which is what kv_cache.py defines for any decoder.
CORE = sorted(str(p.relative_to(REPO)) for layer in ("core", "engine", "evaluation", "search", "formats", "report", "cli")
              for p in (REPO / "pipeline" / layer).rglob("*.py") if p.name != "kv_cache.py")


def _family_names() -> set[str]:
    """Names of the built-in families, their exporters and their sources: no identifier or string may use them."""
    names = {"piper", "vits", "hifigan", "chattts", "tortoise", "kokoro", "joe", "espeak", "phoneme", "llama"}
    for cls in families().values():
        if cls.name != "generic":
            names.add(cls.name)
            names |= {e.name for e in cls.exporters} | {s.name for s in cls.sources}
    return {n.lower() for n in names}


def _tensor_names() -> set[str]:
    """Graphs, inputs and tensors of the built-in families: no string literal may name them."""
    from pipeline.families.piper import DURATIONS

    names = {DURATIONS, "embed_text", "embed_code", "lm_head_text", "lm_head_code", "sample_head", "input_ids",
             "mel", "input_lengths", "scales", "num_text_tokens", "/enc_p", "/dp", "/flow", "/dec", "z", "y_mask",
             "past_key", "past_value", "present_key", "onnx.json"}
    return {n.lower() for n in names}


def _code_tokens(path: Path) -> list[tuple[int, str, bool]]:
    """(line, text, is_string) of every identifier and code-like string literal; comments, docstrings and
    prose messages (string literals with a space in them) left out."""
    source = path.read_text()
    out = []
    previous = tokenize.NEWLINE
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME:
            out.append((tok.start[0], tok.string, False))
        elif tok.type == tokenize.STRING and previous not in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                                               tokenize.NL):
            body = re.sub(r"^[a-zA-Z]*['\"]{1,3}|['\"]{1,3}$", "", tok.string)
            if not re.search(r"\s", body):
                out.append((tok.start[0], body, True))
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            previous = tok.type
    return out


def test_the_core_names_no_family_tensor_or_input():
    families_, tensors = _family_names(), _tensor_names()
    hits = []
    for rel in CORE:
        for line, text, is_string in _code_tokens(REPO / rel):
            words = {text.lower()} | set(re.split(r"[^a-z0-9_/.]+", text.lower()))
            found = words & (families_ | tensors if is_string else families_)
            if found:
                hits.append(f"{rel}:{line}: {text!r} names {sorted(found)}")
    assert not hits, "the core names a family's things:\n" + "\n".join(hits)


def test_the_scan_would_catch_a_family_name(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""A docstring may say piper."""\nx = model.graph == "embed_text"  # and a comment chattts\n'
                   'raise ValueError("a prose message about piper voices")\n')
    words = {t.lower() for _, t, _ in _code_tokens(bad)}
    assert "embed_text" in words
    assert not {"piper", "chattts"} & words


def _tiny_recipe(tmp_path: Path, extra: str = "", steps: str = "steps: []") -> Path:
    tiny.save(tiny.conv_net(), tmp_path / "tiny.onnx")
    tiny.write_npz_feeds(tmp_path / "feeds")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        name: tiny_check
        model: {{path: tiny.onnx}}
        calibration: {{source: npz, params: {{folder: feeds}}}}
        {steps}
        check:
          samples: 3
        """) + extra)
    return recipe


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_threshold_with_nothing_to_measure_is_one_clear_error(tmp_path, command):
    recipe = _tiny_recipe(tmp_path, "  max_log_mel: 0.1\n")
    res = cli(command, str(recipe), "--out", str(tmp_path / "run")) if command == "run" else \
        cli(command, str(recipe))
    assert res.code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert "check.max_log_mel: nothing to measure: it needs an audio output, and a 'generic' model has none" \
        in lines[0]
    assert not (tmp_path / "run" / "steps").exists()  # refused before any work


def test_fallback_target_with_nothing_to_measure_is_refused(tmp_path):
    recipe = _tiny_recipe(tmp_path, "  fallback: {step: q, max_log_mel: 0.2}\n",
                          steps="steps: [{name: q, pass: quantize, params: {mode: static, op_types: [Conv]}}]")
    res = cli("validate", str(recipe))
    assert res.code == 2 and "check.fallback.max_log_mel: nothing to measure" in res.stderr


def test_export_only_recipe_with_no_steps_runs_its_check(tmp_path):
    recipe = _tiny_recipe(tmp_path, "  min_output_sqnr_db: 60\n")
    res = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert res.code == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["family"] == "generic" and report["outputs"][0]["sqnr_db"] == "inf"
    assert (tmp_path / "run" / "final" / "tiny.onnx").is_file()


def _vocoder(seed: int = 0, smooth: bool = False) -> onnx.ModelProto:
    """mel [1, 80, T] -> audio [1, 1, T * 256]: a ConvTranspose upsampler, enough for audio metrics.

    `smooth` low-passes its kernels: an error that depends on frequency, so the sample rate the
    metrics assume changes what they measure."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((80, 1, 256)) * 0.02).astype(np.float32)
    if smooth:
        w = (0.5 * (w + np.roll(w, 1, axis=2))).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["mel", "w"], ["pre"], name="/ups.0/ConvTranspose", strides=[256])
    tanh = helper.make_node("Tanh", ["pre"], ["audio"], name="/post/Tanh")
    graph = helper.make_graph([node, tanh], "voc", [helper.make_tensor_value_info("mel", TensorProto.FLOAT,
                                                                                   [1, 80, "T"])],
                              [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, 1, "S"])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _vocoder_set(folder: Path, model: onnx.ModelProto, sample_rate: int):
    from pipeline.core.modelset import GraphFile, ModelSet

    folder.mkdir(parents=True)
    tiny.save(model, folder / "voc.onnx")
    ms = ModelSet(folder, [GraphFile("model", "voc.onnx")], meta={"family": "hifigan", "sample_rate": sample_rate})
    ms.save_graph("model", model)
    ms.write_manifest()
    return ms


def test_pipeline_families_lists_the_built_in_ones():
    res = cli("families")
    assert res.code == 0, res.stderr
    for name in ("piper", "hifigan", "chattts", "generic"):
        assert f"\n{name}  " in "\n" + res.stdout
    assert "exporters: chattts_gpt; calibration sources: chattts" in res.stdout


def test_a_family_registered_at_run_time_is_found_and_can_be_removed(tmp_path):
    from pipeline.core.errors import PipelineError
    from pipeline.families import Family, detect_family, get_family, register, unregister

    class Everything(Family):
        name = "everything"

        def recognizes(self, model_path, model):
            return True

    path = tiny.save(tiny.conv_net(), tmp_path / "tiny.onnx")
    register(Everything)
    try:
        assert isinstance(get_family("everything"), Everything)
        assert detect_family(path).name == "everything"  # a tiny conv net is neither a voice nor a vocoder
    finally:
        unregister("everything")
    with pytest.raises(PipelineError, match="unknown model family 'everything'"):
        get_family("everything")


def test_missing_built_in_families_mean_a_stale_install_not_a_generic_model(monkeypatch):
    import pipeline.families as fam

    monkeypatch.setattr(fam, "entry_points", lambda group: [])
    monkeypatch.setattr(fam, "_LOADED", None)
    with pytest.raises(fam.PipelineError, match=r"built-in families piper, hifigan, chattts, tortoise, kokoro are not registered.*"
                                                r"reinstall it \(pip install -e \.\)"):
        fam.families()
    monkeypatch.undo()
    fam._LOADED = None  # found again through the real entry points
    assert {"piper", "hifigan", "chattts"} <= set(fam.families())


def test_chattts_fits_only_its_own_prompt_source(tmp_path):
    """An npz calibration or check source on a ChatTTS model set is taken as it is (it has no vocabulary)."""
    from calibration import SourceContext
    from pipeline.families import make_source

    from pipeline.families import get_family
    from pipeline.core.modelset import ModelSet

    tiny.write_npz_feeds(tmp_path / "feeds")
    ms = ModelSet(tmp_path, [], meta={"config": {"num_text_tokens": 99}})
    family = get_family("chattts")
    npz = make_source("npz", {"folder": "feeds"}, SourceContext(tmp_path / "x.onnx", lambda p: tmp_path / p))
    family.fit_source(npz, ms, {"folder": "feeds"})
    prompts = make_source("chattts", {}, SourceContext(tmp_path / "x.onnx", lambda p: tmp_path / p))
    family.fit_source(prompts, ms, {})
    assert prompts.params.vocab == 99
    explicit = make_source("chattts", {"vocab": 50}, SourceContext(tmp_path / "x.onnx", lambda p: tmp_path / p))
    family.fit_source(explicit, ms, {"vocab": 50})
    assert explicit.params.vocab == 50


def test_a_24khz_vocoder_is_measured_at_24khz(tmp_path):
    from pipeline.core.audio import MelSettings, compare_audio
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.families import family_of
    from pipeline.core.onnx_io import session

    ref = _vocoder_set(tmp_path / "ref", _vocoder(), 24000)
    cand = _vocoder_set(tmp_path / "cand", _vocoder(smooth=True), 24000)
    family = family_of(ref)
    assert family.name == "hifigan" and family.audio(ref).sample_rate == 24000
    feeds = [{"mel": np.random.default_rng(i).standard_normal((1, 80, 40)).astype(np.float32)} for i in range(2)]
    report = evaluate(ref, cand, feeds, family)
    audio = report.outputs[0].audio
    assert audio.sample_rate == 24000
    outs = [(session(ref.path("model")).run(None, f)[0], session(cand.path("model")).run(None, f)[0]) for f in feeds]
    at = {sr: max(compare_audio(r, c, mel=MelSettings(sample_rate=sr)).log_mel_distance for r, c in outs)
          for sr in (24000, 22050)}
    assert audio.log_mel_max == pytest.approx(at[24000], rel=1e-9)
    assert abs(at[24000] - at[22050]) > 0.01 * at[24000]  # the rate makes a difference the test can see


TOY_FAMILY = '''
"""A family from outside the repository: a two-graph model (front -> back) with its own metric."""
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pydantic import BaseModel, ConfigDict

from pipeline.families import Exporter, Family
from pipeline.evaluation.metrics import Metric
from pipeline.core.modelset import GraphFile, ModelSet


class ToyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0


def _graph(name, inp, out, seed, scope):
    w = (np.random.default_rng(seed).standard_normal((4, 4, 1)) * 0.5).astype(np.float32)
    conv = helper.make_node("Conv", [inp, f"{name}.w"], [f"{scope}/c"], name=f"{scope}/conv/Conv")
    relu = helper.make_node("Relu", [f"{scope}/c"], [out], name=f"{scope}/Relu")
    g = helper.make_graph([conv, relu], name, [helper.make_tensor_value_info(inp, TensorProto.FLOAT, [1, 4, "T"])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 4, "T"])],
                          [numpy_helper.from_array(w, f"{name}.w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def export(params, dest: Path, resolve):
    dest.mkdir(parents=True, exist_ok=True)
    ms = ModelSet(dest, [GraphFile("front", "front.onnx"), GraphFile("back", "back.onnx")],
                  chain=[{"from": "front.h", "to": "back.h"}], meta={"exporter": "toy_pair"})
    ms.save_graph("front", _graph("front", "x", "h", params.seed, "/front"))
    ms.save_graph("back", _graph("back", "h", "y", params.seed + 1, "/back"))
    ms.write_manifest()
    return ms


class PeakRatio(Metric):
    """max |candidate| / max |reference| of the final output: the toy's own metric."""
    key = "peak"
    needs = "a toy output"
    thresholds = {"max_peak_ratio": "max |y| of the candidate over the reference's"}
    per_sample = True

    def __init__(self):
        self.ratios = []

    def update(self, reference, candidate):
        self.ratios.append(float(np.abs(candidate).max() / np.abs(reference).max()))

    def to_json(self):
        return {"peak_ratio_max": max(self.ratios)}

    def failures(self, report, limits):
        limit = limits.get("max_peak_ratio")
        got = [o.extra("peak")["peak_ratio_max"] for o in report.outputs if o.extra("peak")]
        return [f"peak ratio {g:.3f} > {limit}" for g in got if limit is not None and g > limit]


class ToyFamily(Family):
    name = "toy"
    exporters = (Exporter("toy_pair", ToyParams, export, lambda params, resolve: str(params.seed)),)

    def metrics(self, ms):
        return [PeakRatio()]

    def eval_source(self, model_path, ms):
        return "npz", {"folder": str(Path(__file__).parent / "feeds")}
'''


def test_a_toy_family_from_outside_runs_a_recipe_its_check_and_bench(tmp_path):
    """Registered through the entry-point group, as a separately installed package would be: no core file
    is touched, and the family is found by a fresh process."""
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "toy_family.py").write_text(TOY_FAMILY)
    dist = plugin / "toy_family-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-family\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tts_onnx_pipeline.families]\ntoy = toy_family:ToyFamily\n")
    tiny.write_npz_feeds(plugin / "feeds", count=4)
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(textwrap.dedent("""\
        name: toy_int8
        model: {exporter: toy_pair}
        calibration: {source: npz, params: {folder: plugin/feeds}}
        steps:
          - pass: quantize
            params: {mode: static, op_types: [Conv]}
            scope: {graphs: [back]}
        check:
          samples: 4
          min_output_sqnr_db: 10
          thresholds: {max_peak_ratio: 1.5}
        """))

    def fresh(*args):  # a new interpreter each time, the plug-in's folder on its path: nothing registered here
        return run_cli(*args, cwd=tmp_path, env={"PYTHONPATH": str(plugin)})

    res = fresh("run", str(recipe), "--out", str(tmp_path / "run"))
    assert res.code == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["family"] == "toy" and report["failures"] == []
    blocks = {b["block"] for b in report["blocks"]}
    assert {"front:/front", "back:/back"} <= blocks
    chain = next(o for o in report["outputs"] if o["name"] == "chain:back")
    assert 0.5 < chain["peak"]["peak_ratio_max"] < 1.5
    assert 10 < chain["sqnr_db"] < 80
    front = next(b for b in report["blocks"] if b["block"] == "front:/front")
    assert front["isolated"]["sqnr_db"] == "inf"  # only the back graph was quantized
    # the family's own threshold is checked by its own metric
    strict = recipe.read_text().replace("max_peak_ratio: 1.5", "max_peak_ratio: 0.5")
    recipe.write_text(strict + "  on_fail: error\n")
    res = fresh("run", str(recipe), "--out", str(tmp_path / "run"))
    assert res.code == 2 and "peak ratio" in res.stderr
    # an unknown plug-in threshold is refused before work, naming it
    recipe.write_text(strict.replace("max_peak_ratio", "max_peek_ratio"))
    res = fresh("validate", str(recipe))
    assert res.code == 2 and "check.max_peek_ratio: nothing to measure" in res.stderr
    # pipeline bench on the chained model set, inputs and metrics from the family
    res = fresh("bench", str(tmp_path / "run" / "steps" / "00-base"), str(tmp_path / "run" / "final"),
                "--repeat", "1", "--no-rss", "--json", str(tmp_path / "bench.json"))
    assert res.code == 0, res.stderr[-3000:]
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["family"] == "toy" and bench["sentences"] == 4
    cand = bench["variants"][1]
    assert cand["max_log_mel"] is None and 10 < min(s["sqnr_db"] for s in cand["sentences"]) < 80
    res = fresh("families")
    assert res.code == 0 and "\ntoy  " in "\n" + res.stdout
    # and the core learned about the toy family from the entry point alone
    for rel in CORE:
        assert "toy" not in (REPO / rel).read_text()
