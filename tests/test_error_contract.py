"""`internal error:` is reachable only through a real bug.

Two halves: the CLI maps every user-facing exception type (`pipeline.core.errors.USER_FACING`) to one line and exit 2,
shown by a command that raises each; and the source raises nothing else on purpose, shown by reading every
`raise` in the tool: a PipelineError, or an exception that never reaches the CLI (a pydantic validator's
ValueError, which the recipe loader turns into its one line; a signal caught in its own module), or one of the
few that mean our own bug, each named below with its reason.
"""
from __future__ import annotations

import ast
import errno
from pathlib import Path

import click
import pytest
from conftest import REPO, cli, one_line

from pipeline.cli.main import main
from pipeline.core.errors import USER_FACING, PipelineError, during, user_message

SOURCES = [p for folder in ("pipeline", "passes", "calibration") for p in sorted((REPO / folder).rglob("*.py"))]

# Raised on purpose, yet meaning a bug of ours if it ever reaches the CLI (so it keeps its traceback).
BUGS = {
    ("pipeline/evaluation/metrics.py", "NotImplementedError"): "an abstract Metric method",
    ("pipeline/evaluation/asr.py", "NotImplementedError"): "AsrEngine.transcribe, abstract",
    ("pipeline/search/trials.py", "NotImplementedError"): "an abstract executor method",
    ("pipeline/core/progress.py", "ValueError"): "a Display made with a mode no caller passes",
    ("pipeline/formats/gguf.py", "ValueError"): "a GGUF type or plan the family's own code built wrongly",
    ("pipeline/formats/gguf.py", "TypeError"): "metadata of a type the family's own writer should not produce",
    ("pipeline/core/kv_cache.py", "ValueError"): "an in-place cache driven at a shape the runtimes never use",
    ("pipeline/evaluation/results.py", "KeyError"): "a block id looked up that the report does not hold",
    ("passes/base.py", "NotImplementedError"): "Pass.apply, abstract",
    ("calibration/__init__.py", "NotImplementedError"): "CalibrationSource.feeds, abstract",
    ("passes/quantize.py", "NotImplementedError"): "GPTQ options the pass never passes",
    ("passes/base.py", "ValueError"): "PassResult.model asked of a result that cut its graph into several",
    ("pipeline/core/rewrite.py", "NotImplementedError"): "a Rule's abstract methods",
    ("pipeline/engine/plan.py", "ValueError"): "a search replanning a recipe of another model (plan_recipe's job)",
    ("pipeline/engine/runfolder.py", "RuntimeError"): "a runner in a folder no owner holds, or a folder held twice",
    ("pipeline/search/apart.py", "RuntimeError"): "a bug in the chosen recipe's run in its own process: its traceback",
    # A matcher's Mismatch is caught by the rule driver (pipeline/core/rewrite.py), which makes it a NoMatch.
    **{(f"passes/attention_rules/{name}.py", "Mismatch"): "a pattern that did not match, caught by the driver"
       for name in ("attention", "group_query", "heads", "rotary")},
    ("passes/convtranspose_to_conv.py", "Mismatch"): "a ConvTranspose it cannot rewrite, caught by the driver",
}
VALIDATOR_DECORATORS = {"field_validator", "model_validator"}
VALIDATOR_WRAPPERS = {"AfterValidator", "BeforeValidator", "PlainValidator", "WrapValidator"}


def _name(node: ast.expr | None) -> str | None:
    target = node.func if isinstance(node, ast.Call) else node
    if isinstance(target, ast.Name):
        return target.id
    return target.attr if isinstance(target, ast.Attribute) else None


def _validators(tree: ast.Module) -> set[str]:
    """Functions pydantic calls as validators in this module: decorated ones, model_post_init, and those handed to
    AfterValidator & co. (pydantic turns their ValueError into the ValidationError the loaders format)."""
    found = {"model_post_init"}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any(_name(d) in VALIDATOR_DECORATORS for d in node.decorator_list):
            found.add(node.name)
        if isinstance(node, ast.Call) and _name(node) in VALIDATOR_WRAPPERS:
            found |= {a.id for a in node.args if isinstance(a, ast.Name)}
    return found


def _handled(node: ast.Try) -> set[str]:
    types = [h.type for h in node.handlers if h.type is not None]
    return {_name(t) for t in types for t in (t.elts if isinstance(t, ast.Tuple) else [t])}


def _raises(path: Path) -> list[tuple[str, str, int]]:
    """(exception type, enclosing function, line) of every `raise X(...)` / `raise X` in the file that no
    enclosing `try` of the same function catches."""
    tree = ast.parse(path.read_text())
    out = []

    def visit(node: ast.AST, function: str, caught: frozenset[str]) -> None:
        for child in ast.iter_child_nodes(node):
            inner, inner_caught = function, caught
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner, inner_caught = child.name, frozenset()
            if isinstance(child, ast.Raise) and child.exc is not None:
                name = _name(child.exc)
                if name and name[0].isupper() and not ({name, "Exception", "BaseException"} & caught):
                    out.append((name, function, child.lineno))  # (`raise error` re-raises a caught one)
            if isinstance(child, ast.Try):
                for stmt in child.body:
                    visit_one(stmt, inner, inner_caught | _handled(child))
                for part in (*child.handlers, *child.orelse, *child.finalbody):
                    visit_one(part, inner, inner_caught)
                continue
            visit(child, inner, inner_caught)

    def visit_one(node: ast.AST, function: str, caught: frozenset[str]) -> None:
        wrapper = ast.Module(body=[node], type_ignores=[])
        visit(wrapper, function, caught)

    visit(tree, "", frozenset())
    return out


def _caught_in(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.ExceptHandler) and name in {_name(t) for t in (
        n.type.elts if isinstance(n.type, ast.Tuple) else [n.type])} for n in ast.walk(tree))


def _user_facing_names() -> set[str]:
    """PipelineError and every subclass the source defines (by name)."""
    names = {"PipelineError", "RunInterrupted"}  # RunInterrupted: Ctrl-C, printed as the resume hint, exit 130
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(_name(b) in names for b in node.bases):
                names.add(node.name)
    return names


def test_every_raise_is_user_facing_or_never_reaches_the_cli_or_a_named_bug():
    user_facing = _user_facing_names()
    unexplained = []
    seen_bugs = set()
    for path in SOURCES:
        rel = str(path.relative_to(REPO))
        validators = _validators(ast.parse(path.read_text()))
        for name, function, line in _raises(path):
            if name in user_facing or function in validators:
                continue
            if (rel, name) in BUGS:
                seen_bugs.add((rel, name))
                continue
            if _caught_in(path, name):  # a signal inside one module (fuse_attention's NoMatch)
                continue
            unexplained.append(f"{rel}:{line} raise {name} in {function or '<module>'}")
    assert not unexplained, "raise a PipelineError (one line for the user), or name the bug in BUGS:\n" + \
        "\n".join(unexplained)
    assert seen_bugs == set(BUGS), f"BUGS lists raises that are gone: {set(BUGS) - seen_bugs}"


def test_the_cli_prints_each_user_facing_type_as_one_line_and_a_bug_as_internal_error():
    samples = {
        PipelineError: PipelineError("recipe.yaml: steps.0.name: bad\nsecond line"),
        OSError: OSError(errno.ENOSPC, "No space left on device", "/data/run/final/model.onnx"),
        MemoryError: MemoryError(),
    }
    assert set(samples) == set(USER_FACING), "a new user-facing type needs a sample here"

    @main.command("raise-for-test", hidden=True)
    @click.argument("kind")
    def raise_for_test(kind: str) -> None:
        error = {t.__name__: e for t, e in samples.items()}.get(kind, ValueError("a bug"))
        with during("step 02 quantize"):
            raise error

    try:
        for kind, error in samples.items():
            res = cli("raise-for-test", kind.__name__)
            assert res.exit_code == 2, res.output
            line = one_line(res.stderr)
            assert line == f"error: {user_message(error)}" and "internal error" not in line
        assert one_line(cli("raise-for-test", "OSError").stderr) == \
            "error: step 02 quantize: /data/run/final/model.onnx: No space left on device"
        bug = cli("raise-for-test", "bug")
        assert bug.exit_code == 1 and one_line(bug.stderr).startswith("internal error: ValueError: a bug")
    finally:
        main.commands.pop("raise-for-test")


@pytest.mark.parametrize("error", [ValueError("x"), KeyError("k"), ZeroDivisionError(), AttributeError("a")])
def test_a_bug_is_not_dressed_as_a_user_error(error):
    assert user_message(error) is None


def test_user_messages_are_one_line_and_name_the_file():
    assert user_message(PipelineError("a\n  b")) == "a b"
    error = OSError(errno.EACCES, "Permission denied", "/x/y")
    assert user_message(error) == "/x/y: Permission denied"
    assert user_message(FileExistsError(errno.EEXIST, "File exists", "/a", None, "/b")) == "/a -> /b: File exists"
