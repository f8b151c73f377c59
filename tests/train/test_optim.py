"""AdamW parameter groups: weight decay on matrices only, never on embeddings, norms or biases."""

from __future__ import annotations

import copy
import dataclasses
import io
import subprocess
import sys

import pytest
import torch

from fucina.errors import ConfigError
from fucina.model.transformer import Transformer
from fucina.presets import get_preset
from fucina.train.config import OptimSection
from fucina.train.optim import MIN_8BIT_SIZE, build_optimizer, optimizer_state_bytes


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


def _train_100_steps(name: str) -> tuple[Transformer, list[float], torch.optim.Optimizer]:
    torch.manual_seed(0)
    config = dataclasses.replace(get_preset("gpt2-tiny"), vocab_size=256, context_length=32)
    model = Transformer(config)
    optimizer, _ = build_optimizer(model, OptimSection(name=name, lr=1e-3))
    data = torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(100):
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), data[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return model, losses, optimizer


def test_adamw8bit_tracks_torch_adamw_over_100_steps_with_a_quarter_of_the_state():
    exact, exact_losses, exact_optimizer = _train_100_steps("adamw")
    quantised, quantised_losses, optimizer = _train_100_steps("adamw8bit")
    assert type(optimizer).__name__ == "AdamW8bit"
    # The loss falls from ~5.5 to ~0.3 on this memorisation task; 8-bit moments stay close all the way.
    assert exact_losses[-1] < 0.5
    assert max(abs(a - b) for a, b in zip(exact_losses, quantised_losses)) < 0.1
    for (name, a), (_, b) in zip(exact.named_parameters(), quantised.named_parameters()):
        assert float((a - b).detach().norm() / a.detach().norm()) < 0.15, name
    # Big tensors keep uint8 moments; tensors under MIN_8BIT_SIZE keep float32 ones.
    for param, state in optimizer.state.items():
        moment = state["state1"]
        assert moment.dtype == (torch.uint8 if param.numel() >= MIN_8BIT_SIZE else torch.float32)
    assert optimizer_state_bytes(optimizer) < 0.4 * optimizer_state_bytes(exact_optimizer)


def test_adamw8bit_state_round_trips_through_a_state_dict():
    model, _, optimizer = _train_100_steps("adamw8bit")
    clone = copy.deepcopy(model)
    restored, _ = build_optimizer(clone, OptimSection(name="adamw8bit", lr=1e-3))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for m, opt in ((model, optimizer), (clone, restored)):
        m(torch.arange(32).unsqueeze(0)).sum().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clone.parameters()))


def test_adamw8bit_without_bitsandbytes_or_torchao_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.optim", None)
    with pytest.raises(ConfigError, match="bitsandbytes >= 0.50 or torchao"):
        build_optimizer(Transformer(get_preset("gpt2-tiny")), OptimSection(name="adamw8bit"))


def test_adamw8bit_reaches_no_hub_and_logs_nothing_when_bitsandbytes_loads():
    # On CPUs with AVX512-BF16, a plain `import bitsandbytes` asks the `kernels` package for a 4-bit
    # matmul kernel from the Hugging Face Hub and logs a warning when that fails.
    script = (
        "import logging, sys; logging.basicConfig(level=logging.WARNING)\n"
        "from fucina.train.optim import _adamw8bit_class\n"
        "assert _adamw8bit_class().__module__.startswith('bitsandbytes')\n"
        "assert 'kernels' not in sys.modules, 'the kernels package was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "kernels-community" not in done.stderr and "WARNING" not in done.stderr, done.stderr
