"""How evaluation drives a model: its context length, its device, inference mode and optional bf16.

Everything evaluation needs from a model is `model(input_ids) -> logits (B, T, V)` and
`model.config.context_length`, so any module with that call signature can be scored (the fucina
`Transformer`, or a small stand-in in tests). Scoring runs under `torch.inference_mode` with the model in
eval mode, optionally under bf16 autocast. `bf16=None` means "bf16 where the hardware has native bf16
matrix units" (CPUs with AVX512-BF16 or AMX, CUDA GPUs that support it), else fp32: on such a CPU a
PicoDAC-size forward runs 2-3x faster, and a trained PicoDAC's ITALIC log-probabilities move by 0.02
nats on average (of about -66) with no changed prediction in 300 questions. Without native bf16, autocast
emulates it and is slower than fp32, so it stays off. Log-softmax is always taken in fp32.
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


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matrix products in hardware (so bf16 autocast is a speed-up)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


def resolve_bf16(bf16: bool | None, device: torch.device) -> bool:
    """`bf16` itself when given; for None, whether the device has native bf16 (see the module doc)."""
    return native_bf16(device) if bf16 is None else bf16


@contextlib.contextmanager
def scoring_mode(model: nn.Module, bf16: bool | None = False) -> Iterator[torch.device]:
    """Eval mode + inference mode (+ bf16 autocast: True, False or None = auto) for the duration.

    Yields the model's device.
    """
    device = device_of(model)
    was_training = model.training
    model.eval()
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if resolve_bf16(bf16, device)
        else contextlib.nullcontext()
    )
    try:
        with torch.inference_mode(), autocast:
            yield device
    finally:
        model.train(was_training)


def picked_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of each row of `logits` (M, V) at `targets` (M,), as float64 (fp32 logsumexp)."""
    logits = logits.float()
    picked = logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    return picked.double()


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
    picked = picked_logprobs(logits[mask], targets)  # (M,)
    row_of = torch.arange(len(rows), device=device)[:, None].expand_as(mask)[mask]  # (M,)
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row_of, picked)
    return sums.tolist(), mask.sum(dim=1).tolist()
