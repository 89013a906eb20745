"""Chained model sets (a graph cut in two): running the chain, capturing a downstream graph's inputs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import tiny
from onnx.utils import Extractor

from pipeline.evaluation.chain import ChainRunner, dataflow_edges, entry_graphs, graph_feeds, sink_graphs
from pipeline.evaluation.evaluate import evaluate
from pipeline.families import GenericFamily
from pipeline.core.errors import PipelineError
from pipeline.core.modelset import GraphFile, ModelSet, file_sha256
from pipeline.core.onnx_io import session

CUT = "/enc/layers.1/Relu_output_0"


def cut_in_two(tmp_path, model: onnx.ModelProto) -> ModelSet:
    """front: x -> CUT, back: CUT -> y, written as a model set whose chain says front.CUT feeds back.CUT."""
    extractor = Extractor(onnx.shape_inference.infer_shapes(model))
    tmp_path.mkdir(parents=True, exist_ok=True)
    graphs = []
    for name, ins, outs in (("front", ["x"], [CUT]), ("back", [CUT], ["y"])):
        onnx.save(extractor.extract_model(ins, outs), str(tmp_path / f"{name}.onnx"))
        graphs.append(GraphFile(name, f"{name}.onnx", file_sha256(tmp_path / f"{name}.onnx")))
    ms = ModelSet(tmp_path, graphs, chain=[{"from": f"front.{CUT}", "to": f"back.{CUT}"}])
    ms.write_manifest()
    return ms


def feeds(n=3):
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((1, 4, 16 + 8 * i)).astype(np.float32)} for i in range(n)]


def test_chain_runs_like_the_monolithic_model_and_captures_downstream_inputs(tmp_path):
    model = tiny.conv_net()
    ms = cut_in_two(tmp_path / "set", model)
    assert entry_graphs(ms) == ["front"] and sink_graphs(ms) == ["back"]
    mono = session(model)
    for f in feeds():
        out = ChainRunner(ms).run(f)
        np.testing.assert_array_equal(out["back"][1]["y"], mono.run(None, f)[0])
    captured = graph_feeds(ms, feeds(), "back")
    middle = session(ms.path("front"))
    for f, c in zip(feeds(), captured):
        assert list(c) == [CUT]
        np.testing.assert_array_equal(c[CUT], middle.run(None, f)[0])
    assert [list(c) for c in graph_feeds(ms, feeds(), "front")] == [["x"]] * 3


def test_chain_check_reports_every_graph_and_the_whole_chain(tmp_path):
    model = tiny.conv_net()
    tiny.save(model, tmp_path / "mono.onnx")
    reference = cut_in_two(tmp_path / "ref", model)
    broken = tiny.conv_net()
    for init in broken.graph.initializer:
        if init.name == "dec.proj.weight":  # a fault in the back graph only
            w = onnx.numpy_helper.to_array(init) * 1.1
            init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    candidate = cut_in_two(tmp_path / "cand", broken)
    mono = ModelSet(tmp_path, [GraphFile("model", "mono.onnx", file_sha256(tmp_path / "mono.onnx"))])
    report = evaluate(mono, candidate, feeds(), GenericFamily(), fp32_twin=reference)
    assert report.block("front:/enc/layers.0").isolated.sqnr_db == float("inf")
    assert 15 < report.block("back:/dec").isolated.sqnr_db < 25  # 10% off: 20 dB
    outputs = {o.name: o for o in report.outputs}
    assert outputs["chain:back"].sqnr_db == pytest.approx(20, abs=0.5)
    assert report.to_json()["blocks"][0]["isolated"]["sqnr_db"] == "inf"  # JSON has no inf


def test_a_chain_that_is_not_dataflow_is_named(tmp_path):
    ms = cut_in_two(tmp_path, tiny.conv_net())
    ms.chain = [{"from": "embed_text.hidden|embed_code.hidden", "to": "layer_00.hidden"}]
    with pytest.raises(PipelineError, match="not a dataflow edge"):
        dataflow_edges(ms)
