"""Multi-head latent attention: shapes and parameters, a latent-only cache, cached decoding = full forward."""

from __future__ import annotations

import pytest
import torch

from fucina.cli.main import main
from fucina.inference.generate import SamplingConfig, generate
from fucina.model.info import attention_cache_comparison, cache_bytes_per_token, count_parameters
from fucina.model.mla import LatentAttention, LatentKV
from tiny_models import tiny_config, tiny_model

MLA = dict(mixer="mla", positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)
VARIANTS = {
    "full-rank-q": dict(mla_kv_lora_rank=12, mla_qk_rope_head_dim=4),
    "q-latent": dict(mla_q_lora_rank=16, mla_kv_lora_rank=12, mla_v_head_dim=6),
    "sliding-window-learned": dict(positions="learned", sliding_window=5),
    "mixed-with-attention": dict(layer_mixers=["attention", "mla"], n_kv_heads=2),
}


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def mla_model(request):
    return tiny_model(**{**MLA, **VARIANTS[request.param]})


def test_projection_shapes_and_parameter_count_follow_the_deepseek_layout():
    config = tiny_config(
        **MLA, mla_q_lora_rank=16, mla_kv_lora_rank=12, mla_qk_rope_head_dim=4, mla_v_head_dim=6
    )
    layer = LatentAttention(config, 0)
    heads, d, nope, rope, v, kv, q = 4, 32, 8, 4, 6, 12, 16
    expected = (
        d * q
        + q
        + q * heads * (nope + rope)  # q_a_proj, q_a_norm, q_b_proj
        + d * (kv + rope)
        + kv  # kv_a_proj, kv_a_norm
        + kv * heads * (nope + v)  # kv_b_proj
        + heads * v * d  # out_proj
    )
    assert sum(p.numel() for p in layer.parameters()) == expected
    x = torch.randn(2, 7, d)
    cache = layer.new_layer_cache(2, 10, x.device, x.dtype)
    assert isinstance(cache, LatentKV)
    assert cache.latents.shape == (2, 10, kv) and cache.rope_keys.shape == (2, 10, rope)


def test_the_cache_holds_the_latent_and_the_rotated_key_only():
    config = tiny_config(**MLA, mla_kv_lora_rank=12, mla_qk_rope_head_dim=4)
    assert cache_bytes_per_token(config, 2) == [(12 + 4) * 2] * 2
    model = tiny_model(**MLA, mla_kv_lora_rank=12, mla_qk_rope_head_dim=4)
    cache = model.new_cache(batch_size=1)
    stored = sum(layer.latents.numel() + layer.rope_keys.numel() for layer in cache.layers) * 4
    assert stored == sum(cache_bytes_per_token(config, 4)) * config.context_length
    mha = 2 * 4 * 8 * 2  # K and V of 4 heads of 8, bf16
    comparison = attention_cache_comparison(config, 2)
    assert comparison["MHA (4 kv heads)"] == mha == 4 * (12 + 4) * 2  # 4x MLA
    assert comparison["GQA (2 kv heads)"] == mha // 2 and comparison["MQA (1 kv head)"] == mha // 4


def test_cached_decoding_equals_the_full_forward(mla_model):
    ids = torch.randint(0, 97, (2, 14))
    cache = mla_model.new_cache(batch_size=2)
    with torch.inference_mode():
        pieces = [mla_model(ids[:, :5], cache)] + [mla_model(ids[:, t : t + 1], cache) for t in range(5, 14)]
        torch.testing.assert_close(torch.cat(pieces, 1), mla_model(ids), atol=1e-5, rtol=0)


def test_batched_generation_of_different_lengths_equals_generating_each_alone(mla_model):
    prompts = [[3, 14, 15, 92, 65], [35], [89, 79, 32, 38, 46, 26, 43]]
    sampling = SamplingConfig(max_new_tokens=6, greedy=True)
    assert generate(mla_model, prompts, sampling) == [generate(mla_model, [p], sampling)[0] for p in prompts]


def test_mla_layers_train():
    model = tiny_model(**MLA).train()
    ids = torch.randint(0, 97, (2, 9))
    model(ids).logsumexp(-1).mean().backward()
    for name in ("kv_a_proj", "kv_b_proj", "q_proj", "out_proj"):
        assert getattr(model.blocks[0].mixer, name).weight.grad.abs().sum() > 0, name


def test_model_info_compares_the_mla_cache_with_mha_and_gqa(capsys):
    assert main(["model", "info", "elleci"]) == 0
    out = capsys.readouterr().out
    # 16 heads of 128: MHA caches 2 x 16 x 128 values, MLA 512 + 64.
    assert "MLA caches 1.1 KiB per token and layer" in out
    assert "MHA (16 kv heads) would cache 8.0 KiB (7.1x)" in out and "GQA (4 kv heads)" in out
    assert count_parameters(tiny_config(**MLA)).attention > 0
