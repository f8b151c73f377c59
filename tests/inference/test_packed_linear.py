"""Decoding through oneDNN-packed weights: same numbers as F.linear, never stale, never in the model."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from fucina.inference.cpu_kernels import PackedLinear, decoding_view, packable_dtypes, packing_available
from fucina.inference.generate import SamplingConfig, generate
from tiny_models import captured_calls, tiny_model

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN")


def packed(linear: torch.nn.Linear) -> PackedLinear:
    """The decoding stand-in for `linear`, packed as a generation would pack it."""
    layer = PackedLinear(linear)
    layer.repack()
    return layer


@torch.inference_mode()
def test_packed_product_equals_the_plain_one():
    linear = torch.nn.Linear(48, 80, bias=True)
    layer = packed(linear)
    x = torch.randn(3, 48)
    assert layer.packed is not None
    torch.testing.assert_close(layer(x), F.linear(x, linear.weight, linear.bias), atol=1e-5, rtol=1e-5)


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


def test_the_model_keeps_plain_linears_and_the_view_shares_their_weights():
    model = tiny_model()
    view = decoding_view(model).module
    assert type(model.lm_head) is torch.nn.Linear and type(view.lm_head) is PackedLinear
    assert view.lm_head.linear is model.lm_head
    assert view.token_embedding is model.token_embedding  # nothing to swap: the model's own module
    assert {id(p) for p in view.parameters()} <= {id(p) for p in model.parameters()}
    assert set(model.state_dict()) == set(tiny_model().state_dict())
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # nothing extra to copy
        torch.testing.assert_close(clone.lm_head.weight, model.lm_head.weight)


def test_a_model_whose_modules_change_gets_a_new_view():
    model = tiny_model()
    first = decoding_view(model)
    assert decoding_view(model) is first
    model.blocks[0].ffn = copy.deepcopy(model.blocks[0].ffn)  # what wrapping a layer does
    assert decoding_view(model) is not first


def test_a_replaced_weight_tensor_is_repacked_even_at_the_same_version():
    # model.to(...) round trips and new Parameters bring tensors whose version counter starts again at 0.
    linear = torch.nn.Linear(24, 40, bias=False)
    layer = packed(linear)
    replacement = torch.randn(40, 24)
    while replacement._version < linear.weight._version:  # the same version as the packed weight had
        replacement.mul_(1.0)
    assert replacement._version == linear.weight._version
    linear.weight = torch.nn.Parameter(replacement)
    layer.repack()
    x = torch.randn(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, linear.weight), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(torch.bfloat16 not in packable_dtypes(), reason="this CPU has no native bf16")
@torch.inference_mode()
def test_bf16_weights_are_packed_and_give_the_bf16_product():
    linear = torch.nn.Linear(64, 96, bias=True).to(torch.bfloat16)
    layer = packed(linear)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    assert layer.packed is not None and layer.packed.dtype == torch.bfloat16
    out = layer(x)
    assert out.dtype == torch.bfloat16
    exact = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    plain = F.linear(x, linear.weight, linear.bias)
    # Both accumulate in float32 and round once to bf16: the same error, within a bf16 step.
    assert (out.float() - exact).abs().max() <= 2 * (plain.float() - exact).abs().max() + 1e-2


def test_a_float32_layer_moved_to_bf16_is_not_multiplied_by_its_float32_copy():
    linear = torch.nn.Linear(32, 16)
    layer = packed(linear)
    linear.to(torch.bfloat16)
    layer.repack()  # repacked in bf16, or dropped where bf16 is not native
    x = torch.randn(1, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(x, linear.weight, linear.bias), atol=0.05, rtol=0.02)


@torch.inference_mode()
def test_compiled_decoding_sums_one_row_and_multiplies_more_rows_by_the_packed_weight():
    layer = packed(torch.nn.Linear(48, 80))
    one_row = captured_calls(layer, torch.randn(1, 1, 48))
    two_rows = captured_calls(layer, torch.randn(2, 48))
    assert "sum" in one_row and not any("packed_linear" in call for call in one_row)
    assert any("packed_linear" in call for call in two_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_compiled_one_row_product_equals_the_exact_one(dtype):
    # Inductor's own loop over the weight (row_times_weight) accumulates in float32 like the libraries.
    linear = torch.nn.Linear(48, 80, bias=dtype == torch.float32).to(dtype)
    x = torch.randn(1, 1, 48).to(dtype)
    out = torch.compile(packed(linear), dynamic=False)(x)
    assert out.dtype == dtype and out.shape == (1, 1, 80)
    bias = None if linear.bias is None else linear.bias.float()
    exact = F.linear(x.float(), linear.weight.float(), bias)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: its final rounding only
    torch.testing.assert_close(out.float(), exact, atol=tolerance, rtol=tolerance)


@torch.inference_mode()
def test_compiled_one_row_product_reads_its_input_once_normalised():
    # Fused into the product, the normalisation (and the residual sums before it) would be recomputed
    # for each of the weight's rows: the loop over the rows must read a stored input, not a sqrt of it.
    from torch._inductor.utils import run_and_get_code

    from fucina.model.norms import RMSNorm

    norm, layer = RMSNorm(48), packed(torch.nn.Linear(48, 80, bias=False))
    step = torch.compile(lambda x, h: layer(norm(x + h)), dynamic=False)
    _, sources = run_and_get_code(step, torch.randn(1, 1, 48), torch.randn(1, 1, 48))
    code = "\n".join(sources)
    rows_loop = code.index("x0<static_cast<int64_t>(80L)")
    body = code[rows_loop : code.index("tmp_acc0)", rows_loop)]  # up to the row's stored sum
    assert "sqrt" in code and "sqrt" not in body
