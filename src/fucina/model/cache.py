"""KV cache for generation: preallocated per-layer key/value tensors, filled slot by slot.

Design choices:
- Each layer's mixer creates its own per-layer cache (`mixer.new_layer_cache(...)`); attention layers
  hold `LayerKV`: keys and values preallocated as (B, kv_heads, max_length, head_dim), written in place,
  read back as a view of the filled prefix (no concatenation, no reallocation per token). Other mixers
  (latent attention, state-space layers) bring their own per-layer object.
- Every row has its own length (`lengths`, a (B,) tensor), so rows can hold sequences of different
  lengths and a row can be emptied and refilled while the others keep going (continuous batching).
  New tokens of row b go to slots lengths[b]..; attention reads every slot of the buffers and a mask
  hides each row's unfilled ones. The shapes never change from step to step, which torch.compile'd
  decoding needs.
- When every row holds the same number of slots the host says so with an int `length`; forwards then
  slice the buffers to the filled prefix and need no mask at all for one new token (the fast path of
  eager batch-1 decoding and of batched prompt scoring). Setting `length` sets every row's length.
- Left padding (`pad_lengths[b]` slots at the start of row b that no query attends to, positions
  counted from the row's first real token) is kept for batched scoring of prompts of unequal lengths
  in one forward (evaluate/loglikelihood.py); it works with a common `length` only.
- Sliding-window layers keep the full cache and mask the keys outside the window: simple and exactly
  right; a ring buffer of `window` slots would save memory on long generations but is not needed at our
  context lengths.
"""

from __future__ import annotations

import copy

import torch


def write_rows(buffer: torch.Tensor, new: torch.Tensor, slots: torch.Tensor, dim: int) -> None:
    """buffer[b, ..., slots[b, t], ...] = new[b, ..., t, ...] along `dim`; slots is (B, T).

    Written as an indexed assignment (index_put_), which torch.compile updates in place; a scatter
    would make it copy the whole buffer every step.
    """
    rows = torch.arange(slots.size(0), device=slots.device).unsqueeze(1)  # (B, 1)
    index = (rows, *([slice(None)] * (dim - 1)), slots)
    buffer[index] = new.movedim(dim, 1)  # the indexed axes come first: (B, T, ...)


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

        With per-row slots (`start` a (B, T) tensor) the whole buffers come back, filled or not.
        """
        if isinstance(start, torch.Tensor):
            write_rows(self.keys, keys, start, 2)
            write_rows(self.values, values, start, 2)
            return self.keys, self.values  # (B, kv_heads, max_length, hd)
        end = start + keys.size(2)
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        return self.keys[:, :, :end], self.values[:, :, :end]  # (B, kv_heads, end, hd)

    def copy_row(self, row: int, source: LayerKV, length: int) -> None:
        """Row `row` takes the first `length` slots of row 0 of `source` (a prompt prefilled alone)."""
        self.keys[row, :, :length] = source.keys[0, :, :length]
        self.values[row, :, :length] = source.values[0, :, :length]

    def first_slots(self, count: int) -> LayerKV:
        """A view of slots 0..count-1 of every row, sharing the buffers (see KVCache.first_slots)."""
        view = copy.copy(self)
        view.keys, view.values = self.keys[:, :, :count], self.values[:, :, :count]
        return view


class KVCache:
    """The per-layer caches of one model for one batch, plus the per-row slot bookkeeping."""

    def __init__(
        self,
        layers: list,
        max_length: int,
        batch_size: int,
        device: torch.device | str | None = None,
        pad_lengths: torch.Tensor | None = None,
    ):
        self.layers = layers
        self.max_length = max_length
        # Filled slots per row; the truth only while `length` is None (a common length needs no tensor).
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._length: int | None = 0  # the common length when every row has it, else None
        self.in_use: torch.Tensor | None = None  # (B,) 1 for rows that grow, 0 for free rows; None: all
        self.pad_lengths = pad_lengths  # (B,) LongTensor of left-padding slots, or None
        self.padded = pad_lengths is not None and bool((pad_lengths > 0).any())

    @property
    def length(self) -> int | None:
        """Slots filled in every row, when the rows agree (None once they hold different lengths)."""
        return self._length

    @length.setter
    def length(self, value: int) -> None:
        self._length = value
        self.in_use = None

    def set_lengths(self, lengths: torch.Tensor, in_use: torch.Tensor | None = None) -> None:
        """Give every row its own length (B,): later forwards write and attend per row.

        `in_use` (B,) marks with 1 the rows whose length grows with each forward; a free row (0) keeps
        its length, so it never runs off the end of the buffers while it waits for a new sequence.
        """
        if self.padded:
            raise ValueError("a left-padded cache keeps one common length")
        self.lengths.copy_(lengths)
        self.in_use = None if in_use is None else in_use.to(self.lengths)
        self._length = None

    def advance(self, count: int) -> None:
        """Count `count` more slots filled in every row in use (called by the model after a forward)."""
        if self._length is not None:
            self._length += count
        elif self.in_use is None:
            self.lengths.add_(count)
        else:
            self.lengths.add_(self.in_use, alpha=count)

    def first_rows(self, count: int) -> KVCache:
        """A view of rows 0..count-1 that shares every buffer: a forward over it fills this cache's rows.

        Per-row lengths are views too, so they advance here; a common `length` is a number, which the
        caller copies back after the forward.
        """
        view = copy.copy(self)
        view.layers = [_first_rows_of_layer(layer, count) for layer in self.layers]
        view.lengths = self.lengths[:count]
        view.in_use = None if self.in_use is None else self.in_use[:count]
        view.pad_lengths = None if self.pad_lengths is None else self.pad_lengths[:count]
        return view

    def first_slots(self, count: int) -> KVCache:
        """A view of slots 0..count-1 of every row that shares every buffer and the per-row lengths.

        For per-row steps, which attend every slot with a mask: over this view they attend `count`
        slots instead of `max_length` (every row's filled slots and the new ones must fit in `count`).
        """
        view = copy.copy(self)
        view.layers = [layer.first_slots(count) for layer in self.layers]
        view.max_length = count
        return view

    def reset(self) -> None:
        """Forget the cached sequences (the buffers are reused)."""
        self.length = 0

    @property
    def remaining(self) -> int:
        """How many more slots fit (in the fullest row)."""
        used = self._length if self._length is not None else int(self.lengths.max())
        return self.max_length - used


def _first_rows_of_layer(layer, count: int):
    """A layer cache whose (B, ...) tensors are views of their first `count` rows.

    Every layer cache (keys/values, latents, state-space state) keeps its per-row tensors as attributes
    with the batch first and updates them in place, so views of them write through.
    """
    view = copy.copy(layer)
    for name, value in vars(layer).items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            setattr(view, name, value[:count])
    return view
