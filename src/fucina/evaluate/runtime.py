"""How evaluation drives a model: its context length, its device, inference mode and optional bf16.

Everything evaluation needs from a model is `model(input_ids) -> logits (B, T, V)` and
`model.config.context_length`, so any module with that call signature can be scored (the fucina
`Transformer`, or a small stand-in in tests). Scoring runs under `torch.inference_mode` with the model in
eval mode; bf16 autocast is opt-in because on CPU it is often slower and it perturbs log-probabilities in
the third decimal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from fucina.errors import ConfigError


def context_length_of(model: nn.Module) -> int:
    """The longest input the model attends over (`model.config.context_length`)."""
    config = getattr(model, "config", None)
    length = getattr(config, "context_length", None)
    if not isinstance(length, int) or length < 1:
        raise ConfigError("the model has no config.context_length; evaluation needs it to cut windows")
    return length


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def scoring_mode(model: nn.Module, bf16: bool = False) -> Iterator[torch.device]:
    """Eval mode + inference mode (+ bf16 autocast if asked) for the duration; yields the device."""
    device = device_of(model)
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    try:
        with torch.inference_mode(), autocast:
            yield device
    finally:
        model.train(was_training)


def summed_target_logprobs(
    model: nn.Module,
    rows: Sequence[Sequence[int]],
    scored: Sequence[Sequence[bool]],
    pad_id: int,
    device: torch.device,
) -> tuple[list[float], list[int]]:
    """Score a batch of token rows in one forward, right-padded to the longest row.

    In row r, token t+1 is the target of position t; `scored[r]` (one flag per target, `len(row) - 1`)
    says which targets count. Returns each row's summed log-probability of its scored targets (nats, as
    float64) and how many targets it scored. Right padding is exact for a causal model: positions before
    the padding never attend to it.
    """
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for r, (row, flags) in enumerate(zip(rows, scored, strict=True)):
        if len(flags) != len(row) - 1:
            raise ValueError(f"row {r}: {len(row)} tokens need {len(row) - 1} target flags, got {len(flags)}")
        tokens[r, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[r, : len(flags)] = torch.as_tensor(flags, dtype=torch.bool)
    tokens = tokens.to(device)
    mask = mask.to(device)
    logits = model(tokens[:, :-1])  # (B, T, V)
    targets = tokens[:, 1:][mask]  # (M,) the scored targets of every row, row after row
    logprobs = torch.log_softmax(logits[mask].float(), dim=-1)  # (M, V)
    picked = logprobs.gather(1, targets[:, None]).squeeze(1).double()  # (M,)
    row_of = torch.arange(len(rows), device=device)[:, None].expand_as(mask)[mask]  # (M,)
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row_of, picked)
    return sums.tolist(), mask.sum(dim=1).tolist()
