"""Mamba: the chunked scan equals the step-by-step recurrence (values and gradients), and generation with
the fixed-size recurrent state equals the full-sequence forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fucina.inference.generate import SamplingConfig, generate
from fucina.model.info import cache_bytes_per_token, inference_memory, state_bytes
from fucina.model.mamba import Mamba, MambaState, _SelectiveScan, selective_scan, selective_scan_reference
from tiny_models import tiny_config, tiny_model

MAMBA = dict(mixer="mamba", positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, mamba_d_state=8)


def scan_inputs(batch=2, length=11, inner=6, state=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, inner, generator=g, dtype=dtype)
    delta = F.softplus(torch.randn(batch, length, inner, generator=g, dtype=dtype))  # some steps > 1
    A = -torch.exp(torch.randn(inner, state, generator=g, dtype=dtype))
    Bm = torch.randn(batch, length, state, generator=g, dtype=dtype)
    Cm = torch.randn(batch, length, state, generator=g, dtype=dtype)
    h0 = torch.randn(batch, inner, state, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (u, delta, A, Bm, Cm, h0)]


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_chunked_scan_equals_the_step_by_step_recurrence_values_and_gradients(chunk_size, parallel):
    inputs = scan_inputs()
    y, last = selective_scan(*inputs, chunk_size=chunk_size, parallel=parallel)
    y_ref, last_ref = selective_scan_reference(*inputs)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, last_ref, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(y)
    grads = torch.autograd.grad((y * weights).sum() + last.sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * weights).sum() + last_ref.sum(), inputs)
    for name, grad, grad_ref in zip(("u", "delta", "A", "B", "C", "h0"), grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, atol=1e-4, rtol=1e-4, msg=f"gradient of {name}")


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_scan_backward_passes_gradcheck_in_float64(parallel):
    inputs = scan_inputs(batch=1, length=7, inner=3, state=2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: _SelectiveScan.apply(*t, 4, parallel), inputs)


def test_a_model_with_the_parallel_scan_computes_what_the_sequential_one_does():
    ids = torch.randint(0, 97, (2, 21))
    sequential = tiny_model(**MAMBA, mamba_scan="sequential", mamba_chunk_size=8)
    parallel = tiny_model(**MAMBA, mamba_scan="parallel", mamba_chunk_size=8)
    torch.testing.assert_close(parallel(ids), sequential(ids), atol=1e-5, rtol=1e-5)
    cache = parallel.new_cache(batch_size=2)  # the recurrent state carries over between calls too
    with torch.inference_mode():
        stepped = torch.cat([parallel(ids[:, :13], cache), parallel(ids[:, 13:], cache)], 1)
        torch.testing.assert_close(stepped, sequential(ids), atol=1e-5, rtol=1e-5)


def test_scan_runs_in_float32_under_bf16_autocast():
    inputs = [t.detach() for t in scan_inputs()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = selective_scan(*(t.bfloat16() for t in inputs))
    assert y.dtype == torch.float32


def test_generation_with_the_recurrent_state_equals_the_full_forward():
    model = tiny_model(**MAMBA, layer_mixers=["mamba", "attention"])
    ids = torch.randint(0, 97, (2, 15))
    cache = model.new_cache(batch_size=2)
    with torch.inference_mode():
        pieces = [model(ids[:, :6], cache)] + [model(ids[:, t : t + 1], cache) for t in range(6, 15)]
        torch.testing.assert_close(torch.cat(pieces, 1), model(ids), atol=1e-5, rtol=0)
        cache.reset()  # a reset cache starts from the empty state again
        torch.testing.assert_close(model(ids[:, :4], cache), model(ids[:, :4]), atol=1e-5, rtol=0)


def test_batched_generation_of_different_lengths_equals_generating_each_alone():
    model = tiny_model(**MAMBA)
    prompts = [[3, 14, 15, 92, 65], [35], [89, 79, 32, 38, 46, 26, 43]]
    sampling = SamplingConfig(max_new_tokens=6, greedy=True)
    assert generate(model, prompts, sampling) == [generate(model, [p], sampling)[0] for p in prompts]


def test_the_state_has_a_fixed_size_whatever_the_length():
    config = tiny_config(**MAMBA)
    model = tiny_model(**MAMBA)
    short, long = model.new_cache(1, max_length=4), model.new_cache(1, max_length=48)
    for cache in (short, long):
        layer = cache.layers[0]
        assert isinstance(layer, MambaState)
        assert layer.conv.shape == (1, 64, 3) and layer.ssm.shape == (1, 64, 8)  # d_inner 2 x 32
    assert cache_bytes_per_token(config, 2) == [0, 0]
    assert state_bytes(config, 2) == [64 * 3 * 2 + 64 * 8 * 4] * 2  # conv window in bf16, SSM in fp32
    assert inference_memory(config, 2, batch_size=3).state == 3 * sum(state_bytes(config, 2))


def test_init_follows_mamba():
    layer = Mamba(tiny_config(**MAMBA), 0)
    torch.testing.assert_close(-torch.exp(layer.A_log[0]), -torch.arange(1.0, 9.0))  # S4D-real
    dt = F.softplus(layer.dt_proj.bias)
    assert dt.min() >= 1e-3 - 1e-6 and dt.max() <= 0.1 + 1e-6
    assert torch.all(layer.D == 1)
    params = sum(p.numel() for p in layer.parameters())
    d, inner, n, rank, conv = 32, 64, 8, 2, 4
    assert params == (
        d * 2 * inner  # in_proj
        + inner * conv
        + inner  # depthwise conv and its bias
        + inner * (rank + 2 * n)  # x_proj
        + rank * inner
        + inner  # dt_proj
        + inner * n
        + inner  # A_log, D
        + inner * d  # out_proj
    )
