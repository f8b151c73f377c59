"""AdamW (torch, or 8-bit from bitsandbytes/torchao) with decayed matrices and undecayed everything else.

Design choices:
- Weight decay shrinks weights toward zero. That is a useful prior for the matrices of attention and
  MLP layers, but it hurts embeddings (rare tokens get pulled to zero between their few updates),
  norm gains (which should stay near 1) and biases. So only parameters with 2+ dimensions that are not
  embeddings are decayed; everything else goes into a group with weight_decay=0 (as PicoDAC does).
- Embeddings are recognised by module type (`nn.Embedding`), not by name, so a renamed layer cannot
  slip into the decayed group. A weight tied between the embedding and the output head is one
  parameter and is counted once, in the embedding (undecayed) group.
- With LeRaC (train/lerac.py) the groups are further split by depth, so each depth gets its own rate;
  every group carries its `name` and `depth` for logging.
- `optim.name: adamw8bit` keeps Adam's two moments in 8 bits (block-wise quantised). bitsandbytes
  (>= 0.50 has CPU kernels) is tried first, then torchao's `AdamW8bit`; the one chosen is logged, and if
  neither imports the error says how to install one. Tensors under 4096 elements keep 32-bit state, as
  both libraries do by default (quantising a norm's few gains saves nothing and costs accuracy).
- `fused`/`foreach` are left to torch's defaults: both are deterministic for a fixed device.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fucina.errors import ConfigError
from fucina.train.config import OptimSection
from fucina.train.lerac import model_depth, parameter_depth

log = logging.getLogger(__name__)

# Below this many elements a tensor keeps 32-bit optimizer state (bitsandbytes' and torchao's default).
MIN_8BIT_SIZE = 4096


@dataclass(frozen=True)
class ParamGroups:
    """Parameter names per group, for logging and tests."""

    decay: list[str]
    no_decay: list[str]


def split_param_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], ParamGroups]:
    """Trainable parameters split into (decay, no_decay) by the rule in the module docstring."""
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, param, decayed in _named_trainable(model):
        (decay if decayed else no_decay).append(param)
        (decay_names if decayed else no_decay_names).append(name)
    return decay, no_decay, ParamGroups(decay_names, no_decay_names)


def _named_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter, bool]]:
    """(name, parameter, decayed?) for each trainable parameter, a tied one once under its first name."""
    embedding_params = {
        id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding | nn.EmbeddingBag)
    }
    seen: set[int] = set()
    named = []
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        named.append((name, param, param.ndim >= 2 and id(param) not in embedding_params))
    return named


def param_groups(model: nn.Module, section: OptimSection) -> list[dict[str, Any]]:
    """The optimizer's groups: decay/no_decay, and by depth when LeRaC is on; empty groups dropped."""
    by_depth = section.lerac.enabled
    n_layers = model_depth(model)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param, decayed in _named_trainable(model):
        depth = parameter_depth(name, n_layers) if by_depth else 0
        key = (depth, decayed)
        if key not in groups:
            label = "decay" if decayed else "no_decay"
            groups[key] = {
                "params": [],
                "weight_decay": section.weight_decay if decayed else 0.0,
                "name": f"depth{depth}/{label}" if by_depth else label,
                "depth": depth,
            }
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], not k[1]))]


_ABSENT = object()  # sys.modules had no entry (None there means a blocked import)


def _import_bitsandbytes():
    """bitsandbytes, imported without reaching the Hugging Face Hub.

    On CPUs with AVX512-BF16 its import asks the `kernels` package to fetch a 4-bit matmul kernel from
    the Hub (and logs a warning when that fails): code 8-bit AdamW never runs, and fucina downloads
    nothing at run time. `kernels` is hidden for the import, so that lookup fails at once, quietly.
    """
    hidden = sys.modules.get("kernels", _ABSENT)
    sys.modules["kernels"] = None  # `from kernels import ...` raises ImportError
    cpu_ops_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops_log.level
    cpu_ops_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        cpu_ops_log.setLevel(level)
        if hidden is _ABSENT:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = hidden
    return bitsandbytes


def _adamw8bit_class() -> type[torch.optim.Optimizer]:
    try:
        bnb = _import_bitsandbytes()

        log.info("optimizer: 8-bit AdamW from bitsandbytes %s", bnb.__version__)
        return bnb.optim.AdamW8bit
    except ImportError:
        pass
    try:
        from torchao.optim import AdamW8bit

        log.info("optimizer: 8-bit AdamW from torchao")
        return AdamW8bit
    except ImportError:
        raise ConfigError(
            "optim.name adamw8bit needs bitsandbytes >= 0.50 or torchao: pip install 'fucina[adamw8bit]'"
        ) from None


def build_optimizer(model: nn.Module, section: OptimSection) -> tuple[torch.optim.Optimizer, ParamGroups]:
    """AdamW (or 8-bit AdamW) over the model's trainable parameters with the groups described above."""
    _, _, names = split_param_groups(model)
    groups = param_groups(model, section)
    kwargs = {"lr": section.lr, "betas": (section.betas[0], section.betas[1]), "eps": section.eps}
    if section.name == "adamw8bit":
        optimizer_class = _adamw8bit_class()
        if optimizer_class.__module__.startswith("bitsandbytes"):
            kwargs["min_8bit_size"] = MIN_8BIT_SIZE  # torchao's own threshold is the same
        return optimizer_class(groups, **kwargs), names
    return torch.optim.AdamW(groups, **kwargs), names


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state tensors (moments, quantisation maps, scales)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )
