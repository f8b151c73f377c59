"""RoPE scaling for a longer context than the model was trained on: PI, NTK-aware and YaRN.

`model.rope_scaling` is a small mapping stored in config.json:
`{rope_type: linear | ntk | yarn, factor: F, original_context_length: L}` (+ `beta_fast`, `beta_slow`,
`attention_factor` for yarn).

Design choices:
- linear (position interpolation, Chen et al. 2023): every frequency divided by F, so positions up to
  F x L fall in the trained range of angles. Transformers' `rope_type: linear`.
- ntk (NTK-aware, bloc97): the base raised to base x F^(d / (d - 2)), so the highest frequencies are
  almost untouched and the lowest are interpolated by F. This is the STATIC form: the tables do not
  depend on the length of the input, so a KV cache stays consistent. Transformers' `dynamic` type is
  the length-dependent variant (a different base for every input length) and is not what this is;
  the export writes the equivalent plain RoPE with the raised base (`rope_theta`), which every peer
  computes identically (llama.cpp: `rope.freq_base`).
- yarn (Peng et al. 2023): per-frequency blend of interpolation and extrapolation by a linear ramp
  between the dimensions that make `beta_fast` and `beta_slow` rotations over L, and cos/sin scaled
  by `attention_factor` (default 0.1 ln F + 1). The formulas follow transformers 5's
  `_compute_yarn_parameters` (ramp bounds truncated to integers), so the HF export computes the same.
- Only the frequency table changes: no weight is added, so a scaled model loads the unscaled weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fucina.errors import ConfigError

ROPE_SCALING_TYPES = ("linear", "ntk", "yarn")
_KEYS = ("rope_type", "factor", "original_context_length", "beta_fast", "beta_slow", "attention_factor")


@dataclass(frozen=True)
class RopeScaling:
    """A validated `model.rope_scaling` mapping."""

    rope_type: str
    factor: float
    original_context_length: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None

    @property
    def default_attention_factor(self) -> float:
        """YaRN paper's cos/sin multiplier for this factor: 0.1 ln(factor) + 1 (1 for factor <= 1)."""
        return 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0

    @property
    def yarn_attention_factor(self) -> float:
        """YaRN's cos/sin multiplier: the one given, or the paper's default."""
        return self.default_attention_factor if self.attention_factor is None else self.attention_factor


def parse_rope_scaling(data: Mapping[str, Any] | None, key: str = "model.rope_scaling") -> RopeScaling | None:
    """The scaling a config asks for (None: plain RoPE); ConfigError names the bad key."""
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{key}: expected a mapping like {{rope_type: yarn, factor: 4}}, got {data!r}")
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{key}: unknown key {unknown[0]!r} (known: {', '.join(_KEYS)})")
    rope_type = data.get("rope_type")
    if rope_type not in ROPE_SCALING_TYPES:
        raise ConfigError(f"{key}.rope_type: {rope_type!r} is not one of {', '.join(ROPE_SCALING_TYPES)}")
    factor = data.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, int | float) or factor < 1:
        raise ConfigError(f"{key}.factor: must be a number >= 1, got {factor!r}")
    original = data.get("original_context_length")
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise ConfigError(f"{key}.original_context_length: must be a positive integer, got {original!r}")
    for name in ("beta_fast", "beta_slow", "attention_factor"):
        value = data.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
        ):
            raise ConfigError(f"{key}.{name}: must be a positive number, got {value!r}")
    return RopeScaling(
        rope_type=rope_type,
        factor=float(factor),
        original_context_length=original,
        beta_fast=float(data.get("beta_fast") or 32.0),
        beta_slow=float(data.get("beta_slow") or 1.0),
        attention_factor=None if data.get("attention_factor") is None else float(data["attention_factor"]),
    )


def ntk_base(base: float, factor: float, dim: int) -> float:
    """The raised base of NTK-aware scaling for a rotated size `dim`."""
    return base * factor ** (dim / (dim - 2))


def _yarn_frequencies(dim: int, base: float, scaling: RopeScaling) -> torch.Tensor:
    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over L
        return (
            dim * math.log(scaling.original_context_length / (rotations * 2 * math.pi)) / (2 * math.log(base))
        )

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # (d/2,)
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    pos_freqs = base**exponents
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (scaling.factor * pos_freqs)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate (low frequencies)
    return interpolation * (1 - keep) + extrapolation * keep


def rope_frequencies(dim: int, base: float, scaling: RopeScaling | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) float32 and the cos/sin multiplier for rotated size `dim`."""
    if scaling is not None and scaling.rope_type == "yarn":
        return _yarn_frequencies(dim, base, scaling), scaling.yarn_attention_factor
    if scaling is not None and scaling.rope_type == "ntk":
        base = ntk_base(base, scaling.factor, dim)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # (dim/2,)
    if scaling is not None and scaling.rope_type == "linear":
        inv_freq = inv_freq / scaling.factor
    return inv_freq, 1.0
