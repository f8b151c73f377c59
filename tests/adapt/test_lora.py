"""LoRA layers and targets: fresh adapters change nothing, targets pick the right rows, refusals name why."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import randomize_adapters

from fucina.adapt.lora import LoRALinear, adapter_state_dict, apply_lora, lora_layers
from fucina.adapt.lora_config import LoRAConfig
from fucina.errors import ConfigError
from fucina.train.config import config_from_dict
from tiny_models import VARIANTS, tiny_model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fresh_adapters_leave_the_model_unchanged_and_freeze_the_base(variant):
    model = tiny_model(**VARIANTS[variant])
    ids = torch.randint(0, 97, (2, 12))
    before = model(ids)
    apply_lora(model, LoRAConfig(rank=4).validate())
    assert torch.equal(model(ids), before)  # B starts at zero
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model)) and trainable
    randomize_adapters(model)
    assert not torch.allclose(model(ids), before)


def test_a_query_adapter_changes_only_the_query_rows_of_the_fused_projection():
    model = tiny_model(**VARIANTS["gqa-rope-llama"])
    layer = model.blocks[0].mixer.qkv_proj
    x = torch.randn(5, 32)
    before = layer(x)
    apply_lora(model, LoRAConfig(rank=2, targets=["q"]).validate())
    randomize_adapters(model)
    wrapped = model.blocks[0].mixer.qkv_proj
    assert isinstance(wrapped, LoRALinear) and list(wrapped.lora) == ["q"]
    q_rows = model.config.n_heads * model.config.head_size
    after = wrapped(x)
    assert not torch.allclose(after[:, :q_rows], before[:, :q_rows])
    assert torch.equal(after[:, q_rows:], before[:, q_rows:])
    assert not isinstance(model.blocks[0].mixer.out_proj, LoRALinear)


def test_all_linear_reaches_moe_experts_and_mla_projections_but_not_the_router_or_head():
    model = tiny_model(
        positions="rope", norm="rmsnorm", mlp="swiglu", mixer="mla", ffn="moe", moe_num_experts=3, moe_top_k=2
    )
    apply_lora(model, LoRAConfig(rank=2).validate())
    names = set(lora_layers(model))
    for i in range(2):
        assert {f"blocks.{i}.mixer.{p}" for p in ("q_proj", "kv_a_proj", "kv_b_proj", "out_proj")} <= names
        for e in range(3):
            assert {
                f"blocks.{i}.ffn.experts.{e}.gate_up_proj",
                f"blocks.{i}.ffn.experts.{e}.down_proj",
            } <= names
        assert f"blocks.{i}.ffn.router" not in names
    assert "lm_head" not in names
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    randomize_adapters(model)
    model(ids).sum().backward()
    grads = {name: p.grad for name, p in adapter_state_dict(model).items()}
    assert all(g is not None for name, g in grads.items() if ".mixer." in name)
    assert any(g is not None and g.abs().sum() > 0 for name, g in grads.items() if ".experts." in name)


def test_bitnet_models_and_mamba_projections_are_refused_by_name():
    with pytest.raises(ConfigError, match="BitNet"):
        apply_lora(tiny_model(linear="bitnet"), LoRAConfig().validate())
    with pytest.raises(ConfigError, match="x_proj.*Mamba"):
        LoRAConfig(targets=["q", "x_proj"]).validate()
    hybrid = tiny_model(positions="rope", norm="rmsnorm", layer_mixers=["mamba", "attention"])
    apply_lora(hybrid, LoRAConfig(targets="all-linear").validate())
    assert not any(name.startswith("blocks.0.mixer") for name in lora_layers(hybrid))
    assert "blocks.1.mixer.qkv_proj" in lora_layers(hybrid)


def test_unknown_and_unmatched_targets_are_errors_naming_them():
    with pytest.raises(ConfigError, match="unknown target 'qq'"):
        LoRAConfig(targets=["qq"]).validate()
    with pytest.raises(ConfigError, match="gate match no projection"):
        apply_lora(tiny_model(mlp="gelu"), LoRAConfig(targets=["gate"]).validate())
    apply_lora(tiny_model(mlp="gelu"), LoRAConfig(targets="all-linear").validate())  # no gate: skipped
    with pytest.raises(ConfigError, match="lora.rank"):
        LoRAConfig(rank=0).validate()


def test_rslora_scales_by_the_square_root_of_the_rank():
    assert LoRAConfig(rank=16, alpha=8).scale == 0.5
    assert LoRAConfig(rank=16, alpha=8, rslora=True).scale == 2.0


def test_a_lora_section_needs_init_from():
    with pytest.raises(ConfigError, match="lora needs init_from"):
        config_from_dict({"train": {"max_steps": 1}, "lora": {"rank": 4}})
