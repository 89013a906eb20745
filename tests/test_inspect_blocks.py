"""`pipeline inspect MODEL --blocks [--npz FOLDER]`: the scope tree, weight/FLOP/time shares, durations candidates."""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from conftest import cli
from tiny import conv_net, save
from tiny_acoustic import DURATIONS, acoustic, phonemes

from pipeline.core.blocks import BlockPartition
from pipeline.core.graph_stats import node_macs, scope_tree
from pipeline.engine.profile import block_stats, first_feed, measure, profile_run

CANDIDATES = "durations candidates (for a recipe's model.audio.durations or --durations):"


def _rows(stdout: str) -> dict[str, list[str]]:
    """The table's rows by their (indented) first cell: `{"  /enc/layers.0": ["2", "104", ...]}`."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("│"):
            cells = [c.rstrip() for c in line.strip("│").split("│")]
            rows[cells[0][1:]] = [c.strip() for c in cells[1:]]
    return rows


def _npz(folder: Path, feed: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "a.npz", **feed)
    return folder


def test_tree_aggregates_the_scopes_of_conv_net(tmp_path):
    model = conv_net(layers=3)
    res = cli("inspect", str(save(model, tmp_path / "conv.onnx")), "--blocks")
    assert res.code == 0, res.stderr
    rows = _rows(res.stdout)
    assert list(rows) == ["/enc", "  /enc/layers.0", "  /enc/layers.1", "  /enc/layers.2", "/dec"]
    layers = [rows[f"  /enc/layers.{i}"] for i in range(3)]
    # the inner row sums its children: nodes, params, op counts
    assert int(rows["/enc"][0]) == sum(int(r[0]) for r in layers) == 6
    params = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    enc = sum(v for k, v in params.items() if k.startswith("enc."))
    assert int(rows["/enc"][1].replace(",", "")) == enc
    assert int(rows["/enc"][1].replace(",", "")) + int(rows["/dec"][1]) == sum(params.values())
    assert rows["/enc"][6].startswith("Conv 3, Relu 3")
    assert rows["/enc"][3:6] == ["-", "-", "-"]  # no --npz: no FLOPs, no time
    assert "give --npz FOLDER" in res.stdout
    assert f"{CANDIDATES} none" in res.stdout


def test_weight_shares_sum_to_the_whole():
    model = conv_net(layers=4)
    stats = block_stats(model, BlockPartition(model))
    assert sum(s.weight_bytes for s in stats.values()) == sum(numpy_helper.to_array(t).nbytes
                                                              for t in model.graph.initializer)
    top = [r for r in scope_tree(stats) if r.depth == 0]
    assert sum(r.stats.weight_bytes for r in top) == sum(s.weight_bytes for s in stats.values())
    assert sum(r.stats.params for r in top) == sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def test_acoustic_flops_time_and_durations(tmp_path):
    model, feed = acoustic(), phonemes(1)[0]
    n = feed["x"].shape[1]
    path = save(model, tmp_path / "acoustic.onnx")
    res = cli("inspect", str(path), "--blocks", "--npz", str(_npz(tmp_path / "npz", feed)))
    assert res.code == 0, res.stderr
    rows = _rows(res.stdout)
    assert list(rows) == ["/enc", "/dur", "/pitch", "/dec"]
    assert rows["/enc"][3] == str(2 * n * 4 * 8)  # x [1, n, 4] @ w_enc [4, 8], by hand
    assert rows["/dur"][3] == str(2 * n * 8 * 1)
    shares = [float(r[2].rstrip("%")) for r in rows.values()]
    assert abs(sum(shares) - 100) < 0.3
    flop_shares = [float(r[4].rstrip("%")) for r in rows.values()]
    assert abs(sum(flop_shares) - 100) < 0.3
    assert all(r[5].endswith("%") for r in rows.values())
    assert "FLOPs counted for 4 of 4 Conv/MatMul-type nodes" in res.stdout
    assert f"{CANDIDATES} {DURATIONS} (node /dur/Round, block /dur)" in res.stdout
    plain = cli("inspect", str(path))  # the flat table says where the durations come from too
    assert plain.code == 0 and f"{CANDIDATES} {DURATIONS} (node /dur/Round, block /dur)" in plain.stdout


def test_frame_count_sets_the_flops_of_the_frame_blocks(tmp_path):
    """/dec runs on T frames (the durations' sum), known only from a run: its FLOPs are 2 * T * 10 * 3."""
    import onnxruntime as ort

    model, feed = acoustic(), phonemes(1)[0]
    frames = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0].shape[0]
    path = save(model, tmp_path / "acoustic.onnx")
    partition = BlockPartition(model)
    file, fed = first_feed(_npz(tmp_path / "npz", feed), model)
    measured = measure(model, partition, profile_run(path, fed), file)
    assert measured.macs["/dec"] == frames * 10 * 3
    assert measured.macs["/pitch"] == frames * 8 * 2
    assert measured.kernel_us["/dur"] > 0
    assert not list(Path(tempfile.gettempdir()).glob("pipeline-profile-*"))  # the profile file is gone


def test_node_macs_by_hand():
    assert node_macs("MatMul", [[2, 5, 4]], [[2, 5, 8]]) == 2 * 5 * 8 * 4
    assert node_macs("Gemm", [[4, 3], [4, 6]], [[3, 6]],
                     onnx.helper.make_node("Gemm", ["a", "b"], ["y"], transA=1)) == 3 * 6 * 4
    assert node_macs("Conv", [[1, 4, 20], [8, 2, 3]], [[1, 8, 20]]) == 8 * 20 * 2 * 3  # group 2
    assert node_macs("ConvTranspose", [[1, 8, 10], [8, 4, 4]], [[1, 4, 40]]) == 8 * 10 * 4 * 4
    assert node_macs("LSTM", [[7, 1, 16], [2, 4 * 32, 16], [2, 4 * 32, 32]], [[7, 2, 1, 32]]) \
        == 7 * (2 * 128 * 16 + 2 * 128 * 32)
    assert node_macs("Relu", [[1, 4]], [[1, 4]]) is None
    assert node_macs("MatMul", [None], [[1, 4]]) is None


def test_regex_blocks_still_form_the_ids(tmp_path):
    res = cli("inspect", str(save(conv_net(), tmp_path / "conv.onnx")), "--blocks", r"^/(enc)/layers\.(\d+)/")
    assert res.code == 0, res.stderr
    rows = _rows(res.stdout)
    assert list(rows)[:4] == ["/enc", "  /enc/0", "  /enc/1", "  /enc/2"]


def test_bad_npz_folder_and_mismatched_feeds_are_one_line(tmp_path):
    path = save(acoustic(), tmp_path / "acoustic.onnx")
    empty = tmp_path / "empty"
    empty.mkdir()
    wrong = _npz(tmp_path / "wrong", {"tokens": np.zeros((1, 5), np.int64)})
    for folder, message in ((tmp_path / "absent", "is not a folder"), (empty, "no .npz file in"),
                            (wrong, "feed names do not match the graph inputs")):
        res = cli("inspect", str(path), "--npz", str(folder))
        assert res.code == 2, res.stderr
        assert message in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = cli("inspect", str(path), "--npz", str(_npz(tmp_path / "rank", {"x": np.zeros((5, 4), np.float32)})))
    assert res.code == 2 and re.search(r"input 'x' has rank 2", res.stderr), res.stderr
