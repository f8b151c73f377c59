"""Gradient (activation) checkpointing, a training option applied by the trainer to a built model.

Design choices:
- It is a property of how a run trains, not of the architecture, so it lives here and not in
  ModelConfig: a run's root config.json and its best/config.json describe the same model.
- Each block's activations are recomputed in the backward pass (`torch.utils.checkpoint` with
  `use_reentrant=False`, which supports keyword arguments, autocast and inputs without gradients)
  instead of being kept: less memory, more compute, the same gradients.
- The block is not wrapped in another module: its `forward` is replaced on the instance, so parameter
  names, `state_dict` keys and saved files stay exactly those of the plain model (a wrapper module would
  add a prefix to every key).
- Only a training forward with gradients enabled recomputes; evaluation and generation run the block
  plainly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _recomputed(block: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if block.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Make every block of `model` (its `blocks` list) recompute its activations in backward; returns it."""
    for block in model.blocks:
        if "forward" not in vars(block):  # applying twice must not nest checkpoints
            block.forward = _recomputed(block, block.forward)
    return model
