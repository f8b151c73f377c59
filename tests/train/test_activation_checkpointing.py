"""Gradient checkpointing is a training option: same gradients, same saved keys, old configs still load."""

from __future__ import annotations

import json

import torch

from fucina.model.config import ModelConfig
from fucina.model.io import load_model, save_model
from fucina.train.activation_checkpointing import apply_activation_checkpointing
from tiny_models import tiny_config, tiny_model

MOE = dict(
    ffn="moe", moe_num_experts=4, moe_top_k=2, moe_d_ff=48, mlp="swiglu", norm="rmsnorm", positions="rope"
)


def _trained_copy(checkpointing: bool, **overrides) -> torch.nn.Module:
    model = tiny_model(**overrides).train()
    return apply_activation_checkpointing(model) if checkpointing else model


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = _trained_copy(checkpointing, positions="rope", n_kv_heads=2)
        model(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=1e-5)


def test_checkpointing_recomputes_each_block_in_backward():
    model = _trained_copy(True)
    calls = []
    model.blocks[0].mixer.register_forward_pre_hook(lambda *_: calls.append(1))
    model(torch.randint(0, 97, (1, 8))).sum().backward()
    assert len(calls) == 2  # the forward, then its recomputation during backward
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 8)))
    assert len(calls) == 3  # no recomputation without gradients


def test_balance_loss_trains_the_router_the_same_with_gradient_checkpointing():
    ids = torch.randint(0, 97, (2, 12))
    grads, counts = [], []
    for checkpointing in (False, True):
        model = _trained_copy(checkpointing, **MOE, moe_aux_loss_weight=0.5)
        (model(ids).logsumexp(-1).mean() + model.auxiliary_loss()).backward()
        grads.append(model.blocks[0].ffn.router.weight.grad)
        counts.append(model.blocks[0].ffn.routing_statistics())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    assert counts[1] == counts[0]


def test_checkpointing_keeps_parameter_names_and_saved_files(tmp_path):
    plain = tiny_model()
    checkpointed = apply_activation_checkpointing(tiny_model())
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in plain.named_parameters()]
    save_model(checkpointed, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in plain.state_dict().items())
    assert "gradient_checkpointing" not in (tmp_path / "model/config.json").read_text()


def test_applying_twice_checkpoints_once():
    model = apply_activation_checkpointing(apply_activation_checkpointing(tiny_model().train()))
    calls = []
    model.blocks[1].ffn.register_forward_pre_hook(lambda *_: calls.append(1))
    model(torch.randint(0, 97, (1, 8))).sum().backward()
    assert len(calls) == 2


def test_a_config_json_written_with_gradient_checkpointing_still_loads(tmp_path):
    data = {**tiny_config().to_dict(), "gradient_checkpointing": True}
    assert ModelConfig.from_dict(data) == tiny_config()
    save_model(tiny_model(), tmp_path / "model")
    path = tmp_path / "model/config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "gradient_checkpointing": True}))
    assert load_model(tmp_path / "model").config == tiny_config()
