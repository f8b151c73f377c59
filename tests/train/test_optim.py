"""AdamW parameter groups: weight decay on matrices only, never on embeddings, norms or biases."""

from __future__ import annotations

import pytest
import torch

from fucina.model.transformer import Transformer
from fucina.presets import get_preset
from fucina.train.config import OptimSection
from fucina.train.optim import build_optimizer


@pytest.mark.parametrize("preset", ["gpt2-tiny", "picodac"])
def test_no_weight_decay_on_embeddings_norms_and_biases(preset):
    model = Transformer(get_preset(preset))
    _, groups = build_optimizer(model, OptimSection(weight_decay=0.1))
    no_decay = set(groups.no_decay)
    for name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{name}.{param_name}" if name else param_name
            is_embedding = isinstance(module, torch.nn.Embedding)
            is_norm = "norm" in type(module).__name__.lower()
            if full in no_decay or full in groups.decay:
                expected_no_decay = is_embedding or is_norm or param_name == "bias"
                assert (full in no_decay) == expected_no_decay, full
    assert groups.decay and no_decay
    # Every trainable tensor is in exactly one group (a tied head counts once).
    assert len(groups.decay) + len(no_decay) == len({id(p) for p in model.parameters()})


def test_decay_shrinks_only_the_matrices():
    torch.manual_seed(0)
    model = Transformer(get_preset("gpt2-tiny"))
    lr, decay = 0.1, 0.5
    optimizer, groups = build_optimizer(model, OptimSection(lr=lr, weight_decay=decay))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is then 0: only weight decay moves weights
    optimizer.step()
    after = dict(model.named_parameters())
    for name in groups.decay:
        assert torch.allclose(after[name], before[name] * (1 - lr * decay)), name
    for name in groups.no_decay:
        assert torch.equal(after[name], before[name]), name
