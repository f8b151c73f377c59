"""Every preset builds, and its parameter count matches the published model it reproduces."""

from __future__ import annotations

import pytest
import torch

from fucina.errors import ConfigError
from fucina.model.config import ModelConfig
from fucina.model.transformer import Transformer
from fucina.presets import PRESET_NAMES, PRESETS, get_preset


def closed_form_parameters(c: ModelConfig) -> int:
    """Parameter count written out from the architecture, independently of the module code."""
    d, hd, ff = c.d_model, c.head_size, c.ff_size
    q, kv = c.n_heads * hd, c.kv_heads * hd
    attention = d * (q + 2 * kv) + q * d + (q + 2 * kv + d if c.bias else 0)
    ffn_in = 2 * ff if c.mlp == "swiglu" else ff
    mlp = d * ffn_in + ff * d + (ffn_in + d if c.bias else 0)
    norm = 2 * d if c.norm == "layernorm" else d
    embeddings = c.vocab_size * d + (c.context_length * d if c.positions == "learned" else 0)
    head = 0 if c.tie_embeddings else c.vocab_size * d
    return embeddings + c.n_layers * (attention + mlp + 2 * norm) + norm + head


def built_parameters(config: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(config).parameters())


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_parameter_count_matches_its_architecture(name):
    count = built_parameters(PRESETS[name])
    print(f"{name}: {count:,} parameters")
    assert count == closed_form_parameters(PRESETS[name])


# Published sizes: GPT-2 small is 124,439,808 parameters with its head tied (HF GPT2LMHeadModel);
# untying adds one vocab x d_model matrix. PicoDAC ~4.6M, microDAC ~70M (their model cards).
@pytest.mark.parametrize(
    ("name", "published", "tolerance"),
    [
        ("gpt2-real", 124_439_808 + 50257 * 768, 0.0),
        ("picodac", 4.6e6, 0.02),
        ("microdac", 70e6, 0.04),
        ("llama-30m", 30e6, 0.05),
    ],
)
def test_preset_matches_the_published_size(name, published, tolerance):
    count = built_parameters(PRESETS[name])
    print(f"{name}: {count:,} parameters (published {published:,.0f})")
    assert abs(count - published) <= tolerance * published


def test_llama_presets_follow_the_llama_layout():
    for name in ("llama-tiny", "llama-30m", "mistral-tiny", "mistral-30m"):
        c = PRESETS[name]
        assert (c.positions, c.norm, c.mlp, c.bias, c.tie_embeddings) == (
            "rope",
            "rmsnorm",
            "swiglu",
            False,
            False,
        )
        assert c.kv_heads < c.n_heads
    assert PRESETS["mistral-tiny"].sliding_window and PRESETS["llama-tiny"].sliding_window is None


def test_unknown_preset_suggests_close_names():
    with pytest.raises(ConfigError, match=r"'picodak'.*did you mean 'picodac'"):
        get_preset("picodak")


def test_get_preset_returns_a_copy_callers_may_change():
    config = get_preset("gpt2-tiny")
    config.dropout = 0.5
    assert PRESETS["gpt2-tiny"].dropout == 0.0
