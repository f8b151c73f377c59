"""What every layer needs to know about the current forward pass, computed once per pass.

The model builds one ForwardContext per forward and hands it to every block: the positions of the new
tokens, the RoPE cos/sin rows for them, the cache and where the new tokens go in it, and the attention
masks (built lazily, once per window size, shared by all layers that use it). Mixers that need none of
it (a state-space layer) simply ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fucina.model.cache import KVCache
from fucina.model.positions import Positions


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the projections will produce: autocast's when it is on, else the activations'."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def build_attention_mask(
    start: int | torch.Tensor,
    length: int,
    pad_lengths: torch.Tensor | None = None,
    window: int | None = None,
    device: torch.device | str | None = None,
    key_slots: int | None = None,
) -> torch.Tensor:
    """Boolean mask (B or 1, 1, length, S), True where a query may attend a key.

    Query t sits at slot s = start + t and attends key slots j with j <= s, j >= pad_lengths[b] (real
    tokens only) and, with a window, s - window < j. A padding query attends itself only, so its softmax
    row stays finite; no real query ever reads it. S is start + length, or `key_slots` (the whole cache)
    when `start` is a (B, T) tensor of per-row query slots.
    """
    if isinstance(start, torch.Tensor):
        query_slots = start.unsqueeze(-1)  # (B, T, 1)
        keys = torch.arange(key_slots, device=device)  # (S,)
        allowed = keys <= query_slots  # (B, T, S)
        if window is not None:
            allowed = allowed & (keys > query_slots - window)
        return allowed.unsqueeze(1)  # (B, 1, T, S)
    span = key_slots if key_slots is not None else start + length
    query_slots = (start + torch.arange(length, device=device)).unsqueeze(1)  # (T, 1)
    key_slots = torch.arange(span, device=device).unsqueeze(0)  # (1, S)
    allowed = key_slots <= query_slots  # (T, S)
    if window is not None:
        allowed = allowed & (key_slots > query_slots - window)
    if pad_lengths is None:
        return allowed[None, None]  # (1, 1, T, S)
    real_key = key_slots.unsqueeze(0) >= pad_lengths.to(device).view(-1, 1, 1)  # (B, 1, S)
    allowed = allowed.unsqueeze(0) & (real_key | (key_slots == query_slots).unsqueeze(0))  # (B, T, S)
    return allowed.unsqueeze(1)  # (B, 1, T, S)


@dataclass
class ForwardContext:
    """Per-forward facts shared by all layers; see the module docstring."""

    # cache slot of the first new token (0 without a cache), the same for every row; or, when rows hold
    # different lengths, the (B, T) tensor of each new token's slot
    start: int | torch.Tensor
    length: int  # number of new tokens T
    positions: Positions  # slice(start, end) or (B, T) position ids
    device: torch.device
    cache: KVCache | None = None
    pad_lengths: torch.Tensor | None = None  # (B,) left-padding slots, None when no row is padded
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin broadcastable to (B, T, heads, hd)
    _masks: dict = field(default_factory=dict, repr=False)

    def attention_mask(self, window: int | None = None) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for scaled_dot_product_attention over keys 0..start+length.

        No mask at all when SDPA's own `is_causal` (a fresh, unpadded sequence) or nothing (one new
        token attending every cached key) says the same thing: that keeps the fused kernels. With per-row
        slots the keys are every slot of the cache and the mask always hides each row's unfilled ones.
        """
        if isinstance(self.start, torch.Tensor):
            if window not in self._masks:
                self._masks[window] = build_attention_mask(
                    self.start, self.length, None, window, self.device, self.cache.max_length
                )
            return self._masks[window], False
        end = self.start + self.length
        if window is not None and end <= window:
            window = None  # the window cuts nothing yet
        if self.pad_lengths is None and window is None:
            if self.start == 0:
                return None, self.length > 1
            if self.length == 1:
                return None, False
        if window not in self._masks:
            self._masks[window] = build_attention_mask(
                self.start, self.length, self.pad_lengths, window, self.device
            )
        return self._masks[window], False
