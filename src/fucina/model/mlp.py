"""The position-wise feed-forward network: up-projection, activation, down-projection.

`config.mlp` picks the activation:
- "gelu": exact GELU; "gelu_tanh": GPT-2's tanh approximation (HF "gelu_new"); "silu": non-gated SiLU
  (PicoDAC); these use `up_proj` (d_model -> d_ff).
- "swiglu": LLaMA's gated unit silu(gate) * up. The two input projections are fused into one
  `gate_up_proj` (d_model -> 2 * d_ff, rows ordered gate | up): one matmul instead of two.
`down_proj` (d_ff -> d_model) is a residual output projection, scaled at init.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fucina.model.linear import make_linear

if TYPE_CHECKING:
    from fucina.model.config import ModelConfig


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation used by GPT-2."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": gelu_tanh, "silu": F.silu}


class MLP(nn.Module):
    """Feed-forward network of one layer (registered as ffn "mlp")."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        hidden = config.ff_size
        if self.gated:
            self.gate_up_proj = make_linear(config, config.d_model, 2 * hidden)
        else:
            self.up_proj = make_linear(config, config.d_model, hidden)
            self.activation = ACTIVATIONS[config.mlp]
        self.down_proj = make_linear(config, hidden, config.d_model)
        self.down_proj.is_residual_output = True  # scaled at init (see transformer.py)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None  # None: no call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (B*T, d_model): torch's linear on 3-D inputs adds reshape kernels
        if self.gated:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B*T, d_ff) each
            hidden = F.silu(gate) * up
        else:
            hidden = self.activation(self.up_proj(x))  # (B*T, d_ff)
        y = self.down_proj(hidden).view(shape)  # (B, T, d_model)
        return y if self.dropout is None else self.dropout(y)

    @staticmethod
    def activation_elements_per_token(config: ModelConfig, layer_index: int) -> int:
        """Values kept for the backward pass per token: input, pre-activation(s), activation output."""
        hidden = config.ff_size
        return config.d_model + (4 * hidden if config.mlp == "swiglu" else 2 * hidden)
