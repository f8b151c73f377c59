"""Learning-rate schedules as pure functions of the optimizer step.

Design choices:
- The learning rate is a function of the OPTIMIZER step alone (`LRSchedule.lr_at(step)`), set on the
  optimizer before every step. Micro-batches of gradient accumulation never advance it (Elleci's
  scheduler counted micro-steps against a total in optimizer steps, so its decay ran early). The only
  scheduler state is the step, which the checkpoint already holds, so a resumed run gets exactly the
  same rates (no LambdaLR state to keep in sync).
- Warmup is linear from lr/warmup to lr, given in steps (PicoDAC: 500) or as a ratio of the run
  (microDAC: 0.05, rounded to whole steps). Cosine then decays to `min_lr` at the last step.
- WSD (warmup-stable-decay, MiniCPM): warmup, then the peak rate held, then a decay over the last
  `decay_ratio` of the run to `min_lr` at the last step. The decay's shape is `linear`, `cosine`, `sqrt`
  (1 - sqrt(progress)) or `exp` (MiniCPM's exponential: the rate multiplies by a constant factor per
  step, from the peak to `min_lr`; with min_lr 0 it decays to peak/1000, then the last step is min_lr).
  `decay_start` is the first step of the decay, so weight averaging can start there by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fucina.train.config import ScheduleSection

# The exponential decay cannot reach 0; with min_lr 0 it aims at this fraction of the peak.
EXP_FLOOR_FRACTION = 1e-3


@dataclass(frozen=True)
class LRSchedule:
    """Warmup then cosine decay, constant, or warmup-stable-decay over `total_steps` optimizer steps."""

    name: str
    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    decay_steps: int = 0  # wsd only: length of the final decay phase
    decay_shape: str = "linear"

    @property
    def decay_start(self) -> int:
        """First optimizer step whose rate is below the peak because of the decay (wsd), or after warmup."""
        if self.name == "wsd":
            return self.total_steps - self.decay_steps + 1
        return self.warmup_steps + 1

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (1-based: the first update is step 1)."""
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        if self.name == "constant":
            return self.peak_lr
        if self.name == "wsd":
            return self._wsd(step)
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.peak_lr - self.min_lr) * cosine

    def _wsd(self, step: int) -> float:
        start = self.total_steps - self.decay_steps  # last step at the peak
        if self.decay_steps <= 0 or step <= start:
            return self.peak_lr
        progress = min(1.0, (step - start) / self.decay_steps)  # 1 at the last step
        if self.decay_shape == "exp":
            if progress >= 1.0:
                return self.min_lr
            floor = self.min_lr if self.min_lr > 0 else self.peak_lr * EXP_FLOOR_FRACTION
            return self.peak_lr * (floor / self.peak_lr) ** progress
        if self.decay_shape == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.decay_shape == "sqrt":
            factor = 1.0 - math.sqrt(progress)
        else:
            factor = 1.0 - progress
        return self.min_lr + (self.peak_lr - self.min_lr) * factor


def warmup_steps_for(section: ScheduleSection, total_steps: int) -> int:
    """Warmup length in steps: given directly, or `warmup_ratio * total_steps` rounded."""
    if section.warmup_steps is not None:
        return min(section.warmup_steps, total_steps)
    if section.warmup_ratio is not None:
        return round(section.warmup_ratio * total_steps)
    return 0


def build_schedule(section: ScheduleSection, peak_lr: float, total_steps: int) -> LRSchedule:
    """The schedule a config asks for, for a run of `total_steps` optimizer steps."""
    warmup = warmup_steps_for(section, total_steps)
    decay = 0
    if section.name == "wsd":
        decay = min(round(section.decay_ratio * total_steps), total_steps - warmup)
    return LRSchedule(
        name=section.name,
        peak_lr=peak_lr,
        min_lr=section.min_lr,
        warmup_steps=warmup,
        total_steps=total_steps,
        decay_steps=decay,
        decay_shape=section.decay_shape,
    )
