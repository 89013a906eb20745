"""Model-config numbers are checked before any work: the exporters' `config` overrides have a schema with ranges,
and `pipeline validate` (and `run`, before its run folder) builds the model from its config on torch's meta
device, so a config that cannot be built is one line naming the key, exit 2."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import cli, one_line

# The small configs the family tests export (test_chattts.RECIPE, test_tortoise.SMALL).
CHATTTS_SMALL = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                 "num_text_tokens": 97, "num_audio_tokens": 31}
TORTOISE_SMALL = {"layers": 3, "model_dim": 64, "heads": 4, "max_text_tokens": 120, "max_mel_tokens": 80}

# (exporter, config, the key the error names, what it says)
BAD = [
    ("chattts_gpt", {"num_hidden_layers": 0}, "num_hidden_layers", "greater than 0"),
    ("chattts_gpt", {"num_attention_heads": -4}, "num_attention_heads", "greater than 0"),
    ("chattts_gpt", {"hidden_size": 64, "num_attention_heads": 6}, "num_attention_heads", "not a multiple"),
    ("chattts_gpt", {"hidden_size": 64}, "num_attention_heads", "not a multiple"),  # against the default 12 heads
    ("chattts_gpt", {"hidden_size": 68, "num_attention_heads": 4}, "num_attention_heads", "RoPE needs an even"),
    ("chattts_gpt", {"num_hidden_layers": "two"}, "num_hidden_layers", "valid integer"),
    ("chattts_gpt", {"num_hidden_layers": "2"}, "num_hidden_layers", "valid integer"),
    ("chattts_gpt", {"num_hidden_layers": True}, "num_hidden_layers", "valid integer"),
    ("chattts_gpt", {"num_vq": 1.5}, "num_vq", "valid integer"),
    ("chattts_gpt", {"rms_norm_eps": 0}, "rms_norm_eps", "greater than 0"),
    ("chattts_gpt", {"num_text_tokens": 1}, "num_text_tokens", "greater than or equal to 2"),
    ("chattts_gpt", {"num_hidden_layerz": 2}, "num_hidden_layerz", "valid keys: hidden_size, intermediate_size"),
    ("tortoise_gpt", {"layers": 0}, "layers", "greater than 0"),
    ("tortoise_gpt", {"heads": -2}, "heads", "greater than 0"),
    ("tortoise_gpt", {"model_dim": 64, "heads": 6}, "heads", "not a multiple"),
    ("tortoise_gpt", {"model_dim": 100}, "heads", "not a multiple"),  # against the default 16 heads
    ("tortoise_gpt", {"layers": "three"}, "layers", "valid integer"),
    ("tortoise_gpt", {"layers": "3"}, "layers", "valid integer"),
    ("tortoise_gpt", {"max_text_tokens": 3}, "max_text_tokens", "greater than or equal to 5"),
    ("tortoise_gpt", {"number_mel_codes": 100}, "start_mel_token", "not below number_mel_codes 100"),
    ("tortoise_gpt", {"start_text_token": 256}, "start_text_token", "past the text vocabulary"),
    ("tortoise_gpt", {"layerz": 3}, "layerz", "valid keys: conditioning_blocks, heads, layers"),
]

# Within every range, but the modules cannot be built: a weight with more elements than torch can count.
UNBUILDABLE = [
    ("chattts_gpt", {"hidden_size": 2**32, "num_attention_heads": 2}),
    ("tortoise_gpt", {"model_dim": 2**32, "heads": 2}),
]


def recipe(tmp_path: Path, exporter: str, params: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\nmodel:\n  exporter: {exporter}\n  params: {json.dumps(params)}\nsteps: []\n")
    return path


def refused(tmp_path: Path, path: Path) -> str:
    """validate and run both exit 2 with the same one line, and the run leaves nothing in --out."""
    out = tmp_path / "run"
    lines = []
    for args in (["validate", str(path)], ["run", str(path), "--out", str(out)]):
        res = cli(*args)
        assert res.exit_code == 2, (args, res.stdout, res.stderr)
        lines.append(one_line(res.stderr))
    assert lines[0] == lines[1]
    assert not out.exists()  # refused before the run folder (and its steps/) is made
    return lines[0]


@pytest.mark.parametrize("exporter, config, key, says", BAD, ids=[f"{e}-{json.dumps(c)}" for e, c, _, _ in BAD])
def test_a_config_out_of_range_is_one_line_naming_its_key(tmp_path, exporter, config, key, says):
    line = refused(tmp_path, recipe(tmp_path, exporter, {"config": config}))
    assert f"r.yaml: model.params.config.{key}: " in line and says in line, line
    assert "internal error" not in line


@pytest.mark.parametrize("exporter, config", UNBUILDABLE, ids=[e for e, _ in UNBUILDABLE])
def test_a_config_the_modules_cannot_be_built_from_fails_in_validate(tmp_path, exporter, config):
    line = refused(tmp_path, recipe(tmp_path, exporter, {"config": config}))
    assert "r.yaml: model.params.config: the model cannot be built: RuntimeError: " in line, line


@pytest.mark.parametrize("exporter, config", [("chattts_gpt", CHATTTS_SMALL), ("tortoise_gpt", TORTOISE_SMALL),
                                              ("chattts_gpt", {"rms_norm_eps": "1e-5"}),  # YAML 1.1's float
                                              ("chattts_gpt", {}), ("tortoise_gpt", {})])
def test_a_buildable_config_validates(tmp_path, exporter, config):
    res = cli("validate", str(recipe(tmp_path, exporter, {"seed": 3, "config": config})))
    assert res.exit_code == 0, res.stderr
    assert one_line(res.stdout).endswith("r.yaml: ok (0 steps)")


def test_the_schemas_mirror_the_dataclasses_and_describe_every_field():
    from pipeline.families.chattts import GPTConfigParams
    from pipeline.families.chattts.exporter import GPTConfig
    from pipeline.families.tortoise import TortoiseConfigParams
    from pipeline.families.tortoise.model import TortoiseConfig

    for schema, dataclass_ in ((GPTConfigParams, GPTConfig), (TortoiseConfigParams, TortoiseConfig)):
        assert schema().model_dump() == asdict(dataclass_())  # same fields, same defaults
        assert all(f.description for f in schema.model_fields.values()), schema.__name__


def test_the_cache_key_holds_only_the_overrides():
    """Runs exported before the schema keep their cache: the params dump the overrides the recipe set, as the
    free-form dict did."""
    from pipeline.families.chattts import ChatTTSParams
    from pipeline.families.tortoise import TortoiseParams

    assert ChatTTSParams.model_validate({"seed": 0}).model_dump() == {"asset": None, "seed": 0, "config": {}}
    assert TortoiseParams.model_validate({"config": {"layers": 3}}).model_dump()["config"] == {"layers": 3}


def test_an_asset_config_json_is_held_to_the_same_ranges(tmp_path):
    """ChatTTS's own gpt/config.json is read and checked in validate, without its weights."""
    (tmp_path / "asset" / "gpt").mkdir(parents=True)
    (tmp_path / "asset" / "gpt" / "config.json").write_text(json.dumps({"hidden_size": 68, "num_attention_heads": 4}))
    line = refused(tmp_path, recipe(tmp_path, "chattts_gpt", {"asset": "asset"}))
    assert "r.yaml: model.params.asset (" in line and "gpt/config.json): num_attention_heads: " in line, line
    assert "RoPE needs an even head size" in line


def test_config_overrides_with_an_asset_are_refused(tmp_path):
    line = refused(tmp_path, recipe(tmp_path, "chattts_gpt", {"asset": "asset", "config": {"num_vq": 2}}))
    assert line.endswith("r.yaml: model.params: 'config' overrides apply to seeded weights; an asset folder has "
                         "its own"), line


@pytest.mark.parametrize("params, key, says", [
    ({"opset": 12}, "opset", "greater than or equal to 13"),
    ({"opset": 21}, "opset", "less than or equal to 20"),
    ({"checkpoint": ""}, "checkpoint", "at least 1 character"),
])
def test_hifigan_params_have_ranges(tmp_path, params, key, says):
    line = refused(tmp_path, recipe(tmp_path, "hifigan", params))
    assert f"r.yaml: model.params.{key}: " in line and says in line, line


def test_hifigan_config_json_is_read_in_validate(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"resblock": "2"}))
    line = refused(tmp_path, recipe(tmp_path, "hifigan", {"config": "config.json"}))
    assert "r.yaml: model.params.config: " in line and "resblock '2' is not supported" in line, line


@pytest.mark.parametrize("params, key", [({"length_scale": 0}, "length_scale"), ({"noise_scale": -0.5}, "noise_scale"),
                                         ({"noise_w": -1}, "noise_w")])
def test_piper_scales_have_ranges(params, key):
    from calibration import SourceContext
    from pipeline.families import make_source

    from pipeline.core.errors import PipelineError

    with pytest.raises(PipelineError, match=rf"^calibration.params: {key}: Input should be greater than"):
        make_source("piper", params, SourceContext(None))
