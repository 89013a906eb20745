"""What every pass must do, checked on the result of one run of it (tests/test_pass_contract.py, and
tests/test_quantize_nbits.py for the passes' modes): its input unchanged, its scope kept, its stats JSON."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from passes.base import Pass, PassResult


@dataclass
class Applied:
    cls: type[Pass]
    model: onnx.ModelProto  # the input, after the pass ran
    before: bytes  # the input, serialized before the pass ran
    result: PassResult
    selected: set[str] | None


def check_input_unchanged(a: Applied) -> None:
    assert a.model.SerializeToString() == a.before, f"{a.cls.name} modified the model it was given"


def _node_changes(model: onnx.ModelProto, out: onnx.ModelProto, names: set[str]) -> list[str]:
    """How the nodes `names` of `model` differ in `out`: gone, op type, attributes, initializer inputs."""
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: t for t in out.graph.initializer}
    nodes = {n.name: n for n in out.graph.node}
    changes = []
    for node in model.graph.node:
        if node.name not in names:
            continue
        new = nodes.get(node.name)
        if new is None or new.op_type != node.op_type:
            changes.append(f"{node.name}: {node.op_type} is now {new.op_type if new is not None else 'gone'}")
            continue
        if [a.SerializeToString() for a in new.attribute] != [a.SerializeToString() for a in node.attribute]:
            changes.append(f"{node.name}: attributes changed")
        if len(new.input) != len(node.input):
            changes.append(f"{node.name}: {len(node.input)} inputs became {len(new.input)}")
            continue
        for k, name in enumerate(node.input):
            if name not in before:
                continue
            got = after.get(new.input[k])
            value = numpy_helper.to_array(got) if got is not None else None
            if value is None or value.dtype != before[name].dtype or not np.array_equal(value, before[name]):
                changes.append(f"{node.name}: input {k} ({name}) is no longer the same initializer")
    return changes


def check_scope(a: Applied) -> None:
    if not a.cls.scoped:
        # A whole-graph pass says so itself; the runner refuses include/exclude scopes for it.
        assert vars(a.cls).get("scoped") is False, f"{a.cls.name}: a whole-graph pass declares `scoped = False`"
        return
    # Applied passes run on the graph named "model": a result under other names cut it into several.
    assert list(a.result.graphs) == ["model"], \
        f"{a.cls.name} cuts graphs: it cannot honour a block scope (scoped = False)"
    out = a.result.model
    every = {n.name for n in a.model.graph.node}
    outside = _node_changes(a.model, out, every - a.selected)
    assert not outside, f"{a.cls.name} changed nodes outside its scope: {outside[:5]}"
    inside = _node_changes(a.model, out, a.selected)
    assert inside and a.result.changed, f"{a.cls.name} changed nothing in the block it was given"


def check_stats(a: Applied, block: str | None) -> None:
    stats = a.result.stats
    assert isinstance(stats, dict) and stats, f"{a.cls.name} reports no stats"
    try:
        text = json.dumps(stats)
    except TypeError as e:
        raise AssertionError(f"{a.cls.name}'s stats are not JSON-serialisable: {e}") from None
    assert json.loads(text) == stats, f"{a.cls.name}'s stats change through JSON (tuples, non-str keys?): {stats}"
    if a.cls.changes_precision:
        assert a.cls.scoped, f"{a.cls.name} changes precision, so the fallback scopes it: it must be scoped"
        changed = stats.get("blocks_changed")
        assert isinstance(changed, dict) and changed, f"{a.cls.name} changes precision: stats need blocks_changed"
        assert all(isinstance(n, int) and n > 0 for n in changed.values()), f"blocks_changed counts: {changed}"
        assert set(changed) == {block}, f"{a.cls.name} scoped to {block} reports blocks_changed {changed}"
