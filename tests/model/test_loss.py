"""The fused LM-head + cross-entropy equals the plain logits -> float32 cross-entropy, values and gradients."""

from __future__ import annotations

import pytest
import torch

from fucina.model.loss import IGNORE_INDEX, chunk_rows, cross_entropy_sum, linear_cross_entropy_sum
from fucina.model.transformer import Transformer
from fucina.presets import get_preset


def _problem(rows: int, vocab: int = 300, width: int = 24, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=generator)
    weight = torch.randn(vocab, width, generator=generator) * 0.5
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[::3] = IGNORE_INDEX  # ignored rows anywhere, including the first row of a chunk
    return hidden, weight, labels


def _loss_and_grads(loss_fn, hidden, weight, labels, scale: float = 1.0):
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    loss = loss_fn(hidden, weight, labels)
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def _plain(hidden, weight, labels):
    return cross_entropy_sum(hidden @ weight.t(), labels)


CHUNK = chunk_rows(300, torch.device("cpu"))  # rows per chunk for _problem's vocabulary


@pytest.mark.parametrize("rows", [1, CHUNK - 1, CHUNK, 3 * CHUNK + 5])
def test_fused_loss_and_gradients_equal_the_plain_cross_entropy_fp32(rows):
    hidden, weight, labels = _problem(rows)
    fused = _loss_and_grads(linear_cross_entropy_sum, hidden, weight, labels, scale=0.37)
    plain = _loss_and_grads(_plain, hidden, weight, labels, scale=0.37)
    assert fused[0].dtype == torch.float32
    for ours, reference in zip(fused, plain, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_ignored_rows_get_no_gradient_and_no_loss():
    hidden, weight, labels = _problem(40)
    labels[:] = IGNORE_INDEX
    labels[7] = 5
    loss, grad_hidden, _ = _loss_and_grads(linear_cross_entropy_sum, hidden, weight, labels)
    row = hidden[7:8] @ weight.t()
    assert torch.allclose(loss, torch.logsumexp(row, -1)[0] - row[0, 5], atol=1e-5)
    assert grad_hidden[7].abs().sum() > 0
    assert torch.count_nonzero(grad_hidden[torch.arange(40) != 7]) == 0


def test_fused_loss_under_bf16_autocast_matches_autocast_logits():
    """Under autocast the head runs in bf16 and the softmax in fp32, as the plain autocast path does."""
    hidden, weight, labels = _problem(70, vocab=1000, width=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _loss_and_grads(linear_cross_entropy_sum, hidden, weight, labels)
        plain = _loss_and_grads(_plain, hidden, weight, labels)
    assert fused[1].dtype == torch.float32 and fused[2].dtype == torch.float32  # grads in the params' dtype
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-3, atol=1e-3)
    for ours, reference in zip(fused[1:], plain[1:], strict=True):
        assert (ours - reference).norm() / reference.norm() < 0.02


def test_no_grad_evaluation_gives_the_same_loss():
    hidden, weight, labels = _problem(50)
    with torch.no_grad():
        assert torch.allclose(
            linear_cross_entropy_sum(hidden, weight, labels), _plain(hidden, weight, labels)
        )


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_model_forward_with_labels_returns_the_summed_loss_of_its_logits(preset):
    torch.manual_seed(0)
    model = Transformer(get_preset(preset))
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    labels = torch.roll(ids, -1, 1)
    labels[0, :6] = IGNORE_INDEX
    loss = model(ids, labels=labels)
    loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference = cross_entropy_sum(model(ids), labels)
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    for name, parameter in model.named_parameters():
        error = (fused_grads[name] - parameter.grad).norm() / parameter.grad.norm()
        assert error < 1e-5, name  # float32 rounding only (the sums are ordered differently)


def test_labels_of_another_shape_are_refused():
    model = Transformer(get_preset("gpt2-tiny"))
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    with pytest.raises(ValueError, match="must match input_ids"):
        model(ids, labels=ids[:, 1:])
    with pytest.raises(ValueError, match="must match input_ids"):
        model(ids, labels=ids, last_only=True)
