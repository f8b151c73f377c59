"""Quantized and bf16 decoding: compiled steps compute what eager steps and full recomputation compute,
reading the int8 / int4 weights as they are stored (no float copy of a quantized matrix, ever)."""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from fucina.compress.quantize import quantize_model
from fucina.compress.quantized_layers import Int4Linear, Int8Linear
from fucina.inference.cpu_kernels import decoding_view
from fucina.inference.engine import compiled_forward
from fucina.inference.generate import SamplingConfig, generate
from tiny_models import VARIANTS, captured_calls, tiny_model

LLAMA = VARIANTS["gqa-rope-llama"]  # untied head: the head is quantized too (int8)


def quantized_model(bits: int):
    model = tiny_model(**LLAMA)
    quantize_model(model, bits, group_size=32 if bits == 4 else None)
    return model


def steps(model, step, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of `ids` (B, T): the first `prefill` tokens at once, then one token per `step` call."""
    batch, length = ids.shape
    cache = model.new_cache(batch_size=batch, max_length=length + 4)
    pieces = [model(ids[:, :prefill], cache)]
    cache.set_lengths(torch.full((batch,), prefill))  # per-row lengths, as compiled decoding runs
    for t in range(prefill, length):
        pieces.append(step(ids[:, t : t + 1], cache))
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("bits", [8, 4])
@torch.inference_mode()
def test_compiled_quantized_steps_equal_eager_steps_and_full_recomputation(bits, batch):
    model = quantized_model(bits)
    ids = torch.randint(0, model.config.vocab_size, (batch, 14), generator=torch.Generator().manual_seed(1))
    view = decoding_view(model)
    full = model(ids)
    eager = steps(model, view.module, ids, prefill=5)
    compiled = steps(model, compiled_forward(view, model), ids, prefill=5)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
    torch.testing.assert_close(compiled, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_quantized_generation_equals_eager_generation(bits):
    model = quantized_model(bits)
    prompts, sampling = [[3, 14, 15], [9, 2]], SamplingConfig(max_new_tokens=12, greedy=True)
    assert generate(model, prompts, sampling, compile=True) == generate(model, prompts, sampling)


@torch.inference_mode()
def test_int8_products_use_integer_kernels_for_one_row_and_several():
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.nn.Linear(200, 72))
    one_row = captured_calls(layer, torch.randn(1, 1, 200))
    rows = captured_calls(layer, torch.randn(8, 200))
    assert "aten._int_mm" not in str(one_row) and "as_strided" in str(one_row)  # inductor's own loop
    assert "_int_mm" in str(rows)  # 2-64 rows: oneDNN's int8 GEMM on the int8 weight
    assert not any(name.endswith(("linear", "matmul", "mm")) and "_int_mm" not in name for name in rows)


@torch.inference_mode()
def test_compiled_int8_row_is_one_loop_over_the_int8_weight_with_no_float_copy():
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.nn.Linear(200, 72))
    x = torch.randn(1, 200)
    out, code = run_and_get_code(torch.compile(layer, dynamic=False), x)
    source = "\n".join(code)
    assert "const int8_t*" in source  # the kernel reads the int8 weight itself
    assert "(72, 200)" not in _buffers(source)  # no float (or any) copy of the weight is allocated
    torch.testing.assert_close(out, layer(x), atol=1e-5, rtol=0)  # the same numbers as eager
    assert all(buffer.dtype != torch.float32 or buffer.dim() < 2 for buffer in layer.buffers())


def _buffers(source: str) -> str:
    """The shapes of the buffers the compiled code allocates (empty_strided calls), as text."""
    return "\n".join(line for line in source.splitlines() if "empty_strided" in line)


@pytest.mark.parametrize("rows", [1, 8])
def test_int4_products_call_the_packed_int4_kernel_compiled_as_eagerly(rows):
    torch.manual_seed(0)
    layer = Int4Linear.from_float(torch.nn.Linear(64, 48), group_size=32)
    calls = str(captured_calls(layer, torch.randn(rows, 64)))
    assert "_weight_int4pack_mm_for_cpu" in calls and "linear" not in calls


@torch.inference_mode()
def test_bf16_decoding_stays_close_to_fp32():
    model = tiny_model(**LLAMA)
    ids = torch.randint(0, model.config.vocab_size, (2, 14), generator=torch.Generator().manual_seed(2))
    reference = model(ids)
    model = model.to(torch.bfloat16)
    view = decoding_view(model)
    eager = steps(model, view.module, ids, prefill=5)
    compiled = steps(model, compiled_forward(view, model), ids, prefill=5)
    assert eager.dtype == compiled.dtype == torch.bfloat16
    spread = reference.std()
    for logits in (eager, compiled):
        assert (logits.float() - reference).abs().max() < 0.05 * spread * 10
        assert (logits.float() - reference).pow(2).mean().sqrt() < 0.02 * spread
