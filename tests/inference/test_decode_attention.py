"""The attention kernels decoding swaps in: one query per row, on CPU, equal to the plain math."""

from __future__ import annotations

import pytest
import torch

from fucina.inference.cpu_kernels import decode_attend
from fucina.model.attention import attention_reference
from tiny_models import captured_calls


def _qkv(heads=6, kv_heads=2, length=20, head_dim=16, batch=2, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=generator).to(dtype)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=generator).to(dtype)
    return q, k, v


@pytest.mark.parametrize("masked", [False, True])
def test_bf16_single_query_decoding_attends_in_float32_and_returns_bf16(masked):
    q, k, v = _qkv(heads=6, kv_heads=2, length=20, head_dim=16, dtype=torch.bfloat16)
    q = q[:, :, -1:]  # one new token per row
    mask = None
    if masked:  # e.g. a row whose first 5 slots are hidden
        mask = torch.ones(2, 1, 1, 20, dtype=torch.bool)
        mask[1, ..., :5] = False
    out = decode_attend(q, k, v, mask)
    assert out.dtype == torch.bfloat16
    reference = attention_reference(q.float(), k.float(), v.float(), mask)  # float32 math on bf16 inputs
    assert torch.allclose(out.float(), reference, atol=1e-2, rtol=1e-2)  # only bf16's final rounding apart


def _one_query_and_mask(masked: bool, dtype=torch.float32):
    q, k, v = _qkv(heads=6, kv_heads=2, length=20, head_dim=16, dtype=dtype)
    mask = None
    if masked:  # a row with its first 5 slots hidden, and unfilled cache slots (the last 3)
        mask = torch.ones(2, 1, 1, 20, dtype=torch.bool)
        mask[1, ..., :5] = False
        mask[..., 17:] = False
    return q[:, :, -1:], k, v, mask


@pytest.mark.parametrize("masked", [False, True])
@torch.inference_mode()
def test_compiled_one_query_attention_equals_reference(masked):
    q, k, v, mask = _one_query_and_mask(masked)
    assert "scaled_dot_product_attention" not in str(captured_calls(decode_attend, q, k, v, mask))
    out = torch.compile(decode_attend, dynamic=False)(q, k, v, mask)
    torch.testing.assert_close(out, attention_reference(q, k, v, mask), atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_compiled_one_query_attention_in_bf16_returns_bf16_close_to_reference():
    q, k, v, mask = _one_query_and_mask(True, torch.bfloat16)
    out = torch.compile(decode_attend, dynamic=False)(q, k, v, mask)
    assert out.dtype == torch.bfloat16
    reference = attention_reference(q.float(), k.float(), v.float(), mask)
    torch.testing.assert_close(out.float(), reference, atol=1e-2, rtol=1e-2)
