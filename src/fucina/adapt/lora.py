"""LoRA layers: a frozen base projection plus low-rank updates, and putting them into a model.

What and why (Hu et al., 2021): fine-tuning changes a weight W by a low-rank update, so instead of W we
train y = W x + scale * B A x, with A (rank x in) and B (out x rank) the only trainable tensors. A starts
random (PEFT's Kaiming-uniform), B at zero, so the adapted model starts exactly as the base.

Design choices:
- `LoRALinear` wraps the base layer (`base`) and holds one `LoRAPart` per row block of the output
  (targets.py): the fused q|k|v projection can carry separate q, k and v adapters, as PEFT does on
  LLaMA's three projections. The parts' A matrices are applied in one product; each part's B writes
  its rows, and rows no part covers get zeros.
- The base is frozen and may be quantized (`Int8Linear`, `Int4Linear` from `fucina quantize`): torch's
  low-bit CPU kernels have no backward, so while gradients are recorded the base weight is dequantized
  on the fly for the product (QLoRA's recipe: the adapter in float32, the base stored in low bits);
  without gradients (evaluation, generation) the base runs its own kernel.
- Quantized layers that carry no adapter (an int8 LM head, say) are wrapped too, with no parts: the
  gradient reaching the adapters below them must cross them, which the int8/int4 kernels cannot do.
- Dropout (if any) applies to the adapter's input only, as in PEFT.
- The adapter's tensors are named `<layer>.lora.<part>.A` / `.B`; `adapter_state_dict` is what
  training checkpoints and LoRA model directories hold. The `layout` (every part's layer, rows, rank
  and scale) rebuilds the same adapters on a base, whatever targets produced them (a PEFT import).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fucina.adapt.lora_config import LoRAConfig
from fucina.adapt.targets import select_sites
from fucina.compress.quantized_layers import Int4Linear, Int8Linear
from fucina.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

QUANTIZED_LAYERS = (Int8Linear, Int4Linear)


@dataclass(frozen=True)
class PartLayout:
    """One adapter as saved: its layer, rows [start, stop), rank and scale."""

    module: str
    part: str
    start: int
    stop: int
    rank: int
    scale: float


class LoRAPart(nn.Module):
    """The adapter of one row block: A (rank, in), B (rows, rank), and its scale."""

    def __init__(self, in_features: int, start: int, stop: int, rank: int, scale: float):
        super().__init__()
        self.start, self.stop, self.rank, self.scale = start, stop, rank, scale
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(stop - start, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # PEFT's init: the update starts at zero (B = 0)

    def delta_weight(self) -> torch.Tensor:
        """scale * B A, the (rows, in) update of this block's weight rows, in float32."""
        return self.scale * (self.B.float() @ self.A.float())


class LoRALinear(nn.Module):
    """A frozen linear layer (`base`) plus the LoRA updates of some of its row blocks (`lora`)."""

    def __init__(self, base: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.lora = nn.ModuleDict()
        self.dropout = dropout

    def add_part(self, name: str, start: int, stop: int, rank: int, scale: float) -> LoRAPart:
        if not 0 <= start < stop <= self.out_features:
            raise ValueError(f"rows {start}:{stop} outside the layer's {self.out_features} outputs")
        part = LoRAPart(self.in_features, start, stop, rank, scale)
        self.lora[name] = part.to(self._weight_device())
        return part

    def _weight_device(self) -> torch.device:
        return next(
            iter(self.base.buffers() if isinstance(self.base, QUANTIZED_LAYERS) else self.base.parameters())
        ).device

    def base_weight(self) -> torch.Tensor:
        """The base weight (out, in) in float: dequantized for an int8/int4 base."""
        if isinstance(self.base, QUANTIZED_LAYERS):
            return self.base.dequantized()
        return self.base.weight

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, QUANTIZED_LAYERS) and torch.is_grad_enabled():
            bias = None if self.base.bias is None else self.base.bias.to(x.dtype)
            return F.linear(
                x, self.base.dequantized().to(x.dtype), bias
            )  # the low-bit kernels have no backward
        return self.base(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base_forward(x)
        parts = sorted(self.lora.values(), key=lambda p: p.start)
        if not parts:
            return y
        h = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        a = torch.cat([p.A for p in parts]) if len(parts) > 1 else parts[0].A  # (sum of ranks, in)
        low = F.linear(h, a.to(h.dtype))  # (..., sum of ranks): every part's A in one product
        pieces, row, col = [], 0, 0
        for p in parts:
            if p.start > row:
                pieces.append(low.new_zeros(*low.shape[:-1], p.start - row))
            pieces.append(F.linear(low[..., col : col + p.rank], p.B.to(low.dtype)) * p.scale)
            row, col = p.stop, col + p.rank
        if row < self.out_features:
            pieces.append(low.new_zeros(*low.shape[:-1], self.out_features - row))
        delta = torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]  # (..., out)
        return y + delta.to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W + scale * B A for every part, in float32 (the merge)."""
        weight = self.base_weight().detach().float().clone()
        for p in self.lora.values():
            weight[p.start : p.stop] += p.delta_weight().detach()
        return weight

    def extra_repr(self) -> str:
        parts = ", ".join(f"{name}[{p.start}:{p.stop}] r={p.rank}" for name, p in self.lora.items())
        return f"lora: {parts}"


# --- putting adapters into a model ------------------------------------------------------------------------


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _wrap(model: nn.Module, name: str, dropout: float) -> LoRALinear:
    layer = _get(model, name)
    if isinstance(layer, LoRALinear):
        return layer
    parent_name, _, child = name.rpartition(".")
    wrapped = LoRALinear(layer, dropout)
    setattr(_get(model, parent_name) if parent_name else model, child, wrapped)
    return wrapped


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze `model` and put the adapters `config` describes on its projections (in place; returned)."""
    if is_lora_model(model):
        raise ConfigError(
            "lora: the model already carries LoRA adapters (init_from a LoRA run?); merge them first with "
            "`fucina lora merge` and start from the merged model"
        )
    sites = select_sites(model, config.target_names(), config.optional_names())
    layout = [
        PartLayout(site.module, part.name, part.start, part.stop, config.rank, config.scale)
        for site in sites
        for part in site.parts
    ]
    apply_layout(model, layout, config.dropout)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "LoRA rank %d (scale %.3g) on %d projections: %s trainable parameters of %s (%.2f%%)",
        config.rank,
        config.scale,
        len(sites),
        f"{trainable:,}",
        f"{total:,}",
        100.0 * trainable / max(total, 1),
    )
    return model


def apply_layout(model: nn.Module, layout: list[PartLayout], dropout: float = 0.0) -> nn.Module:
    """Freeze `model` and add one adapter per entry of `layout` (fresh weights: load them after)."""
    model.requires_grad_(False)
    for entry in layout:
        _wrap(model, entry.module, dropout).add_part(
            entry.part, entry.start, entry.stop, entry.rank, entry.scale
        )
    # Quantized layers without an adapter still pass gradients down to the adapters below them.
    for name in [n for n, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)]:
        if not name.endswith(".base"):
            _wrap(model, name, dropout)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of `model` by its dotted name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_lora_model(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def model_layout(model: nn.Module) -> list[PartLayout]:
    """The layout of the adapters in `model` (what `apply_layout` rebuilds)."""
    return [
        PartLayout(name, part_name, p.start, p.stop, p.rank, float(p.scale))
        for name, layer in lora_layers(model).items()
        for part_name, p in layer.lora.items()
    ]


def layout_to_json(layout: list[PartLayout]) -> list[dict[str, Any]]:
    return [asdict(entry) for entry in layout]


def layout_from_json(data: Any, where: object) -> list[PartLayout]:
    try:
        return [
            PartLayout(
                str(e["module"]),
                str(e["part"]),
                int(e["start"]),
                int(e["stop"]),
                int(e["rank"]),
                float(e["scale"]),
            )
            for e in data
        ]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: bad LoRA layout ({err})") from None


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors only (`<layer>.lora.<part>.A` / `.B`)."""
    return {
        f"{name}.lora.{part_name}.{kind}": getattr(part, kind)
        for name, layer in lora_layers(model).items()
        for part_name, part in layer.lora.items()
        for kind in ("A", "B")
    }


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: object) -> None:
    """Copy adapter tensors into `model`'s adapters, every name and shape checked."""
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(n for n in set(expected) & set(state) if expected[n].shape != state[n].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{where}: the adapter does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shape {wrong[:3]})"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            expected[name].copy_(tensor)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a training checkpoint holds: the adapters of a LoRA model, else the whole state dict."""
    return adapter_state_dict(model) if is_lora_model(model) else model.state_dict()


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The inverse of `trainable_state_dict`, strict; RuntimeError (as load_state_dict) when it does not fit."""
    if not is_lora_model(model):
        model.load_state_dict(state, strict=True)
        return
    try:
        load_adapter_state_dict(model, state, "checkpoint")
    except CheckpointError as err:
        raise RuntimeError(str(err)) from None
