"""KV cache for generation: preallocated per-layer key/value tensors, filled slot by slot.

Design choices:
- Each layer's mixer creates its own per-layer cache (`mixer.new_layer_cache(...)`); attention layers
  hold `LayerKV`: keys and values preallocated as (B, kv_heads, max_length, head_dim), written in place,
  read back as a view of the filled prefix (no concatenation, no reallocation per token). Other mixers
  (latent attention, state-space layers) bring their own per-layer object.
- One `length` (filled slots) is shared by all layers and advanced by the model after each forward.
- Batches of prompts with different lengths are left-padded: `pad_lengths[b]` slots at the start of row
  b hold padding that no query attends to, and the row's positions count from its first real token
  (position = slot - pad_lengths[b]), so every row computes what it would compute alone.
- Compiled decoding (generate's `compile=True`) needs shapes that do not change from token to token: the
  new token's slot is then a 0-d tensor, written with index_copy_, and attention reads every slot of the
  buffers, the unfilled ones hidden by the mask (see ForwardContext.attention_mask).
- Sliding-window layers keep the full cache and mask the keys outside the window: simple and exactly
  right; a ring buffer of `window` slots would save memory on long generations but is not needed at our
  context lengths.
"""

from __future__ import annotations

import torch


class LayerKV:
    """Keys and values of one attention layer, (B, kv_heads, max_length, head_dim) each."""

    def __init__(
        self,
        batch_size: int,
        kv_heads: int,
        max_length: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (batch_size, kv_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, start: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values (B, kv_heads, T, hd) at slots start..start+T; return all filled slots.

        With a tensor `start` (fixed-shape decoding) the whole buffers come back, filled or not.
        """
        if isinstance(start, torch.Tensor):
            slots = start + torch.arange(keys.size(2), device=start.device)
            self.keys.index_copy_(2, slots, keys)
            self.values.index_copy_(2, slots, values)
            return self.keys, self.values  # (B, kv_heads, max_length, hd)
        end = start + keys.size(2)
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        return self.keys[:, :, :end], self.values[:, :, :end]  # (B, kv_heads, end, hd)


class KVCache:
    """The per-layer caches of one model for one batch, plus the shared slot bookkeeping."""

    def __init__(self, layers: list, max_length: int, pad_lengths: torch.Tensor | None = None):
        self.layers = layers
        self.max_length = max_length
        self.length = 0  # slots filled so far, the same for every row
        self.pad_lengths = pad_lengths  # (B,) LongTensor of left-padding slots, or None
        self.padded = pad_lengths is not None and bool((pad_lengths > 0).any())

    def reset(self) -> None:
        """Forget the cached sequence (the buffers are reused)."""
        self.length = 0

    @property
    def remaining(self) -> int:
        """How many more slots fit."""
        return self.max_length - self.length
