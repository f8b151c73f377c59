"""Normalisation layers: LayerNorm (GPT-2) and RMSNorm (LLaMA), both applied pre-norm.

RMSNorm on float32 inputs (the residual stream, also under autocast) is written out in five kernels,
x * rsqrt(eps + |x|^2 / d) * weight, with eps held as a 0-d tensor: torch's F.rms_norm on CPU is a
composite of ~24 small ops (its `mean` and its opmath casts copy the input twice, and a Python-float eps
is wrapped into a tensor on every call), which made the norms a quarter of all ops of a batch-1 decoding
step. Half-precision inputs (a model cast to bf16) go through F.rms_norm, which accumulates in float32 as
Hugging Face's LlamaRMSNorm does. LayerNorm is torch's own fused kernel, with weight and bias (GPT-2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from fucina.model.config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension (eps a float or a 0-d tensor)."""
    if x.dtype != torch.float32:
        return F.rms_norm(x, (x.size(-1),), weight, float(eps))
    if not isinstance(eps, torch.Tensor):
        eps = x.new_tensor(eps)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (..., 1)
    return x * torch.rsqrt(torch.addcmul(eps, norm, norm, value=1.0 / x.size(-1))) * weight


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale and no bias (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("eps_tensor", torch.tensor(eps, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = x.dtype == torch.float32 and self.eps_tensor.dtype == torch.float32  # else F.rms_norm
        return rms_norm(x, self.weight, self.eps_tensor if fast else self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


def build_norm(config: ModelConfig) -> nn.Module:
    """The norm `config.norm` names, over d_model."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)
