"""Sequence-length curriculum: the training window grows during the run, tokens per step stay constant.

Design choices:
- `data.curriculum: [[0.0, 256], [0.35, 512], [0.7, 1024]]` gives, for fractions of the run, the window
  from that point on. The largest window is the run's context length (the model's, or
  `data.context_length`); every window divides it.
- The unit of the data order is the BLOCK: a window of the full context length, exactly the window a run
  without a curriculum reads. A step always consumes the same global number of blocks
  (`batch_size x grad_accum x world_size`), whatever the window; at window L each block is cut into
  `context / L` consecutive windows of L, so the rows of a micro-batch grow as the window shrinks
  (`batch_size` is the batch at the full window) and the tokens per optimizer step never change.
- Consequences: the packed data is the same shards (nothing is re-tokenized); the position in the data is
  the ordinary (epoch, block index), exact across a switch and a resume; and a switch neither skips nor
  repeats a window, since the block order does not depend on the window at all.
- The window at step s (1-based) is the entry whose fraction f is the largest with f x total_steps <
  s, i.e. the switch to a fraction f happens at step floor(f x total_steps) + 1. It is a pure function
  of the step, like the learning rate.
- Validation always uses the full window, so evaluations before and after a switch compare.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fucina.errors import ConfigError

if TYPE_CHECKING:
    from fucina.train.config import TrainConfig


@dataclass(frozen=True)
class Curriculum:
    """Windows by fraction of a run of `total_steps` optimizer steps; `block` is the full window."""

    points: tuple[tuple[float, int], ...]
    total_steps: int
    block: int

    def window_at(self, step: int) -> int:
        """The window length of optimizer step `step` (1-based)."""
        window = self.points[0][1]
        for fraction, length in self.points:
            if step > math.floor(fraction * self.total_steps):
                window = length
        return window

    def switch_steps(self) -> list[int]:
        """The first step of each entry after the first (where the window changes)."""
        return [math.floor(fraction * self.total_steps) + 1 for fraction, _ in self.points[1:]]


def check_curriculum(entries: Sequence[Sequence[float]], key: str = "data.curriculum") -> None:
    """Shape checks that do not need the context length: [fraction, window] pairs, fractions increasing."""
    previous = -1.0
    for index, entry in enumerate(entries):
        where = f"{key}[{index}]"
        if len(entry) != 2:
            raise ConfigError(f"{where}: expected [fraction of the run, window], got {list(entry)}")
        fraction, window = entry
        if not 0.0 <= fraction < 1.0:
            raise ConfigError(f"{where}: the fraction must be in [0, 1), got {fraction}")
        if window != int(window) or window < 1:
            raise ConfigError(f"{where}: the window must be a positive integer, got {window}")
        if fraction <= previous:
            raise ConfigError(f"{where}: fractions must increase, got {fraction} after {previous}")
        previous = fraction
    if entries and entries[0][0] != 0.0:
        raise ConfigError(f"{key}[0]: the first entry must start at fraction 0.0, got {entries[0][0]}")


def build_curriculum(
    entries: Sequence[Sequence[float]], context_length: int, total_steps: int, key: str = "data.curriculum"
) -> Curriculum:
    """The run's curriculum; every window must divide the run's context length (the block)."""
    check_curriculum(entries, key)
    points = tuple((float(f), int(w)) for f, w in entries)
    for index, (_, window) in enumerate(points):
        if window > context_length or context_length % window:
            raise ConfigError(
                f"{key}[{index}]: window {window} must divide the run's context length {context_length} "
                "(the largest window; set model.context_length or data.context_length)"
            )
    return Curriculum(points, total_steps, context_length)


def split_blocks(blocks: list[np.ndarray], window: int) -> dict[str, torch.Tensor]:
    """Blocks of block+1 tokens as a batch of windows of `window`: each block gives block/window rows,
    consecutive in the text (window j holds tokens [j*window, j*window + window + 1) of its block)."""
    rows = []
    for tokens in blocks:
        length = len(tokens) - 1
        rows.extend(tokens[start : start + window + 1] for start in range(0, length, window))
    windows = torch.from_numpy(np.stack(rows))  # (rows, window + 1)
    return {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}


def plan_data(batches, config: TrainConfig, total_steps: int) -> None:
    """Give the training batches the run's length and curriculum (and a mixture its phases).

    Only packed text has windows to grow and sources to mix; SFT and preference batches refuse both.
    """
    data = config.data
    plan = getattr(batches, "plan", None)
    if plan is None:
        if data.curriculum or data.mixture is not None:
            raise ConfigError(
                f"data.curriculum and data.mixture apply to packed text; stage {config.stage} reads examples"
            )
        return
    plan(total_steps, data.curriculum)
