"""Which fucina architectures an export format can hold, and why the others are refused.

Every format here describes a stack of identical blocks built from the standard parts: attention
(`mixer: attention`) and the dense MLP (`ffn: mlp`) with plain nn.Linear projections
(`linear: dense`). A model with another mixer (latent attention, a state-space layer), a mixture of
experts, per-layer part lists or quantization-aware projections (BitNet) has no counterpart in them;
`unsupported_parts` names what is in the way so the error can say it.
"""

from __future__ import annotations

from fucina.model.config import ModelConfig


def unsupported_parts(config: ModelConfig) -> list[str]:
    """What in `config` only fucina's own model code can run (empty when the blocks are standard)."""
    problems = []
    mixers = {config.mixer_name(i) for i in range(config.n_layers)}
    ffns = {config.ffn_name(i) for i in range(config.n_layers)}
    if mixers != {"attention"}:
        problems.append(f"mixer {', '.join(sorted(mixers - {'attention'}))}")
    if ffns != {"mlp"}:
        problems.append(f"feed-forward {', '.join(sorted(ffns - {'mlp'}))}")
    if config.linear != "dense":
        problems.append(f"linear {config.linear!r}")
    return problems


def describe(config: ModelConfig) -> str:
    """A short description of the block layout, for error messages."""
    parts = [
        f"{config.positions} positions",
        config.norm,
        f"{config.mlp} MLP",
        "biases" if config.bias else "no biases",
    ]
    if config.sliding_window is not None:
        parts.append(f"sliding window {config.sliding_window}")
    return ", ".join(parts)
