"""The shapes of the depth-versus-width study and what one training token costs each of them.

Design choices, and why:
- The four configurations of the "LLM from scratch" study keep their ratios when scaled down: depth 12
  or 6, width W or W/2 with W = 768 / `scale` (REAL 12xW, DEMO 6xW, DEEP 12xW/2, BALANCED 6xW/2), in the
  GPT-2 layout of the `gpt2-*` presets (learned positions, LayerNorm, gelu_tanh, d_ff = 4 d, untied head).
- The fixed-parameter sweep holds the NON-EMBEDDING parameters of DEEP (12 layers x 12 d^2, Kaplan et al.)
  and gives each depth L the width that keeps them: d = W/2 * sqrt(12 / L), rounded to a multiple of 16.
  Embeddings are left out of "parameters" because they cost no compute per token and would make a wide
  model look bigger than it computes.
- Compute is counted as Kaplan's training FLOPs per token: 6 x (block matmul parameters + the LM head
  d x V) + 6 x n_layers x context x d (attention scores). Equal FLOPs, not equal wall time, is the budget:
  it is the same on every machine and does not favour shapes that happen to run fast on one.
- Heads are 64 wide as in GPT-2 when the width allows it, else 32 (16 below 64), so tiny scaled models
  still have several heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BASE_WIDTH = 768
DEEP_DEPTH, SHALLOW_DEPTH = 12, 6
SCALES = (1, 2, 3, 4, 6, 8, 12, 24)
DEFAULT_SWEEP_DEPTHS = (3, 6, 12, 24)
WIDTH_MULTIPLE = 16


@dataclass(frozen=True)
class Shape:
    """One model shape of the study."""

    n_layers: int
    d_model: int

    @property
    def name(self) -> str:
        return f"{self.n_layers}x{self.d_model}"

    @property
    def n_heads(self) -> int:
        head = 64 if self.d_model >= 256 else 32 if self.d_model >= 64 else 16
        return max(1, self.d_model // head) if self.d_model % head == 0 else _divisor_heads(self.d_model)

    def non_embedding_params(self) -> int:
        """Parameters of the blocks: attention 4 d^2 + MLP 8 d^2 (+ biases and norms)."""
        d = self.d_model
        attention = 4 * d * d + 4 * d  # q, k, v, out projections with biases
        mlp = 2 * 4 * d * d + 4 * d + d  # up and down projections with biases
        norms = 2 * 2 * d  # two LayerNorms (weight and bias)
        return self.n_layers * (attention + mlp + norms) + 2 * d  # + the final LayerNorm

    def total_params(self, vocab_size: int, context_length: int) -> int:
        """Non-embedding + token embedding + learned positions + untied LM head."""
        return self.non_embedding_params() + (2 * vocab_size + context_length) * self.d_model

    def flops_per_token(self, vocab_size: int, context_length: int) -> int:
        """Training FLOPs per token (forward + backward), Kaplan et al.'s count (see the module doc)."""
        d = self.d_model
        matmul = self.n_layers * 12 * d * d + d * vocab_size
        return 6 * matmul + 6 * self.n_layers * context_length * d

    def model_section(self, context_length: int) -> dict:
        """The `model` section of a fucina TrainConfig for this shape."""
        return {
            "preset": "gpt2-real",
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "d_ff": 4 * self.d_model,
            "context_length": context_length,
            "dropout": 0.0,
        }


def _divisor_heads(d_model: int) -> int:
    for head in (64, 48, 32, 24, 16, 8):
        if d_model % head == 0 and d_model // head >= 1:
            return d_model // head
    return 1


@dataclass(frozen=True)
class StudyRun:
    """A shape and the labels it answers to (DEEP is also the sweep's 12-layer point)."""

    shape: Shape
    labels: tuple[str, ...]


def four_configurations(scale: int) -> dict[str, Shape]:
    """REAL, DEMO, DEEP, BALANCED with width 768 / scale and depths 12 / 6."""
    if scale < 1 or BASE_WIDTH % scale:
        raise ValueError(f"scale must divide {BASE_WIDTH}, got {scale}")
    wide = BASE_WIDTH // scale
    narrow = wide // 2
    return {
        "REAL": Shape(DEEP_DEPTH, wide),
        "DEMO": Shape(SHALLOW_DEPTH, wide),
        "DEEP": Shape(DEEP_DEPTH, narrow),
        "BALANCED": Shape(SHALLOW_DEPTH, narrow),
    }


def sweep_width(depth: int, reference: Shape) -> int:
    """The width that gives `depth` layers about the non-embedding parameters of `reference`."""
    width = reference.d_model * math.sqrt(reference.n_layers / depth)
    return max(WIDTH_MULTIPLE, WIDTH_MULTIPLE * round(width / WIDTH_MULTIPLE))


def study_runs(scale: int, sweep_depths: tuple[int, ...] = DEFAULT_SWEEP_DEPTHS) -> list[StudyRun]:
    """Every distinct shape of the study with its labels: the four configurations, then the sweep."""
    configs = four_configurations(scale)
    labels: dict[Shape, list[str]] = {}
    for label, shape in configs.items():
        labels.setdefault(shape, []).append(label)
    for depth in sweep_depths:
        if depth < 1:
            raise ValueError(f"sweep depths must be >= 1, got {depth}")
        if depth == configs["DEEP"].n_layers:
            shape = configs["DEEP"]  # the sweep is anchored on DEEP: the same run, not a near twin
        else:
            shape = Shape(depth, sweep_width(depth, configs["DEEP"]))
        labels.setdefault(shape, []).append(f"SWEEP-{depth}")
    return [StudyRun(shape, tuple(names)) for shape, names in labels.items()]
