"""The Elleci hybrid: MLA + Mamba layers with BitNet projections; the full preset's size, the tiny one trains."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from fucina.cli.main import main
from fucina.model.bitnet import BitLinear
from fucina.model.config import ModelConfig
from fucina.model.mamba import Mamba
from fucina.model.mla import LatentAttention
from fucina.model.transformer import Transformer
from fucina.presets import ELLECI_PATTERN, get_preset
from fucina.resources import builtin_prose_files


def closed_form_parameters(c: ModelConfig) -> int:
    """Elleci's parameters written out from the architecture (no biases, RMSNorm, untied head)."""
    d, heads = c.d_model, c.n_heads
    nope, rope, value, kv = c.mla_nope_dim, c.mla_rope_dim, c.mla_value_dim, c.mla_kv_rank
    mla = d * heads * (nope + rope) + d * (kv + rope) + kv + kv * heads * (nope + value) + heads * value * d
    inner, n, rank, conv = c.mamba_inner, c.mamba_d_state, math.ceil(d / 16), c.mamba_d_conv
    mamba = d * 2 * inner + inner * (conv + 1) + inner * (rank + 2 * n) + (rank + 1) * inner + inner * (n + 1)
    mamba += inner * d
    swiglu = 3 * d * c.d_ff
    mixers = sum(mamba if c.mixer_name(i) == "mamba" else mla for i in range(c.n_layers))
    return 2 * c.vocab_size * d + mixers + c.n_layers * (swiglu + 2 * d) + d


def test_elleci_builds_on_the_meta_device_with_about_one_and_a_half_billion_parameters():
    config = get_preset("elleci")
    with torch.device("meta"):
        model = Transformer(config)
    total = sum(p.numel() for p in model.parameters())
    assert total == closed_form_parameters(config) == 1_495_308_288
    assert [config.mixer_name(i) for i in range(3)] == list(ELLECI_PATTERN)
    assert sum(isinstance(b.mixer, Mamba) for b in model.blocks) == 16
    assert sum(isinstance(b.mixer, LatentAttention) for b in model.blocks) == 8
    assert (config.d_model, config.n_layers, config.context_length, config.vocab_size) == (
        2048,
        24,
        1024,
        32128,
    )


def test_elleci_tiny_has_the_same_pattern_and_bitnet_projections():
    config = get_preset("elleci-tiny")
    assert [config.mixer_name(i) for i in range(config.n_layers)] == list(ELLECI_PATTERN) * 2
    model = Transformer(config)
    assert sum(p.numel() for p in model.parameters()) == closed_form_parameters(config)
    assert isinstance(model.blocks[0].mixer.in_proj, BitLinear) and isinstance(
        model.blocks[2].mixer.kv_a_proj, BitLinear
    )
    assert isinstance(model.blocks[1].ffn.gate_up_proj, BitLinear)


def test_hybrid_cached_generation_equals_the_full_forward():
    # Dense projections: with BitNet's 8-bit activations a last-bit matmul difference between batch
    # shapes can flip one rounding level (test_bitnet.py checks the BitNet path against itself).
    config = dataclasses.replace(get_preset("elleci-tiny"), linear="dense", context_length=32, vocab_size=64)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    ids = torch.randint(0, 64, (2, 16))
    cache = model.new_cache(2)
    with torch.inference_mode():
        stepped = torch.cat(
            [model(ids[:, :9], cache)] + [model(ids[:, t : t + 1], cache) for t in range(9, 16)], 1
        )
        torch.testing.assert_close(stepped, model(ids), atol=1e-5, rtol=0)


def test_elleci_tiny_trains_on_the_builtin_prose():
    text = "\n\n".join(path.read_text(encoding="utf-8") for path in builtin_prose_files())
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)  # byte ids, inside the vocabulary
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(get_preset("elleci-tiny"), context_length=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.stack([data[s : s + 33] for s in range(0, 8 * 9000, 9000)])
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print("elleci-tiny losses:", [round(x, 2) for x in losses])
    assert losses[-1] < losses[0] - 1.0


def test_model_info_elleci_shows_its_size_and_memory(capsys):
    assert main(["model", "info", "elleci"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 1,495,308,288" in out
    assert "mixers: mamba x 16, mla x 8; feed-forward: mlp; linear: bitnet" in out
    assert "recurrent state" in out and "run memory" in out and "ternary export" in out
