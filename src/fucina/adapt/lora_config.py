"""The `lora:` section of a training config: how large the adapters are and where they go.

Design choices:
- `rank` and `alpha` as in Hu et al. (2021): the update is (alpha / rank) * B A. `rslora: true` scales by
  alpha / sqrt(rank) instead (Kalajdzievski, 2023, rank-stabilised LoRA), so a larger rank does not
  shrink the update.
- `targets` names projections by role, the same on every architecture: attention q, k, v, o; MLP gate,
  up, down; or "all-linear" (all seven, MoE experts and MLA projections included; not the LM head nor the
  MoE router, as in PEFT). `lm_head` and `router` may be named explicitly. The HF names (q_proj, ...)
  are accepted as aliases. targets.py resolves the names against the model and refuses what LoRA cannot
  adapt.
- Plain data only (no torch): the training config imports this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fucina.errors import ConfigError

ALL_LINEAR = "all-linear"
ROLES = ("q", "k", "v", "o", "gate", "up", "down")
MLA_NAMES = ("q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj")  # MLA's own projections, by their names
EXPLICIT_ONLY = ("lm_head", "router")  # never part of all-linear
ALIASES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "out_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}
# Mamba's projections feed the selective scan (step sizes, input-dependent B and C): refused by name.
MAMBA_PROJECTIONS = ("in_proj", "x_proj", "dt_proj", "conv1d")


@dataclass
class LoRAConfig:
    """Adapter size and placement (see the module docstring)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    targets: list[str] | str = ALL_LINEAR

    def validate(self) -> LoRAConfig:
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        self.target_names()
        return self

    @property
    def scale(self) -> float:
        """The factor of B A: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        return lora_scale(self.rank, self.alpha, self.rslora)

    def optional_names(self) -> tuple[str, ...]:
        """The roles all-linear brings in: a model without one of them (no gate) is not an error."""
        targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        return ROLES if ALL_LINEAR in targets else ()

    def target_names(self) -> tuple[str, ...]:
        """The targets as canonical names (roles, MLA names, lm_head, router), aliases resolved."""
        targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        if not targets:
            raise ConfigError("lora.targets: name at least one projection, or all-linear")
        names: list[str] = []
        for target in targets:
            if target == ALL_LINEAR:
                names += ROLES
                continue
            name = ALIASES.get(target, target)
            if name in MAMBA_PROJECTIONS:
                raise ConfigError(
                    f"lora.targets: {target!r} is one of Mamba's selective-scan projections "
                    f"({', '.join(MAMBA_PROJECTIONS)}), which LoRA does not adapt; target attention or MLP"
                )
            if name not in (*ROLES, *MLA_NAMES, *EXPLICIT_ONLY):
                known = (ALL_LINEAR, *ROLES, *MLA_NAMES, *EXPLICIT_ONLY)
                raise ConfigError(f"lora.targets: unknown target {target!r} (known: {', '.join(known)})")
            names.append(name)
        return tuple(dict.fromkeys(names))


def lora_scale(rank: int, alpha: float, rslora: bool) -> float:
    """alpha / rank (LoRA) or alpha / sqrt(rank) (rsLoRA)."""
    return alpha / (math.sqrt(rank) if rslora else rank)
