"""Weight averaging (EMA or SWA) kept beside the trained weights.

Design choices:
- The average is a float32 copy of every trainable parameter, updated after an optimizer step; the
  model itself keeps training on its raw weights (averaging never feeds back into training). Buffers are
  not averaged: evaluation uses the model's own.
- EMA: avg <- decay * avg + (1 - decay) * w. SWA: the uniform mean of the weights at the steps folded in
  (every `every` steps from the start step on), kept as a running mean with its count.
- The start is a fraction of the run; for SWA it defaults to the schedule's decay phase (WSD's decay,
  or right after warmup for cosine), for EMA to the first step. The learning-rate schedule is never
  changed by averaging (Elleci's SWA replaced the cooldown with a constant rate; here the decay runs as
  configured and SWA averages along it).
- Before the start there is no average (`active` is False) and only the raw weights are evaluated.
- `state_dict` holds the average, its count and the start, so checkpoints resume it bit for bit.
- `swapped_in` temporarily copies the average into the model (for evaluation or publishing) and puts the
  raw weights back afterwards, so no second model is built.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fucina.train.config import AveragingSection


def averaging_start_step(section: AveragingSection, total_steps: int, decay_start: int) -> int:
    """The first optimizer step folded into the average."""
    if section.start is not None:
        return max(1, math.floor(section.start * total_steps) + 1)
    if section.kind == "swa":
        return max(1, min(decay_start, total_steps))
    return 1


class WeightAverage:
    """An EMA or SWA of a model's trainable parameters (see the module docstring)."""

    def __init__(self, model: nn.Module, section: AveragingSection, start_step: int):
        self.kind, self.decay, self.every = section.kind, section.ema_decay, section.every
        self.start_step = start_step
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.average: dict[str, torch.Tensor] = {}
        self.count = 0

    @property
    def active(self) -> bool:
        return self.count > 0

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the model's current weights in, if `step` is an averaging step."""
        if step < self.start_step or (step - self.start_step) % self.every:
            return
        if not self.average:
            self.average = {name: p.detach().float().clone() for name, p in self.params.items()}
        elif self.kind == "ema":
            for name, p in self.params.items():
                self.average[name].lerp_(p.detach().float(), 1.0 - self.decay)
        else:
            for name, p in self.params.items():
                self.average[name].add_(p.detach().float() - self.average[name], alpha=1.0 / (self.count + 1))
        self.count += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its raw weights again after it."""
        raw = {name: p.detach().clone() for name, p in self.params.items()}
        try:
            for name, p in self.params.items():
                p.copy_(self.average[name])
            yield
        finally:
            for name, p in self.params.items():
                p.copy_(raw[name])

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "count": self.count,
            "start_step": self.start_step,
            "average": self.average,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.average = {name: tensor.float().clone() for name, tensor in state["average"].items()}
