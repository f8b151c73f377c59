"""The assembled model: weight tying, GPT-2 init, autocast, and the extension points."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from fucina.model.linear import LINEARS
from fucina.model.norms import RMSNorm
from fucina.model.registry import MIXERS, register_mixer
from fucina.model.transformer import Transformer, maybe_compile
from tiny_models import tiny_config, tiny_model


def test_the_model_is_plain_and_imports_nothing_from_inference():
    # Decoding kernels are swapped in by fucina.inference; the model must not reach up for them.
    code = (
        "import sys, fucina.model.transformer, fucina.model.registry;"
        "print(sorted(m for m in sys.modules if m.startswith('fucina.inference')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    model = tiny_model()
    assert type(model.lm_head) is nn.Linear and LINEARS["dense"] is nn.Linear


def test_tied_head_shares_the_embedding_matrix():
    tied, untied = tiny_model(tie_embeddings=True), tiny_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.token_embedding.weight
    assert untied.lm_head.weight is not untied.token_embedding.weight
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == 97 * 32


def test_gpt2_init_scales_residual_projections_by_depth():
    torch.manual_seed(0)
    model = Transformer(tiny_config(d_model=64, d_ff=256, n_layers=2, bias=True))
    residual_std = 0.02 / math.sqrt(2 * 2)
    block = model.blocks[0]
    assert block.mixer.out_proj.weight.std().item() == pytest.approx(residual_std, rel=0.1)
    assert block.ffn.down_proj.weight.std().item() == pytest.approx(residual_std, rel=0.1)
    assert block.mixer.qkv_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(block.mixer.qkv_proj.bias == 0) and torch.all(block.mixer_norm.weight == 1)


def test_bf16_autocast_on_cpu_computes_in_bf16_and_backpropagates():
    model = tiny_model(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2).train()
    ids = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    assert model.blocks[0].mixer.qkv_proj.weight.grad.dtype == torch.float32


def test_model_cast_to_bf16_runs_and_stays_close_to_fp32():
    model = tiny_model(positions="rope", n_kv_heads=2)
    ids = torch.randint(0, 97, (1, 20))
    with torch.inference_mode():
        reference = model(ids)
        low = model.to(torch.bfloat16)(ids)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, atol=0.05, rtol=0.05)


def test_longer_input_than_the_context_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="do not fit"):
        model(torch.zeros((1, 49), dtype=torch.long))


def test_auxiliary_loss_is_zero_without_parts_that_define_one():
    model = tiny_model()
    model(torch.zeros((1, 4), dtype=torch.long))
    assert model.auxiliary_loss().item() == 0.0


class _ScaledAttention(MIXERS["attention"]):
    """A registered variant: attention whose output is halved (stands in for a future mixer)."""

    def forward(self, x, ctx):
        return 0.5 * super().forward(x, ctx)


def test_a_registered_mixer_slots_into_chosen_layers():
    register_mixer("half-attention", _ScaledAttention)
    try:
        model = tiny_model(layer_mixers=["attention", "half-attention"])
        assert type(model.blocks[0].mixer).__name__ == "Attention"
        assert isinstance(model.blocks[1].mixer, _ScaledAttention)
        cache = model.new_cache(batch_size=1)
        ids = torch.randint(0, 97, (1, 6))
        with torch.inference_mode():
            torch.testing.assert_close(
                torch.cat([model(ids[:, :3], cache), model(ids[:, 3:], cache)], 1),
                model(ids),
                atol=1e-5,
                rtol=0,
            )
    finally:
        del MIXERS["half-attention"]


class _CountingLinear(nn.Linear):
    built = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _CountingLinear.built += 1


def test_linear_factory_builds_every_block_projection():
    LINEARS["counting"] = _CountingLinear
    try:
        _CountingLinear.built = 0
        model = tiny_model(linear="counting")
        assert _CountingLinear.built == 2 * 4  # qkv, out, up, down per layer
        assert isinstance(model.blocks[1].ffn.down_proj, _CountingLinear)
        assert not isinstance(model.lm_head, _CountingLinear)
    finally:
        del LINEARS["counting"]


def test_compile_switch_off_returns_the_model_itself():
    model = tiny_model()
    assert maybe_compile(model, enabled=False) is model


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised by torch's own modules on import
def test_compile_switch_on_wraps_the_same_model():
    model = tiny_model()
    compiled = maybe_compile(model, enabled=True)  # compilation itself happens lazily, at the first call
    assert compiled is not model and compiled._orig_mod is model
    assert compiled.state_dict().keys() == {f"_orig_mod.{k}" for k in model.state_dict()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_computes_the_llama_formula(dtype):
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm = norm.to(dtype)
    x = (torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(0)) * 3).to(dtype).requires_grad_()
    # Hugging Face's LlamaRMSNorm: variance in float32, normalise, cast back, scale
    hidden = x.detach().float()
    expected = norm.weight.detach() * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-5)).to(
        dtype
    )
    out = norm(x)
    assert out.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and norm.weight.grad is not None
