"""The family plug-in contract: a plug-in that breaks it is set aside with one line, the others keep working.

Each test installs a real distribution (a module, its METADATA and entry_points.txt) into a temporary folder
on sys.path, so the families are found through the same entry-point group a pip-installed plug-in uses.
"""
from __future__ import annotations

import logging
import sys
import textwrap

import pytest
import tiny
from conftest import cli

from pipeline.core.errors import PipelineError
from pipeline.families import detect_family, families, get_family, plugin_problems, reload

MODULE = "fake_family_plugin"
BUILT_INS = {"piper", "hifigan", "chattts", "tortoise", "kokoro", "generic"}

FAMILIES = '''
from pipeline.families import Family


class Good(Family):
    name = "goodfam"
    description = "a plug-in that keeps the contract"


class Nameless(Family):
    description = "no name of its own"


class BadName(Family):
    name = "has spaces"


class ListExporters(Family):
    name = "listexporters"
    exporters = []


class FakePiper(Family):
    name = "piper"
    description = "not the real one"


class NotAFamily:
    name = "notafamily"


class Explodes(Family):
    name = "explodes"

    def recognizes(self, model_path, model):
        raise RuntimeError("boom\\nsecond line")


class Everything(Family):
    name = "everything"

    def recognizes(self, model_path, model):
        return True
'''


@pytest.fixture
def install(tmp_path, monkeypatch):
    """install({"ep name": "module:Class"}, source=...) makes a distribution with those family entry points."""

    def make(entries: dict[str, str], source: str = FAMILIES) -> None:
        site = tmp_path / "site"
        (site / "fake_plugin-0.1.dist-info").mkdir(parents=True)
        (site / f"{MODULE}.py").write_text(textwrap.dedent(source))
        (site / "fake_plugin-0.1.dist-info" / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: fake-plugin\nVersion: 0.1\n")
        lines = "".join(f"{name} = {value}\n" for name, value in entries.items())
        (site / "fake_plugin-0.1.dist-info" / "entry_points.txt").write_text(
            f"[tts_onnx_pipeline.families]\n{lines}")
        monkeypatch.syspath_prepend(str(site))
        reload()

    yield make
    sys.modules.pop(MODULE, None)
    monkeypatch.undo()  # the temporary distribution leaves sys.path before the families are found again
    reload()


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


def _listed(stdout: str) -> set[str]:
    return {line.split()[0] for line in stdout.splitlines() if line and not line.startswith(" ")} - {"plug-ins"}


def test_a_family_without_a_name_is_set_aside_and_the_others_listed(install):
    install({"nameless": f"{MODULE}:Nameless", "good": f"{MODULE}:Good"})
    result = cli("families")
    assert result.exit_code == 0, result.output
    assert _listed(result.stdout) == BUILT_INS | {"goodfam"}
    [line] = _warnings(result.stderr)
    assert "'nameless'" in line and f"{MODULE}:Nameless" in line and "`name`" in line
    with pytest.raises(PipelineError, match=r"model.family: family plug-in 'nameless' .* set aside: .*`name`"):
        get_family("nameless")
    assert get_family("goodfam").name == "goodfam"


def test_a_plugin_taking_a_built_in_name_is_set_aside(install):
    install({"piper": f"{MODULE}:FakePiper"})
    result = cli("families")
    assert result.exit_code == 0, result.output
    [line] = _warnings(result.stderr)
    assert f"{MODULE}:FakePiper" in line and "takes the name 'piper'" in line and "pipeline.families.piper" in line
    assert families()["piper"].__module__ == "pipeline.families.piper"
    assert get_family("piper").description != "not the real one"


def test_a_plugin_taking_an_earlier_plugins_name_is_set_aside(install):
    install({"first": f"{MODULE}:Good", "second": f"{MODULE}:Good2"},
            source=FAMILIES + '\n\nclass Good2(Family):\n    name = "goodfam"\n')
    [problem] = plugin_problems()
    assert "'second'" in problem and "takes the name 'goodfam'" in problem
    assert families()["goodfam"].__name__ == "Good"


@pytest.mark.parametrize("value, says", [
    (f"{MODULE}:NotAFamily", "is not a Family subclass"),
    (f"{MODULE}:BadName", "has no usable `name`"),
    (f"{MODULE}:ListExporters", "`exporters` must be a tuple of Exporter"),
    (f"{MODULE}:Missing", "does not load: AttributeError"),
    ("no_such_module_anywhere:Family", "does not load: ModuleNotFoundError"),
])
def test_a_broken_plugin_is_one_warning_line_not_a_crash(install, value, says):
    install({"broken": value, "good": f"{MODULE}:Good"})
    result = cli("families")
    assert result.exit_code == 0, result.output
    assert _listed(result.stdout) == BUILT_INS | {"goodfam"}
    [line] = _warnings(result.stderr)
    assert line.startswith(f"warning: family plug-in 'broken' ({value}) set aside: ") and says in line


def test_a_module_that_fails_to_import_is_set_aside(install):
    install({"raises": f"{MODULE}:Good"}, source="raise ImportError('needs torchaudio 9')\n")
    [problem] = plugin_problems()
    assert "'raises'" in problem and "ImportError: needs torchaudio 9" in problem
    assert set(families()) == BUILT_INS


def test_a_broken_built_in_is_still_a_broken_install(install):
    install({"piper": "pipeline.families.no_such_family:PiperFamily"})
    with pytest.raises(PipelineError, match=r"built-in family 'piper' .* does not load.*reinstall it"):
        families()


def test_recognizes_raising_is_skipped_and_said_once(install, tmp_path, caplog):
    install({"explodes": f"{MODULE}:Explodes"})
    path = tiny.save(tiny.conv_net(), tmp_path / "tiny.onnx")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert detect_family(path).name == "generic"
        assert detect_family(path).name == "generic"
    [record] = [r for r in caplog.records if "explodes" in r.getMessage()]
    [problem] = plugin_problems()
    assert problem in record.getMessage()
    assert "'explodes'" in problem and MODULE in problem and "RuntimeError: boom second line" in problem
    assert "\n" not in problem


def test_a_family_after_one_that_raises_still_recognizes(install, tmp_path):
    install({"explodes": f"{MODULE}:Explodes", "everything": f"{MODULE}:Everything"})
    path = tiny.save(tiny.conv_net(), tmp_path / "tiny.onnx")
    assert detect_family(path).name == "everything"
    assert any("'explodes'" in problem for problem in plugin_problems())  # it was asked first, and skipped


def test_the_family_cache_is_restored():
    """Run after the others: no plug-in left behind, only the built-ins, and nothing to report."""
    assert set(families()) == BUILT_INS
    assert plugin_problems() == []
