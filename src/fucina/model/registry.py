"""Names -> classes for the swappable parts of a block.

A block is norm -> mixer -> residual -> norm -> feed-forward -> residual. The mixer ("attention",
DeepSeek's latent attention "mla", the state-space "mamba") and the feed-forward ("mlp", mixture of
experts "moe") are looked up here by the names in ModelConfig (`mixer`/`layer_mixers`, `ffn`/`layer_ffns`) and built
as `Cls(config, layer_index)`. A new architecture slots in by adding one entry (or calling
`register_mixer` / `register_feed_forward`), without touching the block or the model.

A mixer's forward is `(x (B, T, d_model), ctx: ForwardContext) -> (B, T, d_model)`; it provides
`new_layer_cache(batch_size, max_length, device, dtype)` for generation and the accounting hooks used
by info.py (`cache_bytes_per_token`, `sequence_flops_per_token`, `activation_elements_per_token`).
A feed-forward's forward is `(x) -> x`, with `activation_elements_per_token`. Either may define
`auxiliary_loss() -> Tensor` (e.g. MoE load balance) and `active_parameters() -> int` (MoE: experts
actually used per token); the model sums / info.py counts them. A routed feed-forward may define
`routing_statistics() -> list[int]` (tokens per expert in the last forward), which the trainer logs. A mixer whose generation state does
not grow with the sequence (Mamba) also defines `state_bytes(config, layer_index, dtype_bytes)`.
"""

from __future__ import annotations

from torch import nn

from fucina.model.attention import Attention
from fucina.model.mamba import Mamba
from fucina.model.mla import LatentAttention
from fucina.model.mlp import MLP
from fucina.model.moe import MixtureOfExperts

MIXERS: dict[str, type[nn.Module]] = {"attention": Attention, "mla": LatentAttention, "mamba": Mamba}
FEED_FORWARDS: dict[str, type[nn.Module]] = {"mlp": MLP, "moe": MixtureOfExperts}


def register_mixer(name: str, cls: type[nn.Module]) -> None:
    """Make `cls` selectable as `mixer: name`."""
    MIXERS[name] = cls


def register_feed_forward(name: str, cls: type[nn.Module]) -> None:
    """Make `cls` selectable as `ffn: name`."""
    FEED_FORWARDS[name] = cls
