"""Property-based tests: generated recipes and option values, looking for the cases nobody wrote down.

Every command, whatever it is given, either succeeds (exit 0) or exits 2 with exactly one non-empty line on
stderr that starts with `error:`: never a traceback, never `internal error:` (a bug), never a file written,
changed or deleted outside the run folder (`--out`) or the report files the command was asked to write, never
an input changed (the model, the feeds, the recipe: every file there was, byte for byte). `assert_contract`
holds each example to that.

The model and feeds are built once for the module (Hypothesis reuses a function-scoped fixture across its
examples); every example gets a fresh temporary folder, the current folder while the command runs, for its
recipe and its run folder. Passes are the cheap ones (simplify, fp16, quantize dynamic, compress_weights), so a
run that succeeds takes a fraction of a second. How many examples: the Hypothesis profile (tests/conftest.py,
`HYPOTHESIS_PROFILE=ci` for the long run).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import cli, sha256, tree

import hypothesis
import tiny
from hypothesis import note
from hypothesis import strategies as st


# ---------------------------------------------------------------------------------------------------------------
# The world every example reads: built once, never to change.


@dataclass
class World:
    root: Path
    model: Path  # models/tiny.onnx
    other: Path  # models/other.onnx: the same graph, other weights (compare's candidate)
    feeds: Path  # feeds/: 6 .npz files
    made: Path  # a finished run folder
    final: Path  # its final/


GOOD_STEPS = [{"pass": "simplify"},
              {"pass": "quantize", "params": {"mode": "dynamic", "op_types": ["Conv"]},
               "scope": {"include": ["/enc/layers\\.0"]}}]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("properties").resolve()
    model = tiny.save(tiny.conv_net(), root / "models" / "tiny.onnx")
    other = tiny.save(tiny.conv_net(seed=1), root / "models" / "other.onnx")
    feeds = tiny.write_npz_feeds(root / "feeds")
    recipe = root / "made.yaml"
    recipe.write_text(yaml.safe_dump({"name": "made", "model": {"path": str(model)},
                                      "calibration": {"source": "npz", "params": {"folder": str(feeds)}},
                                      "steps": GOOD_STEPS, "check": {"samples": 3}}))
    res = cli("run", str(recipe), "--out", str(root / "made"), "-q")
    assert res.exit_code == 0, res.output
    return World(root, model, other, feeds, root / "made", root / "made" / "final")


# ---------------------------------------------------------------------------------------------------------------
# The contract


def _files(root: Path, skip: list[Path]) -> dict[Path, str | None]:
    """Every path under `root` (None for a folder, sha256 for a file), leaving out `skip` and what lies in them."""
    found = {}
    for rel in tree(root):
        path = root / rel
        if any(path == s or path.is_relative_to(s) for s in skip):
            continue
        found[path] = sha256(path) if path.is_file() and not path.is_symlink() else None
    return found


def before_state(roots: list[Path], skip: list[Path] = ()) -> tuple[set[Path], dict[Path, str]]:
    """(the tree of `roots`, every file's sha256), both leaving out `skip`: the state `assert_contract` compares."""
    skip = [s for s in (Path(p) for p in skip) if not any(s == r or r.is_relative_to(s) for r in roots)]
    files = {}
    for root in roots:
        files.update(_files(root, skip))
    return set(files), {p: h for p, h in files.items() if h is not None}


def assert_contract(result, before_tree: set[Path], before_hashes: dict[Path, str], *, roots: list[Path],
                    skip: list[Path] = (), progress: bool = False) -> None:
    """Exit 0, or exit 2 with one line `error: ...` on stderr; no traceback, no internal error; nothing outside
    `skip` (the run folder, the reports asked for) created, changed or deleted under `roots`.

    `progress`: a run without --quiet logs its steps on stderr before the error line; the error must then be the
    last line and the only one that says error. A Python warning (`cli` keeps them) is a line on stderr too."""
    out, err = result.stdout, result.stderr
    if result.exception is not None:  # its traceback is on stderr
        pytest.fail(f"uncaught exception (exit {result.exit_code}):\nstderr: {err}")
    assert "Traceback" not in out + err, err
    assert "internal error" not in err, err
    assert result.exit_code in (0, 2), f"exit {result.exit_code}\nstdout: {out}\nstderr: {err}"
    if result.exit_code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines, f"exit 2 with nothing on stderr; stdout: {out}"
        assert not result.warnings, f"a user would see these warnings besides the error line: {result.warnings}"
        if progress:
            assert not any(line.startswith("error:") for line in lines[:-1]), err
        else:
            assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err}"
        assert lines[-1].startswith("error:") and lines[-1][len("error:"):].strip(), err
    skip = [s for s in (Path(p) for p in skip) if not any(s == r or r.is_relative_to(s) for r in roots)]
    after = {}
    for root in roots:
        after.update(_files(root, skip))
    created = sorted(str(p) for p in set(after) - before_tree)
    deleted = sorted(str(p) for p in before_tree - set(after))
    changed = sorted(str(p) for p, h in before_hashes.items() if p in after and after[p] != h)
    assert not created, f"written outside the run folder: {created}\nstderr: {err}"
    assert not deleted, f"deleted outside the run folder: {deleted}\nstderr: {err}"
    assert not changed, f"changed outside the run folder: {changed}\nstderr: {err}"


@contextlib.contextmanager
def example_folder():
    """A fresh folder for one example, the current folder while it runs (a relative default such as
    runs/<name> lands there, where the contract sees it)."""
    with tempfile.TemporaryDirectory(prefix="prop-") as d:
        tmp = Path(d).resolve()
        with contextlib.chdir(tmp):
            yield tmp


def invoke(args: list[str]):
    """The command in this process (`cli`: the warnings a user would see are on its stderr, and kept)."""
    note(f"args: {args!r}")
    res = cli(*args)
    note(f"exit {res.exit_code}\nstdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-2000:]}")
    hypothesis.event(f"{args[0]}: exit {res.exit_code}")  # --hypothesis-show-statistics: how many succeed
    return res


def is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long for the file system
        return False


def exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def new_folder(path: Path, root: Path) -> Path:
    """What a run into `path` may create: its outermost folder that does not exist yet (`--out a/b/c` makes a/ and
    a/b/ too), else `path` itself."""
    path = Path(os.path.normpath(path))
    top = path
    for parent in path.parents:
        if parent == root or exists(parent) or not inside(parent, root):
            break
        top = parent
    return top


def inside(path: Path, folder: Path) -> bool:
    """True when `path` lies strictly inside `folder` (the run folder is excluded only from where it is)."""
    try:
        return path.resolve() != folder and path.resolve().is_relative_to(folder)
    except (OSError, ValueError, RuntimeError):
        return False


# ---------------------------------------------------------------------------------------------------------------
# Strategies: values


TRICKY = ["", " ", "\t", "..", "../..", "../../etc", ".", "./", "/", "//", "a/b", "a/../b", "/etc/passwd", "~",
          "~nobody_here/x", "~/x", ".hidden", "-", "-rf", "--out", "a\x00b", "\x00", "é", "名前", "😀", "a b",
          "a\nb", "\r\n", "con", "NUL", "*", "?", "[", "(", "\\", "${HOME}", "$(id)", "%s", "{}", "'", '"', "null",
          "true", "1e9999", "0x10", "nan", "-inf", "all", "runs", "final", "steps", "tmp", ".partial",
          ".00-base.partial", "manifest.json", "report.html", ".pipeline-run", ".pipeline.lock", "x" * 64,
          "x" * 65, "a" * 300]
# Text: any character a YAML file can hold (no lone surrogates, which no UTF-8 file can).
chars = st.characters(codec="utf-8")
texts = st.text(chars, max_size=12)
tricky = st.sampled_from(TRICKY)
long_text = st.builds(lambda s, n: (s or "x") * n, st.text(chars, max_size=3), st.integers(100, 3000))
strings = st.one_of(tricky, texts, long_text)
path_text = st.one_of(tricky, st.text(st.sampled_from("ab./\\-_~ \x00é"), max_size=20),
                      st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,70}", fullmatch=True))
# What a command line can hold: anything but NUL, which no argv can carry.
arg_text = st.one_of(st.sampled_from([t for t in TRICKY if "\x00" not in t]),
                     st.text(st.sampled_from("ab./\\-_~ é"), max_size=20),
                     st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,70}", fullmatch=True))
# A path a command may write to: relative, and never climbing out of the example's folder (`..`), where a run or a
# report would land in a folder the test does not watch (or at the root of the file system). Fixed cases name the
# folders above on purpose.
out_text = arg_text.filter(lambda s: not s.startswith("/") and ".." not in s)
ints = st.integers(-10**6, 10**6)
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf]))
numbers = st.one_of(ints, floats, st.sampled_from([0, 1, -1, 2**31, 2**63, 10**30, 0.5, 1e-300]))
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)

# Keys: every key of the recipe schema and the cheap passes (so a random key is often a real one, with a wrong
# value), plus text and non-string keys. Left out: simplify's `check_n` (a large number is a long job the user
# asked for) and `tune` (a search, minutes when valid).
KNOWN_KEYS = ["name", "description", "model", "path", "package", "file", "exporter", "params", "family", "blocks",
              "patterns", "on", "rest", "calibration", "source", "folder", "pattern", "steps", "pass", "scope",
              "graphs", "include", "exclude", "nodes", "check", "samples", "min_sqnr_db", "min_output_sqnr_db",
              "max_log_mel", "on_fail", "sensitivity", "decode_steps", "min_top1_agreement", "thresholds",
              "fallback", "step", "move_to", "rank_by", "max_size_ratio", "per_round", "max_rounds", "targets",
              "format", "output", "mode", "op_types", "per_channel", "reduce_range", "weight_type",
              "activation_type", "calibration_method", "symmetric_activations", "extra_options",
              "expect_min_nodes", "bits", "block_size", "method", "accuracy_level", "dtype", "min_elements",
              "expect_min_tensors", "keep_io_types", "op_block_list", "node_block_list", "overflow_guard",
              "overflow_threshold", "min_positive_val", "max_finite_val", "on_error", "skip_fuse_bn",
              "skip_constant_folding"]
keys = st.one_of(st.sampled_from(KNOWN_KEYS), texts, tricky, st.integers(-3, 3), st.none(), st.booleans())
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(keys, inner, max_size=3)), max_leaves=6)

# Regexes: the tiny model's blocks, invalid ones, ones `re` warns about (a FutureWarning is a line on stderr), and
# random ones: at most 10 characters without `*` or `+`, too short to nest quantifiers that backtrack for minutes.
REGEXES = ["/enc/layers\\.0", "/enc/layers\\.[0-2]", "/enc/layers\\.\\d+", "/dec", "/enc/.*", ".*", "", "rest",
           "model", "/enc/layers\\.9", "(unclosed", "[", "*", "+", "a{2,1}", "(?P<x>", "\\", "(?<=a+)b", "(a)\\2",
           "(?P<x>a)(?P<x>b)", "\\p{L}", "(?i", "[z-a]", "x**", "(?#", "(?(1)a|b)", "\\8", "^$", "|", "[[a",
           "[[a]", "[a--b]", "/enc/layers\\.[0&&1]"]
regexes = st.one_of(st.sampled_from(REGEXES), st.text(st.sampled_from("()[]{}?.\\|^$/encdlayrs0-,:<>=!P"),
                                                      max_size=10))
regex_lists = st.one_of(st.lists(regexes, max_size=3), values)
plain_names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
names = st.one_of(plain_names, path_text, strings)


# ---------------------------------------------------------------------------------------------------------------
# Strategies: recipes


CHEAP_STEPS = {
    "simplify": lambda: st.fixed_dictionaries({}, optional={
        "on_error": st.sampled_from(["error", "skip"]), "skip_fuse_bn": st.booleans(),
        "skip_constant_folding": st.booleans()}),
    "fp16": lambda: st.fixed_dictionaries({}, optional={
        "keep_io_types": st.booleans(), "overflow_guard": st.booleans(),
        "overflow_threshold": st.floats(1, 70000), "op_block_list": st.lists(st.sampled_from(["Relu", "Mul"]))}),
    "quantize": lambda: st.fixed_dictionaries({"mode": st.just("dynamic")}, optional={
        "op_types": st.sampled_from([["Conv"], ["Conv", "MatMul"], ["MatMul"]]), "per_channel": st.booleans(),
        "reduce_range": st.booleans(), "weight_type": st.sampled_from(["int8", "uint8"])}),
    "compress_weights": lambda: st.fixed_dictionaries({"dtype": st.sampled_from(["int8", "fp16"])}, optional={
        "min_elements": st.integers(1, 200), "op_types": st.just(["Conv"])}),
}
SCOPED = {"fp16", "quantize", "compress_weights"}


@st.composite
def cheap_step(draw) -> dict:
    name = draw(st.sampled_from(sorted(CHEAP_STEPS)))
    step: dict[str, Any] = {"pass": name}
    params = draw(CHEAP_STEPS[name]())
    if params:
        step["params"] = params
    if name in SCOPED and draw(st.booleans()):
        step["scope"] = draw(st.fixed_dictionaries({}, optional={
            "include": st.lists(st.sampled_from(REGEXES[:6]), min_size=1, max_size=2),
            "exclude": st.lists(st.sampled_from(REGEXES[:4]), max_size=1)}))
    if draw(st.integers(0, 3)) == 3:
        step["name"] = draw(plain_names)
    return step


@st.composite
def base_recipe(draw, world: World, tmp: Path) -> dict:
    """A recipe that passes validation (most of the time: a random scope may match nothing)."""
    model = draw(st.sampled_from([str(world.model), os.path.relpath(world.model, tmp)]))
    recipe: dict[str, Any] = {"name": draw(st.sampled_from(["props", "p.1", "tiny_int8", "A-b_c"])),
                              "model": {"path": model}}
    if draw(st.booleans()):
        recipe["description"] = draw(texts)
    if draw(st.integers(0, 3)) > 0:
        recipe["calibration"] = {"source": "npz", "params": {"folder": str(world.feeds)}}
    recipe["steps"] = draw(st.lists(cheap_step(), max_size=3))
    if draw(st.booleans()):
        recipe["check"] = draw(st.fixed_dictionaries({}, optional={
            "samples": st.one_of(st.integers(1, 6), st.just("all")), "min_sqnr_db": st.floats(-20, 30),
            "min_output_sqnr_db": st.floats(-20, 30), "on_fail": st.sampled_from(["error", "warn"]),
            "sensitivity": st.booleans()}))
    if draw(st.integers(0, 5)) == 5:
        recipe["blocks"] = {"patterns": ["(/enc/layers\\.\\d+)", "(/dec)"]}
    return recipe


def locations(data: Any, where: tuple = ()) -> list[tuple]:
    """The path of every value inside nested dicts and lists."""
    found = []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else []
    for k, v in items:
        found.append((*where, k))
        found += locations(v, (*where, k))
    return found


def containers(data: Any, where: tuple = ()) -> list[tuple]:
    """The path of every dict inside `data` (the top included)."""
    found = [where] if isinstance(data, dict) else []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else []
    for k, v in items:
        found += containers(v, (*where, k))
    return found


def get(data: Any, where: tuple) -> Any:
    for k in where:
        data = data[k]
    return data


def put(data: dict, where: tuple, value: Any) -> None:
    """Set `value` at `where`, making the dicts on the way where they are missing (or not containers); a list
    index past the end appends."""
    where = list(where)
    for i in range(len(where) - 1):
        k = where[i]
        nxt = data[k] if isinstance(data, list) else data.get(k)
        if not isinstance(nxt, (dict, list)) or (isinstance(nxt, list) and not isinstance(where[i + 1], int)):
            nxt = {}
            data[k] = nxt
        elif isinstance(nxt, list) and where[i + 1] >= len(nxt):
            nxt.append({})
            where[i + 1] = len(nxt) - 1
        data = nxt
    data[where[-1]] = value


# Numbers with a meaning, set where they belong (the step index is bent to one that exists).
NUMBER_FIELDS = [("check", "samples"), ("check", "min_sqnr_db"), ("check", "min_output_sqnr_db"),
                 ("check", "max_log_mel"), ("check", "decode_steps"), ("check", "min_top1_agreement"),
                 ("check", "thresholds", "snr"), ("params", "min_elements"), ("params", "block_size"),
                 ("params", "bits"), ("params", "accuracy_level"), ("params", "expect_min_nodes"),
                 ("params", "expect_min_tensors"), ("params", "overflow_threshold"), ("params", "min_positive_val"),
                 ("params", "max_finite_val"), ("check", "fallback", "max_rounds"), ("check", "fallback", "per_round")]
SCOPE_KEYS = ["include", "exclude", "nodes", "graphs"]
ORT_EXTRA = ["ActivationSymmetric", "WeightSymmetric", "EnableSubgraph", "ForceQuantizeNoInputCheck",
             "MatMulConstBOnly", "AddQDQPairToWeight", "OpTypesToExcludeOutputQuantization", "DedicatedQDQPair",
             "QDQOpTypePerChannelSupportToAxis", "CalibTensorRangeSymmetric", "CalibMovingAverage",
             "CalibMovingAverageConstant", "QuantizeBias", "SmoothQuant", "UseQDQContribOps", "MinimumRealRange",
             "TensorQuantOverrides", "QDQKeepRemovableActivations", "WeightSymmetric"]


def path_values(world: World, tmp: Path, run: Path) -> st.SearchStrategy:
    """Paths a recipe may name for its model or its calibration folder: right, wrong, and inside the run."""
    return st.one_of(st.sampled_from([
        str(world.model), str(world.other), str(world.feeds), str(world.feeds / "sample_00.npz"), str(world.final),
        str(world.made), str(world.root), os.path.relpath(world.feeds, tmp), os.path.relpath(world.model, tmp),
        str(tmp), ".", "recipe.yaml", str(run), "run", "run/steps", str(tmp / "missing"), "/dev/null", "/",
        str(world.model) + "\x00", str(world.final / "tiny.onnx")]), path_text)


@st.composite
def mutated_recipe(draw, world: World, tmp: Path, run: Path) -> dict:
    recipe = copy.deepcopy(draw(base_recipe(world, tmp)))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["delete", "add", "replace", "number", "name", "scope", "path", "extra_options",
                                     "pattern", "blocks", "output"]))
        note(f"mutation: {kind}")
        steps = recipe.get("steps") if isinstance(recipe.get("steps"), list) else []
        step_at = ("steps", draw(st.integers(0, max(len(steps) - 1, 0))))
        if kind == "delete":
            where = [w for w in locations(recipe) if isinstance(get(recipe, w[:-1]), dict)]
            if where:
                w = draw(st.sampled_from(where))
                del get(recipe, w[:-1])[w[-1]]
        elif kind == "add":
            w = draw(st.sampled_from(containers(recipe)))
            get(recipe, w)[draw(keys)] = draw(values)
        elif kind == "replace":
            where = locations(recipe)
            if where:
                w = draw(st.sampled_from(where))
                get(recipe, w[:-1])[w[-1]] = draw(values)
        elif kind == "number":
            field = draw(st.sampled_from(NUMBER_FIELDS))
            where = field if field[0] == "check" else (*step_at, *field)
            put(recipe, where, draw(numbers))
        elif kind == "name":
            where = draw(st.sampled_from([("name",), (*step_at, "name"), (*step_at, "pass")]))
            put(recipe, where, draw(names))
        elif kind == "scope":
            put(recipe, (*step_at, "scope", draw(st.sampled_from(SCOPE_KEYS))), draw(regex_lists))
        elif kind == "path":
            where = draw(st.sampled_from([("model", "path"), ("calibration", "params", "folder"),
                                          ("check", "source", "params", "folder")]))
            if where[0] == "check":
                put(recipe, ("check", "source", "source"), "npz")
            put(recipe, where, draw(path_values(world, tmp, run)))
        elif kind == "extra_options":
            put(recipe, step_at, {"pass": "quantize", "params": {"mode": "dynamic", "op_types": ["Conv"]}})
            put(recipe, (*step_at, "params", "extra_options"),
                draw(st.dictionaries(st.sampled_from(ORT_EXTRA), values, max_size=2)))
        elif kind == "pattern":
            put(recipe, ("calibration", "params", "pattern"), draw(st.one_of(tricky, path_text, regexes)))
        elif kind == "blocks":
            recipe["blocks"] = draw(st.fixed_dictionaries({"patterns": regex_lists}, optional={
                "on": st.one_of(st.sampled_from(["name", "namespace"]), values), "rest": names}))
        elif kind == "output":
            recipe["output"] = draw(st.one_of(tricky, path_text))
    return recipe


def dump(recipe: Any) -> str:
    return yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------------------------
# Strategies: YAML documents that no mapping of keys makes


def alias_bomb(depth: int, width: int) -> str:
    """Anchors that repeat anchors: `width ** depth` values from a few hundred bytes (kept small here)."""
    lines = [f"    l0: &l0 [{', '.join(['a'] * width)}]"]
    lines += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth)]
    return "\n".join(lines)


@st.composite
def yaml_document(draw, world: World, tmp: Path) -> bytes:
    good = dump(draw(base_recipe(world, tmp)))
    kind = draw(st.sampled_from(["self_anchor", "non_mapping", "garbage", "edit", "truncate", "tags", "bomb",
                                 "bad_utf8", "deep", "multi"]))
    note(f"document: {kind}")
    if kind == "self_anchor":
        text = draw(st.sampled_from([
            "a: &x [*x]\n", "&x [*x]\n", "&x {a: *x}\n", "steps: &s [*s]\n", "model: &m {path: *m}\n",
            "check: &c {source: *c}\n", "calibration: &c {source: npz, params: &p {folder: *p}}\n",
            "description: &d [*d]\n", "steps: [{pass: simplify, params: &p {x: *p}}]\n",
            "blocks: &b {patterns: *b}\n", "x: &x {<<: *x}\n"]))
        return (good + text).encode() if text[0] != "&" else text.encode()
    if kind == "non_mapping":
        return draw(st.sampled_from([
            "", "~", "null", "[]", "- a\n- b\n", "42", "'name: x'", "!!binary aGVsbG8=", "---\n...\n", "{}",
            "--- |\n text\n", "- name: x\n  model: {path: x}\n", ".nan", "!!set {a, b}", "!!omap [a: 1]",
            "%YAML 1.1\n---\n",
            "? [a, b]\n: 1\n", "[", "{", "'", "\t- a", "a: b: c", "\ufeffname: x\n"])).encode()
    if kind == "garbage":
        return draw(st.binary(max_size=300))
    if kind == "bad_utf8":
        return good.encode() + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x00", b"\xfe\xff"]))
    if kind == "edit":
        at = draw(st.integers(0, len(good)))
        return (good[:at] + draw(st.text(st.sampled_from(":-[]{}&*!|>'\"#%@`,? \n\t"), max_size=4))
                + good[at + draw(st.integers(0, 3)):]).encode()
    if kind == "truncate":
        return good[:draw(st.integers(0, len(good)))].encode()
    if kind == "tags":
        tag = draw(st.sampled_from(["!!python/object/apply:os.system ['echo hi']", "!!python/name:os.system",
                                    "!!binary aGVsbG8=", "!!timestamp 2001-12-14", "!!float .inf", "!!int 0x10",
                                    "!!str", "!!null ''", "!custom x", "!!bool yes", "2001-12-14"]))
        key = draw(st.sampled_from(["name", "description", "output", "x"]))
        return (good + f"{key}: {tag}\n").encode()
    if kind == "bomb":  # small enough to finish; test_alias_bomb_is_refused_quickly takes the large one
        return (good + "calibration:\n  source: npz\n  params:\n    folder: " + str(world.feeds) + "\n    junk:\n"
                + alias_bomb(draw(st.integers(1, 4)), draw(st.integers(1, 9))) + "\n").encode()
    if kind == "deep":
        n = draw(st.sampled_from([31, 32, 33, 40, 200, 5000, 100_000]))
        return (good + "description: " + "[" * n + "]" * n + "\n").encode()
    return (good + "---\n" + good).encode()


# ---------------------------------------------------------------------------------------------------------------
# Properties


@hypothesis.given(data=st.data())
def test_generated_recipes_run_or_refuse_in_one_line(world, data):
    """A recipe from a valid one, with keys added and removed, wrong types, path tricks in names, random scopes
    and numbers, run on the tiny model: a finished run or one line, and nothing outside the run folder."""
    with example_folder() as tmp:
        run = tmp / "run"
        recipe = data.draw(mutated_recipe(world, tmp, run), label="recipe")
        path = tmp / "recipe.yaml"
        path.write_text(dump(recipe), encoding="utf-8")
        note(f"recipe.yaml:\n{path.read_text(encoding='utf-8')}")
        quiet = data.draw(st.integers(0, 4), label="quiet") > 0
        command = data.draw(st.sampled_from(["run", "run", "run", "validate"]), label="command")
        args = [command, str(path)] + (["--out", str(run)] + (["-q"] if quiet else []) if command == "run" else [])
        roots = [tmp, world.root]
        before = before_state(roots, [run])
        assert_contract(invoke(args), *before, roots=roots, skip=[run], progress=not quiet)


@hypothesis.given(data=st.data())
def test_yaml_documents_are_refused_in_one_line(world, data):
    """Self-referencing anchors, non-mapping documents, binary garbage, broken UTF-8, tags, absurd nesting,
    several documents, a valid recipe edited or cut anywhere: `validate` and `run` answer in one line."""
    with example_folder() as tmp:
        run = tmp / "run"
        path = tmp / "recipe.yaml"
        path.write_bytes(data.draw(yaml_document(world, tmp), label="document"))
        note(f"recipe.yaml: {path.read_bytes()[:3000]!r}")
        command = data.draw(st.sampled_from(["validate", "run"]), label="command")
        args = [command, str(path)] + (["--out", str(run), "-q"] if command == "run" else [])
        roots = [tmp, world.root]
        before = before_state(roots, [run])
        assert_contract(invoke(args), *before, roots=roots, skip=[run])


@hypothesis.given(data=st.data())
def test_run_out_folder(world, data):
    """`run --out`: empty, blank, the model's own folder, a file, the recipe, a folder of the user's, a fresh
    one, a nested one, a finished run folder (re-run): a run folder is new, empty or a run's, nothing else."""
    with example_folder() as tmp:
        path = tmp / "recipe.yaml"
        recipe = data.draw(base_recipe(world, tmp), label="recipe")
        path.write_text(dump(recipe))
        (tmp / "mine").mkdir()
        (tmp / "mine" / "notes.txt").write_text("the user's own file\n")
        (tmp / "blocker").write_text("a file\n")
        (tmp / "empty").mkdir()
        shutil.copytree(world.made, tmp / "other_run")  # another recipe's finished run: a run folder to reuse
        out = data.draw(st.one_of(st.sampled_from([
            "", " ", "\t", "\n", str(world.model.parent), str(world.model), str(world.feeds), str(world.root),
            str(world.final), str(path), str(tmp), ".", "..", "mine", "blocker", "blocker/out", "empty", "run",
            "a/b/c", "./run/", "run/../run", str(tmp / "run"), "~nobody_here/run", "-", "--", "-q", "other_run",
            "other_run/final", "other_run/steps"]), out_text), label="--out")
        note(f"recipe.yaml:\n{path.read_text()}")
        skip = [new_folder(tmp / out, tmp)] if out.strip() and inside(tmp / out, tmp) else []
        roots = [tmp, world.root]
        before = before_state(roots, skip)
        args = ["run", str(path), "--out", out, "-q"]
        res = invoke(args)
        assert_contract(res, *before, roots=roots, skip=skip)
        if res.exit_code == 0:
            assert skip, f"a run into {out!r} succeeded, but that is no new folder inside the example's folder"
            again = invoke(args)  # a re-run reuses the finished steps
            assert_contract(again, *before, roots=roots, skip=skip)
            assert again.exit_code == 0, again.stderr


REPORT_NAMES = ["r.json", "r.md", "r.html", "r", "r.png", "same.json", "missing/r.json", "", " ", ".", "..",
                "mine", "r.json/x", "-", "recipe.yaml"]
# A report on what the command reads, named by the argument it comes from (resolved by `resolve_report`): the
# model itself, a file inside a model folder (a run's final/) or the --npz folder, the --recipe file.
REPORT_ON_INPUTS = ["@ref", "@cand", "@ref/r.json", "@cand/r.md", "@npz", "@npz/r.json", "@recipe"]


def report_path() -> st.SearchStrategy:
    """A report path: a new file, one in a missing folder, a folder, blank, the user's own folder, an input."""
    return st.one_of(st.sampled_from(REPORT_NAMES), st.sampled_from(REPORT_ON_INPUTS), out_text)


def resolve_report(text: str, args: dict[str, str]) -> str:
    """`@ref/r.json` -> the reference argument's path / r.json (a plain r.json when the command has no such
    argument)."""
    if not text.startswith("@"):
        return text
    name, _, rest = text[1:].partition("/")
    base = args.get(name)
    if base is None:
        return "r.json"
    return str(Path(base) / rest) if rest else base


def cli_int(low: int, high: int) -> st.SearchStrategy:
    return st.one_of(st.integers(low, high).map(str), ints.map(str),
                     st.sampled_from(["", " ", "abc", "1.5", "nan", "inf", "-0", "0x10", "1e3", "٣", "１", "+2"]))


def model_arg(world: World, good: bool = False) -> st.SearchStrategy:
    """A model argument: anything a user may type; with `good`, half the time one that loads (so some commands
    get past their checks and write their reports)."""
    anything = st.one_of(st.sampled_from([str(world.model), str(world.other), str(world.final), str(world.made),
                                          str(world.feeds), str(world.feeds / "sample_00.npz"), "missing.onnx", "",
                                          "recipe.yaml", "piper_int8"]), arg_text)
    return st.one_of(st.sampled_from([str(world.model), str(world.other), str(world.final)]), anything) if good \
        else anything


def prepare(tmp: Path, world: World) -> Path:
    """The example's folder as a user has it: a recipe, a folder of their own, a file."""
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("the user's own file\n")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(dump({"name": "cmp", "model": {"path": str(world.model)},
                            "calibration": {"source": "npz", "params": {"folder": str(world.feeds)}}}))
    return recipe


BESIDE = {"--json": [], "--md": [".png", "-audio"], "--html": ["-audio"], "generate --json": [".npz"]}


def reports_skip(tmp: Path, reports: list[tuple[str, str]], inputs: list[str]) -> list[Path]:
    """What the report options may write on purpose: each file and what it writes beside it (`BESIDE`: md's .png,
    the -audio/ folders), where that lies in the example's folder and is none of the command's `inputs` nor in
    one (a report on an input, or on a folder, must be refused: it gets no pass)."""
    read = [(tmp / text).resolve() for text in inputs if text.strip()]

    def is_input(q: Path) -> bool:
        return any(q == r or (is_dir(r) and q.is_relative_to(r)) for r in read)

    skip = []
    for option, text in reports:
        if not text.strip() or not (tmp / text).name:
            continue
        p = tmp / text
        beside = [p.with_suffix(b) if b.startswith(".") else p.with_name(p.stem + b) for b in BESIDE[option]]
        for q in (p, *beside):
            if inside(q, tmp) and not is_input(q.resolve()) and not is_dir(q):
                skip.append(q)
    return skip


def check_reports(res, options: dict[str, str], tmp: Path) -> None:
    """After a success, each report asked for is there and of its kind (no option's file replaced another's)."""
    import json

    if res.exit_code != 0:
        return
    for option, text in options.items():
        path = tmp / text
        assert path.is_file(), f"{option} {text}: no file after exit 0"
        body = path.read_bytes()
        if option == "--json":
            try:
                json.loads(body)
            except ValueError:
                pytest.fail(f"{option} {text} holds no JSON after exit 0: {body[:60]!r}")
        elif option == "--html":
            assert body.lstrip().lower().startswith(b"<!doctype html"), f"{option} {text}: {body[:60]!r}"
        elif option == "--md":
            assert not body.startswith(b"\x89PNG"), f"{option} {text} holds a PNG"
            png = path.with_suffix(".png")
            assert png.read_bytes().startswith(b"\x89PNG"), f"{png} (the --md plot) holds {png.read_bytes()[:60]!r}"


@hypothesis.given(data=st.data())
def test_compare_options(world, data):
    """`compare` with generated models, --samples, --npz, --recipe, --blocks and report paths (a path equal to
    the model, one in a missing folder, blank, two options on one file)."""
    with example_folder() as tmp:
        recipe = prepare(tmp, world)
        # Half the examples are sane (models that load, the feeds, a count they hold, plain report names), so
        # enough of them get to the reports; the others take anything.
        sane = data.draw(st.booleans(), label="sane")
        models = st.sampled_from([str(world.model), str(world.other), str(world.final)]) if sane \
            else model_arg(world, good=True)
        given = {"ref": data.draw(models, label="reference"), "cand": data.draw(models, label="candidate")}
        args = ["compare", given["ref"], given["cand"]]
        if sane or data.draw(st.integers(0, 3), label="npz?") > 0:
            npz = st.one_of(st.just(str(world.feeds)), st.sampled_from([
                os.path.relpath(world.feeds, tmp), str(world.model), "mine", "missing", ""]))
            given["npz"] = str(world.feeds) if sane else data.draw(npz, label="--npz")
            args += ["--npz", given["npz"]]
        if data.draw(st.booleans(), label="samples?"):
            count = st.integers(1, 6).map(str) if sane else cli_int(-2, 9)
            args += ["--samples", data.draw(count, label="--samples")]
        if data.draw(st.integers(0, 4), label="recipe?") == 4:
            given["recipe"] = data.draw(st.sampled_from([str(recipe), "missing.yaml", str(world.model)]),
                                        label="--recipe")
            args += ["--recipe", given["recipe"]]
        if data.draw(st.integers(0, 4), label="blocks?") == 4:
            args += ["--blocks", data.draw(st.sampled_from(REGEXES[:6]) if sane else regexes, label="--blocks")]
        if data.draw(st.integers(0, 5), label="sensitivity?") == 5:
            args += ["--sensitivity"]
        reports = st.sampled_from(REPORT_NAMES[:6]) if sane else report_path()
        options = {}
        for option in ("--json", "--html", "--md"):
            if data.draw(st.booleans(), label=f"{option}?"):
                options[option] = resolve_report(data.draw(reports, label=option), given)
                args += [option, options[option]]
        if data.draw(st.booleans(), label="quiet"):
            args += ["-q"]
        skip = reports_skip(tmp, list(options.items()), list(given.values()))
        roots = [tmp, world.root]
        before = before_state(roots, skip)
        res = invoke(args)
        assert_contract(res, *before, roots=roots, skip=skip)
        check_reports(res, options, tmp)


@hypothesis.given(data=st.data())
def test_other_commands(world, data):
    """`bench` (--repeat, --threads, --sentences, --json), `validate` and `inspect` of anything, `generate`
    (--steps, --seed, --threads, --ids, --json): a result or one line."""
    with example_folder() as tmp:
        recipe = prepare(tmp, world)
        command = data.draw(st.sampled_from(["bench", "validate", "inspect", "generate"]), label="command")
        reports: list[str] = []
        given: dict[str, str] = {}
        if command == "bench":
            given = {"ref": data.draw(model_arg(world), label="reference")}
            candidates = data.draw(st.lists(model_arg(world), min_size=0, max_size=2), label="candidates")
            given.update({"cand": candidates[0]} if candidates else {})
            args = ["bench", given["ref"], *candidates]
            for option, low, high in (("--repeat", 0, 3), ("--threads", 0, 2000), ("--sentences", -1, 7)):
                if data.draw(st.booleans(), label=f"{option}?"):
                    args += [option, data.draw(cli_int(low, high), label=option)]
            if data.draw(st.booleans(), label="--sentences-file?"):
                given["recipe"] = data.draw(st.sampled_from([str(recipe), "missing.txt", str(tmp)]),
                                            label="--sentences-file")
                args += ["--sentences-file", given["recipe"]]
            if data.draw(st.booleans(), label="--json?"):
                reports.append(resolve_report(data.draw(report_path(), label="--json"), given))
                args += ["--json", reports[-1]]
            args += ["--no-rss"] if data.draw(st.integers(0, 3), label="rss") else []
        elif command == "validate":
            args = ["validate", data.draw(st.one_of(
                st.sampled_from([str(recipe), "recipe.yaml", "missing.yaml", str(tmp), str(world.model),
                                 str(world.feeds / "sample_00.npz"), "piper_int8", "piper_fp16", "piper_int9", "",
                                 " ", "mine", "mine/notes.txt", "~", "/"]),
                arg_text), label="recipe")]
        elif command == "inspect":
            args = ["inspect", data.draw(model_arg(world, good=True), label="model")]
            if data.draw(st.booleans(), label="--blocks?"):
                args += ["--blocks", data.draw(regexes, label="--blocks")]
            if data.draw(st.integers(0, 3), label="--on?") == 3:
                args += ["--on", data.draw(st.sampled_from(["name", "namespace", "", "nodes"]), label="--on")]
        else:
            given = {"ref": data.draw(model_arg(world), label="modelset")}
            args = ["generate", given["ref"]]
            for option, low, high in (("--steps", -1, 40), ("--seed", -1, 2**32), ("--threads", -1, 1025)):
                if data.draw(st.booleans(), label=f"{option}?"):
                    args += [option, data.draw(cli_int(low, high), label=option)]
            if data.draw(st.booleans(), label="--ids?"):
                args += ["--ids", data.draw(st.one_of(st.sampled_from(["3,14,15", "", ",", "1,x", "-1", "1e9",
                                                                        "99999999999999999999"]),
                                                      st.text(st.sampled_from("0123456789,- x"), max_size=12)))]
            if data.draw(st.booleans(), label="--json?"):
                reports.append(resolve_report(data.draw(report_path(), label="--json"), given))
                args += ["--json", reports[-1]]
            if data.draw(st.booleans(), label="--sample?"):
                args += ["--sample"]
        skip = reports_skip(tmp, [(f"{command} --json" if command == "generate" else "--json", r) for r in reports],
                            list(given.values()))
        roots = [tmp, world.root]
        before = before_state(roots, skip)
        res = invoke(args)  # `generate` too: `cli` keeps the process's thread pools as they are
        assert_contract(res, *before, roots=roots, skip=skip)


def test_alias_bomb_is_refused_quickly(world, tmp_path):
    """A 700-byte recipe whose anchors repeat anchors (9 levels of 9: 387 million values once expanded) is
    refused in a second or two like any bad recipe, not walked value by value for hours. A child process with
    a time limit, so a failure cannot hang the suite."""
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(f"name: bomb\nmodel: {{path: {world.model}}}\ncalibration:\n  source: npz\n  params:\n"
                      f"    folder: {world.feeds}\n    junk:\n{alias_bomb(9, 9)}\nsteps: [{{pass: fp16}}]\n")
    env = dict(os.environ, COLUMNS="200")
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(recipe)], capture_output=True,
                              text=True, env=env, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"validate of a {recipe.stat().st_size}-byte recipe (aliases of aliases) ran over 20 s")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
