"""The fused attention path equals plain-math attention; masks mean what they say."""

from __future__ import annotations

import pytest
import torch

from fucina.model.attention import Attention, _explicit_is_faster, attend, attention_reference
from fucina.model.context import ForwardContext, build_attention_mask
from fucina.model.positions import RotaryEmbedding, apply_rotary, rope_tables, rotate_half
from tiny_models import tiny_model


def _qkv(heads=4, kv_heads=4, length=9, head_dim=8, batch=2, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=generator).to(dtype)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=generator).to(dtype)
    return q, k, v


def test_mask_follows_the_sliding_window_rule():
    mask = build_attention_mask(start=0, length=8, window=3)[0, 0]
    for i in range(8):
        for j in range(8):
            assert bool(mask[i, j]) == (i - 3 < j <= i), (i, j)


def test_mask_hides_left_padding_but_keeps_every_row_finite():
    mask = build_attention_mask(start=0, length=5, pad_lengths=torch.tensor([2, 0]))
    assert not mask[0, 0, 4, :2].any() and mask[0, 0, 4, 2:].all()  # real query ignores the pads
    assert mask[1, 0, 4].all()
    assert mask[0, 0, 0].sum() == 1  # a padding query attends only itself (no all -inf row)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_fused_causal_attention_equals_reference(kv_heads):
    q, k, v = _qkv(kv_heads=kv_heads)
    expected = attention_reference(q, k, v, build_attention_mask(0, 9))
    torch.testing.assert_close(attend(q, k, v, is_causal=True), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_fused_sliding_window_attention_equals_reference(kv_heads):
    q, k, v = _qkv(kv_heads=kv_heads)
    mask = build_attention_mask(0, 9, window=3)
    expected = attention_reference(q, k, v, mask)
    torch.testing.assert_close(attend(q, k, v, mask), expected, atol=1e-5, rtol=1e-5)
    causal = attention_reference(q, k, v, build_attention_mask(0, 9))
    assert not torch.allclose(expected[:, :, 3:], causal[:, :, 3:])  # the window did restrict


def test_fused_attention_in_bf16_on_cpu_stays_close_to_reference():
    q, k, v = _qkv(kv_heads=2, dtype=torch.bfloat16)
    out = attend(q, k, v, is_causal=True)
    assert out.dtype == torch.bfloat16
    expected = attention_reference(q.float(), k.float(), v.float(), build_attention_mask(0, 9))
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_attention_module_shapes_with_grouped_query_heads():
    model = tiny_model(n_kv_heads=2, positions="rope")
    attention = model.blocks[0].mixer
    assert isinstance(attention, Attention)
    head = model.config.head_size
    assert attention.qkv_proj.out_features == (4 + 2 * 2) * head
    x = torch.randn(3, 7, model.config.d_model)
    ctx = ForwardContext(
        start=0, length=7, positions=slice(0, 7), device=x.device, rope=model.rotary(slice(0, 7))
    )
    assert attention(x, ctx).shape == (3, 7, model.config.d_model)


@torch.inference_mode()
def test_tokens_outside_the_sliding_window_do_not_change_the_output():
    # Two layers of window 4: position i sees tokens down to i - 6; token 0 is out of reach of i >= 7.
    model = tiny_model(positions="rope", norm="rmsnorm", sliding_window=4)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 97
    before, after = model(ids), model(changed)
    torch.testing.assert_close(after[0, 7:], before[0, 7:], atol=0, rtol=0)
    assert not torch.allclose(after[0, :6], before[0, :6])  # within reach it does matter

    full = tiny_model(positions="rope", norm="rmsnorm")
    assert not torch.allclose(full(changed)[0, 7:], full(ids)[0, 7:])  # without a window it reaches


def test_rotary_equals_the_hf_rotate_half_formula():
    head_dim, length = 16, 12
    cos, sin = rope_tables(head_dim, length, base=10000.0)
    x = torch.randn(2, length, 3, head_dim)  # (B, T, heads, hd)
    expected = x * cos[:, None] + rotate_half(x) * sin[:, None]
    rotary = RotaryEmbedding(head_dim, length)
    torch.testing.assert_close(apply_rotary(x, *rotary(slice(0, length))), expected, atol=1e-6, rtol=1e-6)
    positions = torch.tensor([[3, 4, 5], [0, 1, 2]])  # per-row offsets (left-padded batches)
    per_row = apply_rotary(x[:, :3], *rotary(positions))
    shifted = x[0, :3] * cos[3:6, None] + rotate_half(x[0, :3]) * sin[3:6, None]
    torch.testing.assert_close(per_row[0], shifted, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(per_row[1], expected[1, :3], atol=1e-6, rtol=1e-6)


def test_rotary_preserves_norms_and_makes_scores_relative():
    rotary = RotaryEmbedding(8, 32)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i, j):
        qi = apply_rotary(q, *rotary(slice(i, i + 1)))
        kj = apply_rotary(k, *rotary(slice(j, j + 1)))
        return (qi * kj).sum()

    torch.testing.assert_close(apply_rotary(q, *rotary(slice(5, 6))).norm(), q.norm())
    torch.testing.assert_close(score(7, 3), score(20, 16), atol=1e-5, rtol=1e-5)  # depends on i - j only


@pytest.mark.parametrize("window", [None, 3], ids=["causal", "sliding-window"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_cpu_bf16_training_path_matches_the_fused_kernel_and_its_gradients(kv_heads, window):
    leaves = [t.requires_grad_() for t in _qkv(kv_heads=kv_heads, dtype=torch.bfloat16)]
    assert _explicit_is_faster(leaves[0], leaves[1])  # the path under test is the one training takes
    upstream = torch.randn(2, 4, 9, 8, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    mask = None if window is None else build_attention_mask(0, 9, window=window)
    outputs, grads = [], []
    for explicit in (True, False):
        q, k, v = leaves
        if explicit:  # requires_grad bf16 on CPU takes the written-out path
            out = attend(q, k, v, mask, is_causal=mask is None)
        else:
            k, v = k.repeat_interleave(4 // kv_heads, 1), v.repeat_interleave(4 // kv_heads, 1)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, is_causal=mask is None)
        outputs.append(out.float())
        grads.append([g.float() for g in torch.autograd.grad(out, leaves, upstream)])
    torch.testing.assert_close(outputs[0], outputs[1], atol=2e-2, rtol=2e-2)
    for explicit_grad, fused_grad in zip(*grads):
        torch.testing.assert_close(explicit_grad, fused_grad, atol=3e-2, rtol=3e-2)


def test_cpu_bf16_training_path_masks_left_padding_per_row():
    q, k, v = (t.requires_grad_() for t in _qkv(kv_heads=2, dtype=torch.bfloat16))
    mask = build_attention_mask(0, 9, pad_lengths=torch.tensor([3, 0]))
    expected = attention_reference(q.detach().float(), k.detach().float(), v.detach().float(), mask)
    torch.testing.assert_close(attend(q, k, v, mask).float(), expected, atol=2e-2, rtol=2e-2)
