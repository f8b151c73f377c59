"""Cached decoding must compute exactly what recomputing the whole sequence computes."""

from __future__ import annotations

import pytest
import torch

from fucina.inference.cpu_kernels import decoding_view
from fucina.inference.engine import compiled_forward
from fucina.model.transformer import Transformer
from tiny_models import VARIANTS, tiny_model


def _tokens(model: Transformer, length: int, seed: int = 1, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)


@torch.inference_mode()
def test_cached_decoding_matches_full_recomputation(variant_model):
    model = variant_model
    ids = _tokens(model, 20)
    full = model(ids)  # (B, T, V)
    cache = model.new_cache(batch_size=2)
    pieces = [model(ids[:, :6], cache)]  # prefill
    pieces.append(model(ids[:, 6:9], cache))  # a chunk after a prefix: explicit causal mask
    pieces += [model(ids[:, t : t + 1], cache) for t in range(9, 20)]  # one token at a time
    cached = torch.cat(pieces, dim=1)
    assert cache.length == 20
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_left_padded_rows_compute_their_unpadded_logits(variant_model):
    model = variant_model
    short, long = _tokens(model, 7, seed=2, batch=1)[0], _tokens(model, 11, seed=3, batch=1)[0]
    batch = torch.stack([torch.cat([torch.zeros(4, dtype=torch.long), short]), long])
    cache = model.new_cache(batch_size=2, pad_lengths=[4, 0])
    prefill = model(batch, cache)
    nxt = torch.tensor([[5], [6]])
    step = model(nxt, cache)
    for row, alone in enumerate([short, long]):
        expected = model(torch.cat([alone, nxt[row]]).unsqueeze(0))[0]
        torch.testing.assert_close(prefill[row, -alone.numel() :], expected[:-1], atol=1e-5, rtol=0)
        torch.testing.assert_close(step[row, -1], expected[-1], atol=1e-5, rtol=0)


@torch.inference_mode()
def test_cache_refuses_tokens_beyond_its_length(variant_model):
    model = variant_model
    cache = model.new_cache(batch_size=1, max_length=4)
    model(torch.zeros((1, 4), dtype=torch.long), cache)
    with pytest.raises(ValueError, match="do not fit"):
        model(torch.zeros((1, 1), dtype=torch.long), cache)


def test_gqa_cache_stores_only_the_kv_heads():
    model = tiny_model(positions="rope", n_kv_heads=2)
    cache = model.new_cache(batch_size=3, max_length=10)
    assert cache.layers[0].keys.shape == (3, 2, 10, model.config.head_size)
    assert cache.layers[0].values.shape == (3, 2, 10, model.config.head_size)


@torch.inference_mode()
def test_per_row_steps_match_full_recomputation(variant_model):
    # What the engine and compiled decoding run: per-row lengths, attention over every slot, masked.
    model = variant_model
    ids = _tokens(model, 16)
    full = model(ids)
    cache = model.new_cache(batch_size=2, max_length=24)  # 8 slots never filled: the mask must hide them
    pieces = [model(ids[:, :5], cache)]
    cache.set_lengths(torch.tensor([5, 5]))
    for t in range(5, 16):
        pieces.append(model(ids[:, t : t + 1], cache))
    assert cache.lengths.tolist() == [16, 16]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_rows_of_different_lengths_step_as_each_row_alone(variant_model):
    # Each prompt prefilled alone and copied into its row (the engine's join), then one step together.
    model = variant_model
    short, long = _tokens(model, 6, seed=4, batch=1)[0], _tokens(model, 9, seed=5, batch=1)[0]
    cache = model.new_cache(batch_size=2, max_length=16)
    for row, alone in enumerate([short, long]):
        prefill = model.new_cache(batch_size=1, max_length=alone.numel())
        model(alone.unsqueeze(0), prefill)
        for layer, source in zip(cache.layers, prefill.layers):
            layer.copy_row(row, source, alone.numel())
    cache.set_lengths(torch.tensor([6, 9]))
    nxt = torch.tensor([[5], [6]])
    step = model(nxt, cache)
    for row, alone in enumerate([short, long]):
        expected = model(torch.cat([alone, nxt[row]]).unsqueeze(0))[0, -1]
        torch.testing.assert_close(step[row, -1], expected, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_a_free_row_keeps_its_length_while_the_others_grow():
    model = tiny_model(positions="rope")
    cache = model.new_cache(batch_size=2, max_length=8)
    cache.set_lengths(torch.tensor([3, 0]), in_use=torch.tensor([1, 0]))
    for _ in range(5):
        model(torch.zeros((2, 1), dtype=torch.long), cache)
    assert cache.lengths.tolist() == [8, 0]


ROPE_SWIGLU = dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)
COMPILED_CASES = {
    "mha-learned-gpt2": VARIANTS["mha-learned-gpt2"],
    "gqa-rope-llama": VARIANTS["gqa-rope-llama"],
    "sliding-window-rope": VARIANTS["sliding-window-rope"],
    "mla": dict(mixer="mla", **ROPE_SWIGLU),
    "moe": dict(ffn="moe", moe_num_experts=4, moe_top_k=2, moe_d_ff=48, **ROPE_SWIGLU),
}


@pytest.mark.parametrize(("case", "batch"), [*((case, 1) for case in COMPILED_CASES), ("gqa-rope-llama", 2)])
@torch.inference_mode()
def test_compiled_steps_match_full_recomputation(case, batch):
    # Compiled, one row's products and every row's attention are sums inductor writes itself.
    model = tiny_model(**COMPILED_CASES[case])
    ids = _tokens(model, 14, batch=batch)
    full = model(ids)
    cache = model.new_cache(batch_size=batch, max_length=24)
    pieces = [model(ids[:, :5], cache)]
    cache.set_lengths(torch.full((batch,), 5))
    step = compiled_forward(decoding_view(model), model)
    for t in range(5, 14):
        pieces.append(step(ids[:, t : t + 1], cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)
