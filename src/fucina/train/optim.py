"""AdamW with two parameter groups: decayed matrices, undecayed everything else.

Design choices:
- Weight decay shrinks weights toward zero. That is a useful prior for the matrices of attention and
  MLP layers, but it hurts embeddings (rare tokens get pulled to zero between their few updates),
  norm gains (which should stay near 1) and biases. So only parameters with 2+ dimensions that are not
  embeddings are decayed; everything else goes into a group with weight_decay=0 (as PicoDAC does).
- Embeddings are recognised by module type (`nn.Embedding`), not by name, so a renamed layer cannot
  slip into the decayed group. A weight tied between the embedding and the output head is one
  parameter and is counted once, in the embedding (undecayed) group.
- `fused`/`foreach` are left to torch's defaults: both are deterministic for a fixed device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fucina.train.config import OptimSection


@dataclass(frozen=True)
class ParamGroups:
    """Parameter names per group, for logging and tests."""

    decay: list[str]
    no_decay: list[str]


def split_param_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], ParamGroups]:
    """Trainable parameters split into (decay, no_decay) by the rule in the module docstring."""
    embedding_params = {
        id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding | nn.EmbeddingBag)
    }
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.ndim >= 2 and id(param) not in embedding_params:
            decay.append(param)
            decay_names.append(name)
        else:
            no_decay.append(param)
            no_decay_names.append(name)
    return decay, no_decay, ParamGroups(decay_names, no_decay_names)


def build_optimizer(model: nn.Module, section: OptimSection) -> tuple[torch.optim.AdamW, ParamGroups]:
    """AdamW over the model's trainable parameters with the decay/no-decay groups."""
    decay, no_decay, names = split_param_groups(model)
    groups = [
        {"params": decay, "weight_decay": section.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=section.lr,
        betas=(section.betas[0], section.betas[1]),
        eps=section.eps,
    )
    return optimizer, names
