"""Names -> classes for the swappable parts of a block.

A block is norm -> mixer -> residual -> norm -> feed-forward -> residual. The mixer (attention today;
latent attention or a state-space layer later) and the feed-forward (MLP today; mixture-of-experts later)
are looked up here by the names in ModelConfig (`mixer`/`layer_mixers`, `ffn`/`layer_ffns`) and built
as `Cls(config, layer_index)`. A new architecture slots in by adding one entry (or calling
`register_mixer` / `register_feed_forward`), without touching the block or the model.

A mixer's forward is `(x (B, T, d_model), ctx: ForwardContext) -> (B, T, d_model)`; it provides
`new_layer_cache(batch_size, max_length, device, dtype)` for generation and the accounting hooks used
by info.py (`cache_bytes_per_token`, `sequence_flops_per_token`, `activation_elements_per_token`).
A feed-forward's forward is `(x) -> x`, with `activation_elements_per_token`. Either may define
`auxiliary_loss() -> Tensor` (e.g. MoE load balance) and `active_parameters() -> int` (MoE: experts
actually used per token); the model sums / info.py counts them.
"""

from __future__ import annotations

from torch import nn

from fucina.model.attention import Attention
from fucina.model.mlp import MLP

MIXERS: dict[str, type[nn.Module]] = {"attention": Attention}
FEED_FORWARDS: dict[str, type[nn.Module]] = {"mlp": MLP}


def register_mixer(name: str, cls: type[nn.Module]) -> None:
    """Make `cls` selectable as `mixer: name`."""
    MIXERS[name] = cls


def register_feed_forward(name: str, cls: type[nn.Module]) -> None:
    """Make `cls` selectable as `ffn: name`."""
    FEED_FORWARDS[name] = cls
