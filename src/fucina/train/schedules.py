"""Learning-rate schedules as pure functions of the step.

Design choices:
- The learning rate is a function of the optimizer step alone (`LRSchedule.lr_at(step)`), set on the
  optimizer before every step. The only scheduler state is the step, which the checkpoint already holds,
  so a resumed run gets exactly the same rates (no LambdaLR state to keep in sync).
- Warmup is linear from lr/warmup to lr, given in steps (PicoDAC: 500) or as a ratio of the run
  (microDAC: 0.05, rounded to whole steps). Cosine then decays to `min_lr` at the last step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fucina.train.config import ScheduleSection


@dataclass(frozen=True)
class LRSchedule:
    """Warmup then cosine decay (or constant) over `total_steps` optimizer steps."""

    name: str
    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (1-based: the first update is step 1)."""
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        if self.name == "constant":
            return self.peak_lr
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.peak_lr - self.min_lr) * cosine


def warmup_steps_for(section: ScheduleSection, total_steps: int) -> int:
    """Warmup length in steps: given directly, or `warmup_ratio * total_steps` rounded."""
    if section.warmup_steps is not None:
        return min(section.warmup_steps, total_steps)
    if section.warmup_ratio is not None:
        return round(section.warmup_ratio * total_steps)
    return 0


def build_schedule(section: ScheduleSection, peak_lr: float, total_steps: int) -> LRSchedule:
    """The schedule a config asks for, for a run of `total_steps` optimizer steps."""
    return LRSchedule(
        name=section.name,
        peak_lr=peak_lr,
        min_lr=section.min_lr,
        warmup_steps=warmup_steps_for(section, total_steps),
        total_steps=total_steps,
    )
