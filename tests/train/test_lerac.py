"""LeRaC: per-depth rates start at lr * c^-depth (floored), grow geometrically to the common rate by
`steps`, then every group follows the ordinary schedule; groups by depth, a tied head at depth 0."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fucina.errors import ConfigError
from fucina.model.transformer import Transformer
from fucina.presets import get_preset
from fucina.train.config import LeRaCSection, OptimSection, config_from_dict
from fucina.train.lerac import lerac_factor, parameter_depth
from fucina.train.loop import train
from fucina.train.optim import build_optimizer
from train_helpers import tiny_config

LERAC = LeRaCSection(enabled=True, c=10.0, steps=100, min_lr=1e-6)


def test_rates_start_lower_the_deeper_and_grow_geometrically_to_the_common_rate():
    peak = 1e-3
    assert lerac_factor(LERAC, peak, depth=0, step=0) == 1.0
    assert lerac_factor(LERAC, peak, depth=1, step=0) == pytest.approx(0.1)
    assert lerac_factor(LERAC, peak, depth=2, step=0) == pytest.approx(0.01)
    # Floor: 1e-3 * 10^-5 is below min_lr 1e-6, so depth 5 starts at min_lr.
    assert peak * lerac_factor(LERAC, peak, depth=5, step=0) == pytest.approx(1e-6)
    # Geometric growth: halfway, the factor is the square root of the starting one.
    assert lerac_factor(LERAC, peak, depth=2, step=50) == pytest.approx(0.1)
    assert lerac_factor(LERAC, peak, depth=1, step=25) == pytest.approx(0.1**0.75)
    for depth in range(6):
        assert lerac_factor(LERAC, peak, depth=depth, step=100) == 1.0
        assert lerac_factor(LERAC, peak, depth=depth, step=5000) == 1.0
    rates = [lerac_factor(LERAC, peak, 3, step) for step in range(101)]
    assert all(a < b for a, b in zip(rates, rates[1:]))


def test_disabled_lerac_leaves_every_rate_alone():
    assert lerac_factor(LeRaCSection(), 1e-3, depth=4, step=0) == 1.0


def test_depth_of_embeddings_blocks_and_head():
    assert parameter_depth("token_embedding.weight", 6) == 0
    assert parameter_depth("position_embedding.weight", 6) == 0
    assert parameter_depth("blocks.0.attn.qkv.weight", 6) == 1
    assert parameter_depth("blocks.5.mlp.up.weight", 6) == 6
    assert parameter_depth("final_norm.weight", 6) == 7
    assert parameter_depth("lm_head.weight", 6) == 7


@pytest.mark.parametrize("tied", [False, True])
def test_groups_split_by_depth_and_decay_and_a_tied_head_takes_the_embedding_rate(tied):
    model = Transformer(dataclasses.replace(get_preset("gpt2-tiny"), tie_embeddings=tied))
    optimizer, _ = build_optimizer(model, OptimSection(lerac=LERAC))
    depth_of = {id(p): group["depth"] for group in optimizer.param_groups for p in group["params"]}
    assert len(depth_of) == len({id(p) for p in model.parameters()})  # each tensor in exactly one group
    assert depth_of[id(model.token_embedding.weight)] == 0
    assert depth_of[id(model.lm_head.weight)] == (0 if tied else model.config.n_layers + 1)
    assert depth_of[id(next(model.blocks[1].parameters()))] == 2
    names = [group["name"] for group in optimizer.param_groups]
    assert len(names) == len(set(names))
    assert {g["weight_decay"] for g in optimizer.param_groups if g["name"].endswith("/no_decay")} == {0.0}


def test_the_loop_sets_and_logs_each_groups_rate_at_known_steps(tmp_path, tokenizer_dir):
    peak = 3.0e-3
    data = tiny_config(
        tokenizer_dir,
        optim={"lr": peak, "lerac": {"enabled": True, "c": 2.0, "steps": 4}},
        schedule={"name": "constant", "warmup_steps": 0},
        log={"every": 1, "plot": True},
    )
    train(config_from_dict(data), tmp_path / "run")
    assert (tmp_path / "run" / "plots" / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r for r in records if r["kind"] == "train"}
    # gpt2-tiny has 2 blocks: depths 0 (embeddings), 1, 2 (blocks), 3 (final norm, head).
    assert rates[1]["lr/depth0/no_decay"] == pytest.approx(peak)
    assert rates[1]["lr/depth1/decay"] == pytest.approx(peak * 0.5 ** (3 / 4))
    assert rates[2]["lr/depth2/decay"] == pytest.approx(peak * 0.25 ** (1 / 2))
    assert rates[1]["lr/depth3/decay"] == pytest.approx(peak * 0.125 ** (3 / 4))
    for step in (4, 8):
        group_rates = [value for key, value in rates[step].items() if key.startswith("lr/")]
        assert len(group_rates) == 7 and group_rates == pytest.approx([peak] * 7)


@pytest.mark.parametrize(
    ("lerac", "message"),
    [({"c": 0.5}, "optim.lerac.c"), ({"steps": 0}, "optim.lerac.steps"), ({"min_lr": 1.0}, "min_lr")],
)
def test_bad_lerac_settings_are_refused_by_name(lerac, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"train": {"max_steps": 10}, "optim": {"lerac": {"enabled": True, **lerac}}})
