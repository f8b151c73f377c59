"""Cached decoding must compute exactly what recomputing the whole sequence computes."""

from __future__ import annotations

import pytest
import torch

from fucina.inference.cpu_kernels import pack_linears, packed_decoding
from fucina.inference.generate import compiled_step
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
def test_fixed_shape_steps_match_full_recomputation(variant_model):
    # What compiled decoding runs: the slot is a tensor and attention reads every cache slot, masked.
    model = variant_model
    ids = _tokens(model, 16)
    full = model(ids)
    cache = model.new_cache(batch_size=2, max_length=24)  # 8 slots never filled: the mask must hide them
    pieces = [model(ids[:, :5], cache)]
    for t in range(5, 16):
        pieces.append(model(ids[:, t : t + 1], cache, slot=torch.tensor(cache.length)))
        cache.length += 1
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_fixed_shape_steps_of_left_padded_rows_match_each_row_alone(variant_model):
    model = variant_model
    short, long = _tokens(model, 6, seed=4, batch=1)[0], _tokens(model, 9, seed=5, batch=1)[0]
    batch = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), short]), long])
    cache = model.new_cache(batch_size=2, max_length=16, pad_lengths=[3, 0])
    model(batch, cache)
    nxt = torch.tensor([[5], [6]])
    step = model(nxt, cache, slot=torch.tensor(cache.length))
    for row, alone in enumerate([short, long]):
        expected = model(torch.cat([alone, nxt[row]]).unsqueeze(0))[0, -1]
        torch.testing.assert_close(step[row, -1], expected, atol=1e-5, rtol=0)


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
    step = compiled_step(model)
    pack_linears(model)
    with packed_decoding():
        for t in range(5, 14):
            pieces.append(step(ids[:, t : t + 1], cache, slot=torch.tensor(cache.length)))
            cache.length += 1
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)
