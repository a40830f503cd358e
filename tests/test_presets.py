"""Every preset's parameter count, from abstract shapes, is the published count within 1%."""

import pytest

from instruct_jax.config import validate, Config
from instruct_jax.errors import ConfigError
from instruct_jax.model.presets import PRESETS, PUBLISHED_PARAMS, param_count, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_matches_published_parameter_count(name):
    count = param_count(PRESETS[name])
    assert abs(count / PUBLISHED_PARAMS[name] - 1) < 0.01, (name, count, PUBLISHED_PARAMS[name])
    validate(Config(model=preset(name)))


def test_palm_presets_use_the_palm_block():
    for name in ("palm-62b", "palm-540b"):
        m = PRESETS[name]
        assert m.parallel_block and m.num_kv_heads == 1 and m.tie_embeddings and not m.qkv_bias


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="palm-540b"):
        preset("gpt-5")
