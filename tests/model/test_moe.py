"""Mixture of experts: routing math, capacity, the load-balancing loss, parameter accounting, caching."""

from __future__ import annotations

import pytest
import torch

from fucina.errors import ConfigError
from fucina.model.config import ModelConfig
from fucina.model.info import count_parameters
from fucina.model.moe import MixtureOfExperts, load_balancing_loss, routing_metrics, routing_stats
from fucina.model.transformer import Transformer
from fucina.presets import get_preset
from tiny_models import tiny_config, tiny_model

MOE = dict(
    ffn="moe", moe_num_experts=4, moe_top_k=2, moe_d_ff=48, mlp="swiglu", norm="rmsnorm", positions="rope"
)


def moe_layer(seed: int = 0, **overrides) -> MixtureOfExperts:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**{**MOE, **overrides}))
    return model.blocks[0].ffn


def test_balance_loss_is_one_for_uniform_routing_and_n_for_collapsed_routing():
    tokens, experts = 64, 8
    uniform_probs = torch.full((tokens, experts), 1.0 / experts)
    round_robin = torch.arange(tokens).remainder(experts).unsqueeze(1)
    assert load_balancing_loss(uniform_probs, round_robin).item() == pytest.approx(1.0)
    collapsed_probs = torch.zeros(tokens, experts)
    collapsed_probs[:, 0] = 1.0
    all_to_first = torch.zeros(tokens, 1, dtype=torch.long)
    assert load_balancing_loss(collapsed_probs, all_to_first).item() == pytest.approx(experts)
    skewed = torch.softmax(torch.randn(tokens, experts) * 3, dim=-1)
    assert load_balancing_loss(skewed, skewed.topk(2).indices).item() > 1.0


def reference_moe(layer: MixtureOfExperts, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax router, top-k, (renormalised for k > 1) weighted sum of expert outputs."""
    flat = x.reshape(-1, x.size(-1))
    out = torch.zeros_like(flat)
    for i, token in enumerate(flat):
        probs = torch.softmax(layer.router(token).float(), dim=-1)
        weights, chosen = probs.topk(layer.top_k)
        if layer.top_k > 1:
            weights = weights / weights.sum()
        for weight, expert in zip(weights, chosen):
            out[i] += weight * layer.experts[int(expert)](token.unsqueeze(0))[0]
    return out.view_as(x)


@pytest.mark.parametrize("top_k", [1, 2])
def test_output_is_the_gate_weighted_sum_of_the_chosen_experts(top_k):
    layer = moe_layer(moe_top_k=top_k)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_moe(layer, x), atol=1e-5, rtol=1e-5)


def test_shared_experts_see_every_token():
    layer = moe_layer(moe_shared_experts=1)
    x = torch.randn(1, 4, 32)
    with torch.no_grad():
        expected = reference_moe(layer, x) + layer.shared_experts[0](x)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_capacity_drops_the_assignments_beyond_it_in_token_order():
    layer = moe_layer(moe_top_k=1, moe_capacity_factor=1.0).train()
    with torch.no_grad():  # every token prefers expert 2
        layer.router.weight.zero_()
        layer.router.weight[2] = 1.0
    x = torch.rand(1, 8, 32) + 0.1  # positive inputs: expert 2's logit is the largest
    with torch.no_grad():
        out = layer(x)[0]
    capacity = layer.capacity(8)  # ceil(1.0 * 8 tokens * 1 / 4 experts) = 2
    assert capacity == 2
    assert out[:capacity].abs().sum(-1).min() > 0  # the first two tokens are served
    assert torch.all(out[capacity:] == 0)  # the rest keep only their residual
    stats = layer.routing_stats()
    assert stats.tokens_per_expert == [0, 0, 8, 0] and stats.dropped == 6
    with torch.no_grad():  # eval mode is dropless
        assert torch.all(layer.eval()(x)[0].abs().sum(-1) > 0)


def test_model_auxiliary_loss_is_the_weighted_sum_of_the_layers_balance_losses():
    model = tiny_model(**MOE, moe_aux_loss_weight=0.05).train()
    logits = model(torch.randint(0, 97, (2, 12)))
    balance = [block.ffn.balance_loss() for block in model.blocks]
    assert all(loss.item() >= 1.0 - 1e-6 for loss in balance)  # 1 is the minimum
    torch.testing.assert_close(model.auxiliary_loss(), 0.05 * sum(balance))
    (logits.sum() * 0 + model.auxiliary_loss()).backward()
    assert model.blocks[0].ffn.router.weight.grad.abs().sum() > 0  # the router learns to balance


def test_routing_stats_count_k_assignments_per_token_for_each_moe_layer():
    model = tiny_model(**MOE, layer_ffns=["mlp", "moe"])
    model(torch.randint(0, 97, (3, 7)))
    stats = routing_stats(model)
    assert list(stats) == [1]  # layer 0 is dense
    assert sum(stats[1].tokens_per_expert) == 3 * 7 * 2
    metrics = routing_metrics(model)
    assert metrics["moe/1/max_load"] >= 1.0 and metrics["moe/1/dropped"] == 0.0


def test_routing_statistics_show_balanced_and_collapsed_routing_per_layer():
    model = tiny_model(**{**MOE, "moe_top_k": 1}, layer_ffns=["moe", "mlp"])
    layer = model.blocks[0].ffn
    assert layer.routing_statistics() == [0, 0, 0, 0]  # before any forward
    collected = [
        m.routing_statistics() for m in model.modules() if callable(getattr(m, "routing_statistics", None))
    ]
    assert collected == [[0, 0, 0, 0]]  # the dense layer has none
    model(torch.randint(0, 97, (2, 16)))
    counts = layer.routing_statistics()
    assert isinstance(counts, list) and all(isinstance(n, int) for n in counts) and sum(counts) == 32
    balanced_loss = layer.balance_loss().item()
    with torch.no_grad():  # a router that sends every positive input to expert 3
        layer.router.weight.zero_()
        layer.router.weight[3] = 1.0
        layer(torch.rand(2, 16, 32) + 0.1)
    assert layer.routing_statistics() == [0, 0, 0, 32]
    assert layer.balance_loss().item() > 3.5 > balanced_loss  # collapse: near N = 4, balanced near 1


def test_active_parameters_count_only_the_top_k_experts():
    config = get_preset("mixtral-tiny")
    d, ff, vocab, experts, k = config.d_model, config.expert_ff_size, config.vocab_size, 8, 2
    attention = d * (d + 2 * 2 * 32) + d * d  # 8 query heads, 2 kv heads of 32
    expert = 3 * d * ff  # SwiGLU: gate, up, down
    norms = 2 * d
    per_layer_total = attention + d * experts + experts * expert + norms
    per_layer_active = attention + d * experts + k * expert + norms
    counts = count_parameters(config)
    assert counts.total == 2 * vocab * d + 4 * per_layer_total + d
    assert counts.active == 2 * vocab * d + 4 * per_layer_active + d
    print(f"mixtral-tiny: {counts.total:,} total, {counts.active:,} active")


def test_cached_generation_equals_the_full_forward_with_capacity_routing():
    model = tiny_model(**MOE, moe_capacity_factor=0.5, layer_ffns=["moe", "mlp"])
    ids = torch.randint(0, 97, (2, 10))
    cache = model.new_cache(batch_size=2)
    with torch.inference_mode():
        stepped = torch.cat(
            [model(ids[:, :6], cache)] + [model(ids[:, t : t + 1], cache) for t in range(6, 10)], 1
        )
        torch.testing.assert_close(stepped, model(ids), atol=1e-5, rtol=0)


def test_moe_config_values_are_checked_by_name():
    with pytest.raises(ConfigError, match=r"moe_top_k \(3\) exceeds model\.moe_num_experts \(2\)"):
        tiny_config(moe_num_experts=2, moe_top_k=3)
    with pytest.raises(ConfigError, match=r"moe_capacity_factor must be positive"):
        tiny_config(moe_capacity_factor=0.0)
    with pytest.raises(ConfigError, match=r"unknown key 'model\.moe_num_expert'.*moe_num_experts"):
        ModelConfig.from_dict({"moe_num_expert": 4})
