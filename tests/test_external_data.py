"""Graphs that keep their weights in external data, shared between graphs: written once, loaded, hashed, copied."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from tiny import conv_net

from pipeline.core.errors import PipelineError
from pipeline.core.modelset import GraphFile, ModelSet, graph_sha256
from pipeline.core.onnx_io import external_files, load_onnx, save_sharing_weights, session


def _pair(tmp_path):
    """Two graphs with the same weights, one of them renamed: written with one shared weights file."""
    a, b = conv_net(seed=1, channels=32), conv_net(seed=1, channels=32)
    for t in b.graph.initializer:  # exporters name folded weights differently per graph
        old = t.name
        t.name = "renamed::" + old
        for n in b.graph.node:
            n.input[:] = [t.name if i == old else i for i in n.input]
    save_sharing_weights({tmp_path / "a.onnx": a, tmp_path / "b.onnx": b}, tmp_path / "weights.bin")
    return tmp_path / "a.onnx", tmp_path / "b.onnx"


def test_shared_weights_are_written_once_and_both_graphs_run(tmp_path):
    a, b = _pair(tmp_path)
    one = sum(t.raw_data.__len__() for t in conv_net(seed=1, channels=32).graph.initializer if len(t.raw_data) >= 1024)
    assert one < (tmp_path / "weights.bin").stat().st_size < one + 4096 * 8  # once, page-aligned
    assert external_files(a) == external_files(b) == [tmp_path / "weights.bin"]
    x = np.random.default_rng(0).standard_normal((1, 4, 16)).astype(np.float32)
    want = session(conv_net(seed=1, channels=32)).run(None, {"x": x})[0]
    for path in (a, b):
        np.testing.assert_array_equal(session(path).run(None, {"x": x})[0], want)
        model = load_onnx(path)  # the weights come in with it
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        np.testing.assert_array_equal(session(model).run(None, {"x": x})[0], want)


def test_changed_or_missing_weights_are_caught(tmp_path):
    a, b = _pair(tmp_path)
    ms = ModelSet(tmp_path, [GraphFile("a", "a.onnx", graph_sha256(a)), GraphFile("b", "b.onnx", graph_sha256(b))])
    ms.require_unchanged()
    data = bytearray((tmp_path / "weights.bin").read_bytes())
    data[-1] ^= 1
    (tmp_path / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="does not match its files"):
        ms.require_unchanged()
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(PipelineError, match="weights file weights.bin is missing"):
        load_onnx(a)


def test_a_copied_graph_brings_its_weights_file(tmp_path):
    (tmp_path / "src").mkdir()
    a, b = _pair(tmp_path / "src")
    src = ModelSet(tmp_path / "src", [GraphFile("a", "a.onnx", graph_sha256(a)), GraphFile("b", "b.onnx", graph_sha256(b))])
    (tmp_path / "dst").mkdir()
    dst = src.derive(tmp_path / "dst")
    dst.copy_graph_from(src, "b")
    assert (tmp_path / "dst" / "weights.bin").exists() and dst.graph("b").sha256 == src.graph("b").sha256
    assert src.total_bytes() == sum(f.stat().st_size for f in (a, b, tmp_path / "src" / "weights.bin"))


def test_a_model_set_shares_weights_its_graphs_hold_alike(tmp_path):
    """A pass that left two graphs with the same weights (inline): the set is rewritten with one weights file."""
    from pipeline.core.onnx_io import save_onnx

    x = np.random.default_rng(0).standard_normal((1, 4, 16)).astype(np.float32)
    big = conv_net(seed=1, channels=512)  # a 1 MB+ weight
    want = session(big).run(None, {"x": x})[0]
    for name in ("a", "b"):
        save_onnx(big, tmp_path / f"{name}.onnx")
    save_onnx(conv_net(seed=2, channels=512), tmp_path / "c.onnx")  # weights of its own: left inline
    ms = ModelSet(tmp_path, [GraphFile(n, f"{n}.onnx", graph_sha256(tmp_path / f"{n}.onnx")) for n in "abc"])
    before = ms.total_bytes()
    assert ms.share_weights() == ["a", "b"]
    assert ms.total_bytes() < 0.75 * before and external_files(tmp_path / "c.onnx") == []
    ms.require_unchanged()
    for name in ("a", "b"):
        np.testing.assert_array_equal(session(tmp_path / f"{name}.onnx").run(None, {"x": x})[0], want)
    written = (tmp_path / "weights.bin").stat().st_mtime_ns
    assert ms.share_weights() == []  # again: shared already, nothing rewritten
    assert (tmp_path / "weights.bin").stat().st_mtime_ns == written
    lone = ModelSet(tmp_path, [GraphFile("c", "c.onnx")])
    assert lone.share_weights() == []


def test_the_check_maps_each_models_weights_once_and_measures_the_same(tmp_path):
    """compare_graphs writes a model that holds its weights itself into a scratch folder once (FP16 values kept in
    int32_data as raw bytes), so its sessions map them; the numbers are those of the models compared in memory,
    and nothing is written beside the inputs."""
    from onnxconverter_common import float16
    from tiny import save

    from pipeline.core.onnx_io import is_light, load_mapped
    from pipeline.evaluation.blockwise import compare_models
    from pipeline.evaluation.evaluate import compare_graphs

    reference = conv_net(seed=1, channels=32)
    candidate = float16.convert_float_to_float16(conv_net(seed=1, channels=32), keep_io_types=True)
    for t in candidate.graph.initializer:  # as a writer that fills the typed field would
        if t.data_type == onnx.TensorProto.FLOAT16:
            values = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.helper.make_tensor(t.name, t.data_type, t.dims, values.flatten(), raw=False))
    assert any(not t.HasField("raw_data") and t.int32_data for t in candidate.graph.initializer)
    ref_path, cand_path = save(reference, tmp_path / "in" / "ref.onnx"), save(candidate, tmp_path / "in" / "cand.onnx")
    light, folder = load_mapped(cand_path, tmp_path / "scratch")
    assert is_light(light) and folder == tmp_path / "scratch"
    assert {f.name for f in folder.iterdir()} == {"cand.onnx", "cand.onnx.data"}
    x = np.random.default_rng(0).standard_normal((1, 4, 16)).astype(np.float32)
    np.testing.assert_array_equal(session(light, weights_dir=folder).run(None, {"x": x})[0],
                                  session(candidate).run(None, {"x": x})[0])

    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 4, 16)).astype(np.float32)} for i in range(3)]
    mapped = compare_graphs(ref_path, cand_path, feeds, None, [])
    in_memory = compare_models(reference, candidate, feeds)
    assert [b.isolated.sqnr_db for b in mapped.blocks] == [b.isolated.sqnr_db for b in in_memory.blocks]
    assert [b.accumulated.sqnr_db for b in mapped.blocks] == [b.accumulated.sqnr_db for b in in_memory.blocks]
    assert mapped.outputs[0].sqnr_db == in_memory.outputs[0].sqnr_db
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["cand.onnx", "ref.onnx"]


def test_listing_a_self_contained_files_external_data_does_not_parse_it(tmp_path, monkeypatch):
    """Hashing a graph and `load_light` ask which data files a graph reads; for a self-contained file the answer
    comes from a scan of its bytes, not a parse that holds every weight (a float Kokoro: 325 MB more, twice)."""
    from pipeline.core import onnx_io

    inline = tmp_path / "inline.onnx"
    onnx.save(conv_net(channels=8, layers=2), str(inline))
    external = tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    onnx.save(conv_net(channels=8, layers=2), str(external), save_as_external_data=True, location="w.bin",
              size_threshold=0)
    parsed = []
    parse = onnx_io.parse_graph
    monkeypatch.setattr(onnx_io, "parse_graph", lambda path: parsed.append(path) or parse(path))
    assert external_files(inline) == [] and parsed == []
    assert external_files(external) == [external.parent / "w.bin"] and parsed == [external]
