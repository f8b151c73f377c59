"""BitNet b1.58: projections with ternary weights {-1, 0, +1} and 8-bit activations (`linear: "bitnet"`).

What and why (Ma et al., 2024, "The Era of 1-bit LLMs"; Wang et al., 2023, "BitNet"): every weight of
a projection is one of three values times one scale per matrix, so a matrix costs log2(3) ~ 1.58 bits
per weight instead of 16, and a matmul becomes additions. The model learns that from the start
(quantization-aware training), which is what keeps it close to a full-precision model of the same size.

Design choices (those of the paper's reference code, "Training Tips, Code and FAQ"):
- Weights: W_q = round_clip(W / s, -1, 1) * s with s = mean|W| over the whole matrix (absmean).
- Activations: per token, x_q = round_clip(x * 127 / max|x|, -128, 127) * max|x| / 127 (absmax, 8 bits).
- A parameter-free RMSNorm of the input comes first, inside the layer: the activations the quantizer
  sees then have a fixed scale whatever feeds the projection (BitNet's SubLN). Parameter-free, so a
  BitNet model has exactly the parameters of its dense twin; the blocks' own pre-norms still carry the
  learned per-channel scales.
- Training keeps full-precision latent weights and passes gradients straight through the rounding
  (STE: x + (q(x) - x).detach()): the forward sees the quantized values, the backward the identity.
  Without gradients the forward uses q(x) itself (x + (q(x) - x) differs from it by float rounding),
  so inference equals the packed ternary model exactly.
- Subclass of nn.Linear: the model's initialisation, weight decay groups and state_dict names treat it
  as any projection. Biases (when the config asks for them) stay in full precision.
- Embeddings, the LM head, norms, the MoE router and Mamba's step-size projection and convolution are
  not BitLinear (as in BitNet, only the block projections are ternary); see ternary_export.py for the
  packed 2-bit file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATION_LEVELS = 127.0  # int8: values -128..127, absmax maps to 127
NORM_EPS = 1e-5


def weight_scale(weight: torch.Tensor) -> torch.Tensor:
    """The absmean scale of a weight matrix, mean|W| (a 0-dim tensor, never 0)."""
    return weight.abs().mean().clamp(min=1e-8)


def ternary_codes(weight: torch.Tensor) -> torch.Tensor:
    """round_clip(W / mean|W|, -1, 1): the ternary values {-1, 0, +1} of a weight, in its dtype."""
    return (weight / weight_scale(weight)).round().clamp(-1, 1)


def quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """Ternary weight times its absmean scale (what the forward multiplies by)."""
    return ternary_codes(weight) * weight_scale(weight)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax 8-bit quantization of x (..., features), returned dequantized."""
    scale = ACTIVATION_LEVELS / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-ACTIVATION_LEVELS - 1, ACTIVATION_LEVELS) / scale


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Forward value `quantized`, gradient of the identity in x (the straight-through estimator)."""
    return x + (quantized - x).detach()


class BitLinear(nn.Linear):
    """nn.Linear with BitNet b1.58's ternary weights and 8-bit activations (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(x, (x.size(-1),), eps=NORM_EPS)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            x = straight_through(x, quantize_activations(x))
            weight = straight_through(self.weight, quantize_weight(self.weight))
        else:  # the quantized values themselves: bit-exact with the packed export (ternary_export.py)
            x, weight = quantize_activations(x), quantize_weight(self.weight)
        return F.linear(x, weight, self.bias)
