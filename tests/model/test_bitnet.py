"""BitNet b1.58: ternary weights, 8-bit activations, straight-through training (the packed 2-bit file:
tests/compress/test_ternary.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fucina.model.bitnet import BitLinear, quantize_activations, quantize_weight, ternary_codes, weight_scale
from fucina.model.transformer import Transformer
from fucina.resources import builtin_prose_files
from tiny_models import tiny_config, tiny_model

BITNET = dict(linear="bitnet", positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)


def test_quantized_weights_are_ternary_times_the_absmean():
    weight = torch.randn(16, 24) * 0.05
    codes = ternary_codes(weight)
    assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    scale = weight.abs().mean()
    torch.testing.assert_close(weight_scale(weight), scale)
    torch.testing.assert_close(quantize_weight(weight), codes * scale)
    torch.testing.assert_close(codes, (weight / scale).round().clamp(-1, 1))


def test_activations_take_at_most_256_levels_per_token_with_absmax_kept():
    x = torch.randn(3, 5, 40)
    q = quantize_activations(x)
    for token, quantized in zip(x.reshape(-1, 40), q.reshape(-1, 40)):
        step = token.abs().max() / 127
        levels = quantized / step
        torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
        assert levels.abs().max() <= 128
        torch.testing.assert_close(quantized.abs().max(), token.abs().max())


def test_bitlinear_forward_uses_the_quantized_values_and_gradients_pass_straight_through():
    torch.manual_seed(0)
    layer = BitLinear(24, 8, bias=False)
    x = torch.randn(4, 24, requires_grad=True)
    y = layer(x)
    normed = F.rms_norm(x.detach(), (24,), eps=1e-5)
    expected = F.linear(quantize_activations(normed), quantize_weight(layer.weight.detach()))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    # STE: d/dW of F.linear(x_q, W_q) taken as if W_q were W: upstream^T @ x_q.
    torch.testing.assert_close(
        layer.weight.grad, upstream.t() @ quantize_activations(normed), atol=1e-5, rtol=1e-5
    )
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bitnet_replaces_every_block_projection_and_keeps_the_dense_parameter_count():
    model = tiny_model(**BITNET, layer_mixers=["mla", "mamba"], layer_ffns=["moe", "mlp"])
    bitlinears = [name for name, m in model.named_modules() if isinstance(m, BitLinear)]
    assert "blocks.0.mixer.kv_b_proj" in bitlinears and "blocks.1.mixer.in_proj" in bitlinears
    assert "blocks.0.ffn.experts.3.down_proj" in bitlinears
    assert not isinstance(model.lm_head, BitLinear) and not isinstance(model.blocks[0].ffn.router, BitLinear)
    dense = tiny_model(**{**BITNET, "linear": "dense"})
    assert sum(p.numel() for p in tiny_model(**BITNET).parameters()) == sum(
        p.numel() for p in dense.parameters()
    )


def prose_bytes() -> torch.Tensor:
    text = "\n\n".join(path.read_text(encoding="utf-8") for path in builtin_prose_files())
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def test_training_a_bitnet_model_lowers_the_loss_on_the_builtin_prose():
    data = prose_bytes()
    torch.manual_seed(0)
    model = Transformer(
        tiny_config(**BITNET, vocab_size=256, context_length=32, d_model=48, n_heads=4, d_ff=96)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    held_out = torch.stack([data[s : s + 33] for s in range(0, 16 * 8000, 8000)])

    def held_out_loss() -> float:
        with torch.no_grad():
            logits = model.eval()(held_out[:, :-1])
            model.train()
            return float(F.cross_entropy(logits.flatten(0, 1), held_out[:, 1:].flatten()))

    before = held_out_loss()
    for _ in range(30):
        starts = torch.randint(0, len(data) - 33, (8,), generator=generator)
        batch = torch.stack([data[s : s + 33] for s in starts])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_loss()
    print(f"held-out loss {before:.3f} -> {after:.3f} nats/byte")
    assert after < before - 1.0
    assert set(ternary_codes(model.blocks[0].mixer.qkv_proj.weight).unique().tolist()) <= {-1.0, 0.0, 1.0}
