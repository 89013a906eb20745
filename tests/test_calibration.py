from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from calibration import DATA_DIR, SourceContext, checked_feeds

from pipeline.families import make_source
from calibration import read_sentences
from pipeline.core.errors import PipelineError


def test_shipped_sentences_are_many_and_distinct():
    calib = read_sentences(DATA_DIR / "sentences_en.txt")
    evals = read_sentences(DATA_DIR / "eval_en.txt")
    assert len(calib) >= 50 and len(set(calib)) == len(calib)
    assert len(evals) >= 5 and not set(calib) & set(evals)


def test_piper_source_phonemizes_through_the_voice_map(piper_model):
    source = make_source("piper", {"count": 4}, SourceContext(piper_model))
    model = onnx.load(str(piper_model), load_external_data=False)
    feeds = checked_feeds(source, model)
    assert len(feeds) == 4
    id_map = json.loads(piper_model.with_name(piper_model.name + ".json").read_text())["phoneme_id_map"]
    bos, eos, pad = id_map["^"][0], id_map["$"][0], id_map["_"][0]
    for f in feeds:
        ids = f["input"][0]
        assert ids[0] == bos and ids[-1] == eos and pad in ids
        assert f["input_lengths"][0] == ids.size > 20  # real sentences, not stubs
        assert f["scales"].tolist() == [0.0, 1.0, 0.0]
    # "The quick brown fox": espeak gives /ð/ first; its id must follow BOS and PAD.
    assert feeds[0]["input"][0][2] == id_map["ð"][0]


def test_piper_source_without_voice_config_is_a_clear_error(tmp_path, piper_model):
    lone = tmp_path / "voice.onnx"
    shutil.copyfile(piper_model, lone)
    source = make_source("piper", {}, SourceContext(lone))
    with pytest.raises(PipelineError, match="needs the voice config"):
        list(source.feeds())


def test_npz_source_reads_arrays(tmp_path, tiny_model, tiny_feeds):
    source = make_source("npz", {"folder": str(tiny_feeds)}, SourceContext(tiny_model))
    feeds = checked_feeds(source, onnx.load(str(tiny_model)))
    assert len(feeds) == 6 and feeds[0]["x"].dtype == np.float32


def test_npz_refuses_pickled_objects(tmp_path, tiny_model):
    folder = tmp_path / "evil"
    folder.mkdir()
    np.savez(folder / "a.npz", x=np.array([{"a": 1}], dtype=object))
    source = make_source("npz", {"folder": str(folder)}, SourceContext(tiny_model))
    with pytest.raises(PipelineError, match="cannot read calibration file"):
        list(source.feeds())


def test_source_params_are_strict(tiny_model):
    with pytest.raises(PipelineError, match="unknown key 'folderr'.*valid keys: folder, package, pattern"):
        make_source("npz", {"folderr": "x"}, SourceContext(tiny_model))


def test_skip_leaves_out_the_first_sentences_the_check_evaluates_on(tmp_path):
    from calibration.chattts_prompts import sampled_ids

    ctx = SourceContext(tmp_path / "gpt.onnx")
    every = [f["input_ids"][0].tolist() for f in make_source("chattts", {"vocab": 500}, ctx).feeds()]
    later = [f["input_ids"][0].tolist() for f in make_source("chattts", {"vocab": 500, "skip": 8, "count": 3},
                                                               ctx).feeds()]
    assert later == every[8:11] and not any(p in every[:8] for p in later)
    assert every[0] == sampled_ids(read_sentences(DATA_DIR / "chattts_prompts.txt")[0], 500)
    with pytest.raises(PipelineError, match="chattts: skip 99 leaves no sentence"):
        list(make_source("chattts", {"vocab": 500, "skip": 99}, ctx).feeds())
