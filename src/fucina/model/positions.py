"""Position information: learned absolute embeddings (GPT-2) or rotary embeddings (RoPE, LLaMA).

Design choices:
- Learned positions are an nn.Embedding of context_length rows added to the token embeddings.
- RoPE follows the Hugging Face LLaMA convention ("rotate_half"): the head dimension is split into two
  halves [x1, x2] and rotated as (x1 cos - x2 sin, x2 cos + x1 sin), with frequency i shared by columns i
  and i + head_dim/2. LLaMA weights therefore import without permuting q/k rows.
- The cos/sin tables are computed once in float32 and kept as non-persistent buffers (never saved,
  rebuilt on load). `model.to(bfloat16)` casts the finished tables, which equals HF's cast of cos/sin
  to the activation dtype; `apply_rotary` casts them too, so bf16 autocast stays bf16.
- RoPE scaling for a longer context (position interpolation, NTK-aware, YaRN) only changes the tables:
  rope_scaling.py computes the frequencies and the cos/sin multiplier from `model.rope_scaling`.
- Positions are given either as a slice (every row at the same offsets: training, unpadded decoding;
  a cheap view of the table) or as a (B, T) LongTensor (left-padded batches: one offset per row).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fucina.model.rope_scaling import parse_rope_scaling, rope_frequencies

Positions = slice | torch.Tensor  # slice(start, end) shared by all rows, or (B, T) position ids


def rope_tables(
    head_dim: int, length: int, base: float, scaling: Mapping[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (length, head_dim), in the HF rotate_half layout; `scaling` is a
    `model.rope_scaling` mapping (rope_scaling.py) or None."""
    inv_freq, multiplier = rope_frequencies(head_dim, base, parse_rope_scaling(scaling))  # (hd/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (length, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (length, hd)
    if multiplier == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * multiplier, angles.sin() * multiplier


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, heads, hd) by the tables of RotaryEmbedding, (T, 1, hd) or (B, T, 1, hd).

    Computes x * cos + rotate_half(x) * sin as x * cos + roll(x, hd/2) * [-sin, sin]: the same numbers
    in three kernels instead of five (no chunk/neg/cat), which matters when decoding token by token.
    """
    cos = cos.to(x.dtype)
    signed_sin = signed_sin.to(x.dtype)
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), signed_sin)


class RotaryEmbedding(nn.Module):
    """Holds the RoPE tables for positions 0..length-1 and looks them up for a forward pass."""

    def __init__(
        self, head_dim: int, length: int, base: float = 10000.0, scaling: Mapping[str, Any] | None = None
    ):
        super().__init__()
        cos, sin = rope_tables(head_dim, length, base, scaling)
        half = head_dim // 2
        signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # rotate_half's signs folded in
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("signed_sin", signed_sin, persistent=False)

    def forward(
        self, positions: Positions, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed_sin) in `dtype`, broadcastable against (B, T, heads, hd) (the projection's layout)."""
        cos = self.cos[positions].unsqueeze(-2)  # (T, 1, hd) or (B, T, 1, hd)
        signed_sin = self.signed_sin[positions].unsqueeze(-2)
        return (cos, signed_sin) if dtype is None else (cos.to(dtype), signed_sin.to(dtype))
