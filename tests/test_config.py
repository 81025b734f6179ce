"""The config tree: dataclasses <-> JSON dicts, strict on the way in."""
import json

import pytest

from e4t_jax import config as config_lib
from e4t_jax.e4t.config import E4TConfig, ModelConfig
from e4t_jax.e4t.offsets import CROSS_ATTENTION_QKV, OffsetConfig
from e4t_jax.recipes.pretrain import PRESETS, PretrainConfig


def test_round_trip_through_json():
    for config in (E4TConfig(), E4TConfig(model=ModelConfig(vision_source="laion/x"),
                                          offsets=OffsetConfig(targets=CROSS_ATTENTION_QKV, kind="dense")),
                   PretrainConfig(), *PRESETS.values()):
        values = json.loads(json.dumps(config_lib.to_dict(config)))
        assert config_lib.from_dict(type(config), values) == config


def test_missing_fields_take_their_defaults_and_ints_are_floats():
    config = config_lib.from_dict(E4TConfig, {"loss": {"lambda_w": 0}, "offsets": {"rank": 8}})
    assert config.loss.lambda_w == 0.0 and isinstance(config.loss.lambda_w, float)
    assert config.offsets == OffsetConfig(rank=8) and config.encoder == E4TConfig().encoder


@pytest.mark.parametrize("values, message", [
    ({"offsets": {"rank": "four"}}, "E4TConfig.offsets.rank must be int"),
    ({"offsets": {"rank": True}}, "E4TConfig.offsets.rank must be int"),
    ({"encoder": {"hidden": 3}}, "E4TConfig.encoder has unknown fields \\['hidden'\\]"),
    ({"offsets": {"targets": "attn1.to_q"}}, "E4TConfig.offsets.targets must be a list"),
    ({"model": {"vision_source": 3}}, "E4TConfig.model.vision_source must be str"),
    ({"loss": []}, "E4TConfig.loss must be a JSON object"),
    ({"offsets": {"kind": "no_such_kind"}}, "kind must be one of"),
])
def test_what_does_not_fit_is_refused_with_its_path(values, message):
    with pytest.raises(ValueError, match=message):
        config_lib.from_dict(E4TConfig, values)


def test_differences_name_the_changed_fields():
    a = config_lib.to_dict(PretrainConfig())
    b = config_lib.to_dict(PRESETS["tiny"])
    assert "train.steps" in config_lib.differences(a, b) and "e4t.encoder.hidden_dim" in config_lib.differences(a, b)
    assert config_lib.differences(a, a) == []
