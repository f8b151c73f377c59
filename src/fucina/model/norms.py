"""Normalisation layers: LayerNorm (GPT-2) and RMSNorm (LLaMA), both applied pre-norm.

RMSNorm uses torch.nn.functional.rms_norm (a fused kernel where available) and computes in the input
dtype: under autocast the surrounding matmuls decide precision, we add no casts of our own.
LayerNorm is torch's own, with weight and bias (GPT-2 layout).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from fucina.model.config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension."""
    return F.rms_norm(x, (x.size(-1),), weight, eps)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale and no bias (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


def build_norm(config: ModelConfig) -> nn.Module:
    """The norm `config.norm` names, over d_model."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)
