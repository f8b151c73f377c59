"""Context extension after training: `init_from` with a larger model.context_length. Learned position
tables grow by copying the trained rows, RoPE models take a scaling; every change that cannot be made is
one ConfigError line, never a size-mismatch traceback."""

from __future__ import annotations

import json

import pytest
import torch

from fucina.errors import ConfigError
from fucina.model.config import ModelConfig
from fucina.model.transformer import Transformer
from fucina.presets import get_preset
from fucina.train.config import config_from_dict
from fucina.train.context_extension import extend_learned_positions, model_with_overrides
from fucina.train.loop import train
from train_helpers import merge, tiny_config

OLD, NEW = 16, 64


def _model(**fields) -> Transformer:
    torch.manual_seed(0)
    base = dict(vocab_size=64, context_length=OLD, n_layers=2, d_model=32, n_heads=2, d_ff=64)
    return Transformer(ModelConfig(**{**base, **fields})).eval()


def test_copy_keeps_the_trained_rows_and_repeats_them():
    table = torch.randn(OLD, 8)
    extended = extend_learned_positions(table, NEW, "copy")
    assert extended.shape == (NEW, 8)
    assert torch.equal(extended[:OLD], table)
    assert torch.equal(extended[OLD : 2 * OLD], table) and torch.equal(extended[-1], table[-1])
    assert torch.equal(
        extend_learned_positions(table, 8), table[:8]
    )  # a smaller context keeps the first rows


def test_interpolation_resamples_the_trained_rows_over_the_new_length():
    table = torch.arange(OLD, dtype=torch.float32).unsqueeze(1).repeat(1, 3)  # row i holds i
    extended = extend_learned_positions(table, NEW, "interpolate")
    assert torch.equal(extended[0], table[0]) and torch.equal(extended[-1], table[-1])
    expected = torch.linspace(0, OLD - 1, NEW).unsqueeze(1).repeat(1, 3)
    torch.testing.assert_close(extended, expected)


def test_learned_positions_extend_and_compute_the_same_on_old_lengths():
    model = _model(positions="learned")
    extended = model_with_overrides(model, {"context_length": NEW}).eval()
    assert extended.config.context_length == NEW
    ids = torch.randint(0, 64, (2, OLD))
    with torch.no_grad():
        assert torch.equal(extended(ids), model(ids))
        assert extended(torch.randint(0, 64, (1, NEW))).shape == (1, NEW, 64)


@pytest.mark.parametrize("rope_type", ["linear", "ntk", "yarn"])
def test_rope_scaling_defaults_to_the_trained_context_and_the_length_ratio(rope_type):
    model = _model(positions="rope", norm="rmsnorm", mlp="swiglu")
    extended = model_with_overrides(model, {"context_length": NEW, "rope_scaling": {"rope_type": rope_type}})
    assert extended.config.rope_scaling == {
        "rope_type": rope_type,
        "original_context_length": OLD,
        "factor": NEW / OLD,
    }
    state, trained = extended.state_dict(), model.state_dict()
    assert all(torch.equal(state[k], trained[k]) for k in trained)  # only the tables change
    ids = torch.randint(0, 64, (1, NEW))
    with torch.no_grad():
        assert not torch.allclose(
            extended.eval()(ids), model_with_overrides(model, {"context_length": NEW})(ids)
        )


def test_elleci_hybrid_extends_its_mla_rotation():
    config = get_preset("elleci-tiny")
    model = Transformer(ModelConfig.from_dict({**config.to_dict(), "vocab_size": 64, "n_layers": 3})).eval()
    scaling = {"rope_type": "yarn", "factor": 4.0}
    extended = model_with_overrides(
        model, {"context_length": 4 * config.context_length, "rope_scaling": scaling}
    )
    assert extended.blocks[2].mixer.rotary.cos.shape[0] == 4 * config.context_length
    with torch.no_grad():
        assert torch.isfinite(extended.eval()(torch.randint(0, 64, (1, 300)))).all()


@pytest.mark.parametrize(
    ("model_fields", "overrides", "message"),
    [
        (
            {"positions": "learned"},
            {"context_length": NEW, "rope_scaling": {"rope_type": "yarn"}},
            "needs RoPE",
        ),
        (
            {"positions": "learned"},
            {"d_model": 48},
            "token_embedding.weight is (64, 32) there and would be (64, 48)",
        ),
        ({"positions": "rope"}, {"n_layers": 3}, "no trained weight for blocks.2"),
        ({"positions": "rope"}, {"preset": "llama-tiny"}, "model.preset cannot be combined with init_from"),
        (
            {"positions": "rope"},
            {"context_length": NEW, "rope_scaling": {"rope_type": "yarn", "factor": 0.5}},
            "factor: must be a number >= 1",
        ),
    ],
)
def test_changes_that_cannot_be_made_are_one_line_errors(model_fields, overrides, message):
    with pytest.raises(ConfigError) as err:
        model_with_overrides(_model(**model_fields), overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_init_from_with_a_larger_context_fine_tunes_at_the_new_length(tmp_path, pretrained_run):
    """The trained 32-token GPT-2 run continues at 64 tokens (it used to end in a size-mismatch traceback)."""
    config = tiny_config(None, init_from=str(pretrained_run), train={"max_steps": 2}, eval={"every": 2})
    del config["tokenizer"]
    config = merge(config, {"model": {"context_length": 64}})
    del config["model"]["preset"]
    result = train(config_from_dict(config), tmp_path / "long")
    assert result.steps == 2
    saved = json.loads((tmp_path / "long" / "final" / "config.json").read_text())
    assert saved["context_length"] == 64
    with pytest.raises(ConfigError, match="cannot be applied to the init_from model: blocks.0"):
        bad = merge(config, {"model": {"d_ff": 96}})
        train(config_from_dict(bad), tmp_path / "bad")
