"""Which projections of a fucina model a LoRA target name selects, and what LoRA refuses.

Design choices:
- A *site* is one linear layer to wrap plus its row blocks (*parts*), each with its own adapter. fucina
  fuses projections HF keeps apart: attention's `qkv_proj` (rows q | k | v) and SwiGLU's `gate_up_proj`
  (rows gate | up). Targeting q alone adapts only the q rows; q, k and v get three adapters, exactly
  the three PEFT puts on LLaMA's q_proj, k_proj and v_proj, so the PEFT mapping is exact both ways.
- Roles are found by the module's class, not by its name: Attention (q, k, v, o), LatentAttention (MLA:
  q for q_proj or q_a_proj + q_b_proj, k and v for the shared kv_a_proj and kv_b_proj, o), MLP (gate,
  up, down; MoE experts and shared experts are MLPs too), the MoE router and the LM head on request.
  Mamba mixers are never entered: their projections are refused by name in lora_config.py.
- BitNet models are refused: their projections quantize their own weights to ternary in the forward,
  so a float update could be neither trained against nor merged into them.
- A target no projection of the model answers to (gate on a non-gated MLP, say) is an error naming it:
  a silently empty adapter would train nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fucina.errors import ConfigError
from fucina.model.attention import Attention
from fucina.model.mla import LatentAttention
from fucina.model.mlp import MLP
from fucina.model.moe import MixtureOfExperts


@dataclass(frozen=True)
class Part:
    """One row block of a layer's output with its own adapter: rows [start, stop)."""

    name: str
    start: int
    stop: int


@dataclass(frozen=True)
class Site:
    """A linear layer to wrap (its dotted name in the model) and the parts selected in it."""

    module: str
    parts: tuple[Part, ...]


def _out_features(layer: nn.Module) -> int:
    return int(layer.out_features)


def _candidates(model: nn.Module) -> list[tuple[str, list[tuple[Part, frozenset[str]]]]]:
    """Every adaptable layer with its parts and the target names that select each part."""
    found: list[tuple[str, list[tuple[Part, frozenset[str]]]]] = []

    def whole(name: str, layer: nn.Module, part: str, selected_by: set[str]) -> None:
        found.append((name, [(Part(part, 0, _out_features(layer)), frozenset(selected_by))]))

    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, Attention):
            q = module.n_heads * module.head_dim
            kv = module.kv_heads * module.head_dim
            blocks = [("q", 0, q), ("k", q, q + kv), ("v", q + kv, q + 2 * kv)]
            found.append((prefix + "qkv_proj", [(Part(r, a, b), frozenset({r})) for r, a, b in blocks]))
            whole(prefix + "out_proj", module.out_proj, "o", {"o"})
        elif isinstance(module, LatentAttention):
            if hasattr(module, "q_proj"):
                whole(prefix + "q_proj", module.q_proj, "q", {"q"})
            else:
                whole(prefix + "q_a_proj", module.q_a_proj, "q_a", {"q", "q_a_proj"})
                whole(prefix + "q_b_proj", module.q_b_proj, "q_b", {"q", "q_b_proj"})
            whole(prefix + "kv_a_proj", module.kv_a_proj, "kv_a", {"k", "v", "kv_a_proj"})
            whole(prefix + "kv_b_proj", module.kv_b_proj, "kv_b", {"k", "v", "kv_b_proj"})
            whole(prefix + "out_proj", module.out_proj, "o", {"o"})
        elif isinstance(module, MLP):
            if module.gated:
                half = _out_features(module.gate_up_proj) // 2
                found.append(
                    (
                        prefix + "gate_up_proj",
                        [
                            (Part("gate", 0, half), frozenset({"gate"})),
                            (Part("up", half, 2 * half), frozenset({"up"})),
                        ],
                    )
                )
            else:
                whole(prefix + "up_proj", module.up_proj, "up", {"up"})
            whole(prefix + "down_proj", module.down_proj, "down", {"down"})
        elif isinstance(module, MixtureOfExperts):
            whole(prefix + "router", module.router, "router", {"router"})
    if isinstance(getattr(model, "lm_head", None), nn.Module):
        whole("lm_head", model.lm_head, "lm_head", {"lm_head"})
    return found


def select_sites(model: nn.Module, targets: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[Site]:
    """The layers and row blocks `targets` (canonical names, lora_config.py) select in `model`.

    A name in `optional` (the roles behind all-linear) that the model has no projection for is skipped
    instead of refused: a non-gated MLP has no gate.
    """
    config = getattr(model, "config", None)
    if getattr(config, "linear", "dense") != "dense":
        raise ConfigError(
            f"lora: a model with linear {config.linear!r} (BitNet) cannot take LoRA adapters: its "
            "projections quantize their weights to ternary in the forward pass"
        )
    sites, matched = [], set()
    for module, parts in _candidates(model):
        chosen = tuple(part for part, selected_by in parts if selected_by & set(targets))
        for _, selected_by in parts:
            matched |= selected_by & set(targets)
        if chosen:
            sites.append(Site(module, chosen))
    unmatched = [name for name in targets if name not in matched]
    unmatched = [name for name in unmatched if name not in optional]
    if unmatched:
        raise ConfigError(
            f"lora.targets: {', '.join(unmatched)} match no projection of this model "
            f"(it has: {', '.join(sorted(_available(model)))})"
        )
    if not sites:
        raise ConfigError("lora.targets select no projection of this model")
    return sites


def _available(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for _, parts in _candidates(model):
        for _, selected_by in parts:
            names |= selected_by
    return names
