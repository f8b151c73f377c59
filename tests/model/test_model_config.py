"""ModelConfig validates its values and rejects unknown keys by name."""

from __future__ import annotations

import pytest

from fucina.errors import ConfigError
from fucina.model.config import ModelConfig
from tiny_models import TINY, tiny_config


def test_unknown_key_is_rejected_by_name_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key 'model\.n_layer'.*n_layers"):
        ModelConfig.from_dict({"n_layer": 4})


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.d_model: expected an integer"):
        ModelConfig.from_dict({"d_model": "big"})


def test_dict_round_trip_gives_an_equal_config():
    config = tiny_config(positions="rope", n_kv_heads=2, sliding_window=3, sliding_window_layers=[0])
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_d_model_must_split_into_heads():
    with pytest.raises(ConfigError, match=r"d_model \(30\).*n_heads \(4\)"):
        ModelConfig(d_model=30, n_heads=4)


def test_query_heads_must_split_into_kv_groups():
    with pytest.raises(ConfigError, match=r"n_heads \(4\).*n_kv_heads \(3\)"):
        tiny_config(n_kv_heads=3)


def test_explicit_head_dim_lifts_the_divisibility_rule():
    config = ModelConfig(d_model=30, n_heads=4, head_dim=8)
    assert config.head_size == 8


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mixer": "mamba9"}, r"model\.mixer: unknown name 'mamba9'"),
        ({"ffn": "moe9"}, r"model\.ffn: unknown name 'moe9'"),
        ({"linear": "ternary9"}, r"model\.linear: unknown name 'ternary9'"),
        ({"layer_mixers": ["attention"] * 3}, r"layer_mixers lists 3 names but model\.n_layers is 2"),
        ({"layer_ffns": []}, r"layer_ffns lists 0 names but model\.n_layers is 2"),
        ({"layer_mixers": ["attention", "nope"]}, r"layer_mixers\[1\]: unknown name 'nope'"),
        ({"sliding_window": 4, "sliding_window_layers": [2]}, r"layer 2 does not exist"),
        ({"sliding_window_layers": [0]}, r"sliding_window is not"),
        ({"positions": "alibi"}, r"model\.positions: 'alibi'"),
        ({"dropout": 1.0}, r"model\.dropout"),
        ({"n_layers": 0}, r"model\.n_layers must be a positive integer"),
        ({"positions": "rope", "head_dim": 7}, r"even head size"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides)


def test_sliding_window_applies_to_the_listed_layers_only():
    config = tiny_config(sliding_window=4, sliding_window_layers=[1])
    assert [config.window(i) for i in range(TINY.n_layers)] == [None, 4]
    assert tiny_config(sliding_window=4).window(0) == 4


def test_derived_sizes_default_from_the_main_ones():
    config = ModelConfig(d_model=64, n_heads=4)
    assert (config.kv_heads, config.head_size, config.ff_size) == (4, 16, 256)


def test_a_short_layer_list_is_a_pattern_repeated_over_the_layers():
    config = tiny_config(n_layers=6, layer_mixers=["mamba", "mamba", "mla"], layer_ffns=["mlp", "moe"])
    assert [config.mixer_name(i) for i in range(6)] == ["mamba", "mamba", "mla"] * 2
    assert [config.ffn_name(i) for i in range(6)] == ["mlp", "moe"] * 3
    assert ModelConfig.from_dict(config.to_dict()) == config
