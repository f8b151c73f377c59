"""One transformer block: pre-norm, mixer, residual, pre-norm, feed-forward, residual.

The mixer and feed-forward classes come from the registries (registry.py) by the names the config
gives for this layer, so the block never changes when a new kind is added.
"""

from __future__ import annotations

import torch
from torch import nn

from fucina.model.config import ModelConfig
from fucina.model.context import ForwardContext
from fucina.model.norms import build_norm
from fucina.model.registry import FEED_FORWARDS, MIXERS


class Block(nn.Module):
    """x + mixer(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.mixer_norm = build_norm(config)
        self.mixer = MIXERS[config.mixer_name(layer_index)](config, layer_index)
        self.ffn_norm = build_norm(config)
        self.ffn = FEED_FORWARDS[config.ffn_name(layer_index)](config, layer_index)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), ctx)  # (B, T, d_model)
        return x + self.ffn(self.ffn_norm(x))
