"""Decoding through oneDNN-packed weights: same numbers as F.linear, never stale, never saved."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from fucina.inference.cpu_kernels import (
    DenseLinear,
    pack_linears,
    packable_dtypes,
    packed_decoding,
    packing_available,
)
from fucina.inference.generate import SamplingConfig, generate
from tiny_models import captured_calls, tiny_model

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN")


@torch.inference_mode()
def test_packed_product_equals_the_plain_one():
    layer = DenseLinear(48, 80, bias=True)
    x = torch.randn(3, 48)
    pack_linears(layer)
    assert layer.packed is not None
    with packed_decoding():
        packed = layer(x)
    torch.testing.assert_close(packed, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_a_changed_weight_is_repacked_before_the_next_generation():
    model = tiny_model(positions="rope", mlp="swiglu", tie_embeddings=False)
    sampling = SamplingConfig(max_new_tokens=8, greedy=True)
    generate(model, [[3, 14, 15]], sampling)  # packs every projection
    with torch.no_grad():  # what an optimizer step does: change the weights in place
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    fresh = tiny_model(positions="rope", mlp="swiglu", tie_embeddings=False)
    fresh.load_state_dict(model.state_dict())
    assert generate(model, [[3, 14, 15]], sampling) == generate(fresh, [[3, 14, 15]], sampling)


def test_outside_decoding_the_plain_weight_is_used():
    layer = DenseLinear(16, 8)
    pack_linears(layer)
    with torch.no_grad():
        layer.weight.zero_()  # not repacked: only packed_decoding() would read the old copy
    assert torch.equal(layer(torch.randn(2, 16)), layer.bias.expand(2, 8))


def test_packed_copies_are_not_pickled_or_deep_copied():
    model = tiny_model()
    pack_linears(model)
    assert model.lm_head.packed is not None
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.lm_head.packed is None
        torch.testing.assert_close(clone.lm_head.weight, model.lm_head.weight)
    assert set(model.state_dict()) == set(tiny_model().state_dict())


def test_a_replaced_weight_tensor_is_repacked_even_at_the_same_version():
    # model.to(...) round trips and new Parameters bring tensors whose version counter starts again at 0.
    layer = DenseLinear(24, 40, bias=False)
    pack_linears(layer)
    replacement = torch.randn(40, 24)
    while replacement._version < layer.weight._version:  # the same version as the packed weight had
        replacement.mul_(1.0)
    assert replacement._version == layer.weight._version
    layer.weight = torch.nn.Parameter(replacement)
    pack_linears(layer)
    x = torch.randn(2, 24)
    with torch.no_grad(), packed_decoding():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(torch.bfloat16 not in packable_dtypes(), reason="this CPU has no native bf16")
@torch.inference_mode()
def test_bf16_weights_are_packed_and_give_the_bf16_product():
    layer = DenseLinear(64, 96, bias=True).to(torch.bfloat16)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    pack_linears(layer)
    assert layer.packed is not None and layer.packed.dtype == torch.bfloat16
    with packed_decoding():
        packed = layer(x)
    assert packed.dtype == torch.bfloat16
    exact = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    plain = F.linear(x, layer.weight, layer.bias)
    # Both accumulate in float32 and round once to bf16: the same error, within a bf16 step.
    assert (packed.float() - exact).abs().max() <= 2 * (plain.float() - exact).abs().max() + 1e-2


def test_a_float32_layer_moved_to_bf16_is_not_multiplied_by_its_float32_copy():
    layer = DenseLinear(32, 16)
    pack_linears(layer)
    layer.to(torch.bfloat16)
    pack_linears(layer)  # repacked in bf16, or dropped where bf16 is not native
    x = torch.randn(1, 32, dtype=torch.bfloat16)
    with torch.no_grad(), packed_decoding():
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), atol=0.05, rtol=0.02)


@torch.inference_mode()
def test_compiled_decoding_sums_one_row_and_multiplies_more_rows_by_the_packed_weight():
    layer = DenseLinear(48, 80)
    pack_linears(layer)
    with packed_decoding():
        one_row = captured_calls(layer, torch.randn(1, 1, 48))
        two_rows = captured_calls(layer, torch.randn(2, 48))
    assert "sum" in one_row and not any("packed_linear" in call for call in one_row)
    assert any("packed_linear" in call for call in two_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_compiled_one_row_product_equals_the_exact_one(dtype):
    # Inductor's own loop over the weight (row_times_weight) accumulates in float32 like the libraries.
    layer = DenseLinear(48, 80, bias=dtype == torch.float32).to(dtype)
    x = torch.randn(1, 1, 48).to(dtype)
    with packed_decoding():
        out = torch.compile(layer, dynamic=False)(x)
    assert out.dtype == dtype and out.shape == (1, 1, 80)
    bias = None if layer.bias is None else layer.bias.float()
    exact = F.linear(x.float(), layer.weight.float(), bias)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: its final rounding only
    torch.testing.assert_close(out.float(), exact, atol=tolerance, rtol=tolerance)
