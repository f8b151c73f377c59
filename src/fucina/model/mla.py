"""Multi-head latent attention (mixer "mla"), DeepSeek-V2/V3's attention with a compressed KV cache.

What and why (DeepSeek-AI, 2024, "DeepSeek-V2", section 2.1): instead of caching one key and one value
per head, each token is compressed into one small latent c_kv (`mla_kv_lora_rank` values) from which
every head's key and value are decompressed. The cache holds the latent only, a few times smaller than
even GQA's, while each head keeps keys and values of its own (unlike MQA/GQA, which share them).

Design choices (DeepSeek-V2's layout and names):
- Queries: d_model -> heads x (nope + rope), directly or through a low-rank latent (`mla_q_lora_rank`,
  with an RMSNorm on it), which saves parameters and activation memory in training, not cache.
- Keys/values: kv_a_proj maps d_model -> c_kv (kv rank) plus one rotated key part k_rope (rope dim);
  c_kv goes through an RMSNorm, then kv_b_proj decompresses it into each head's k_nope and v.
- Decoupled RoPE: a rotation of c_kv's keys would be tied to the position and could not be folded into
  the weights, so position lives in a separate part: q_rope per head and ONE k_rope shared by all
  heads, rotated and cached. Each head's key is [k_nope, k_rope]; scores scale by 1/sqrt(nope + rope).
  MLA always rotates this part with its own tables (size `mla_qk_rope_head_dim`), whatever
  `positions` says: with `positions: rope` the model adds no absolute positions.
- Cache: the normalised c_kv and the rotated k_rope, (kv rank + rope) values per token and layer.
  Decoding decompresses the cached latents into keys and values at every step (the "naive" path: exact
  and simple; DeepSeek's inference absorbs kv_b_proj into the query and output projections instead,
  which saves that work but not memory; not done here).
- Attention itself is torch's SDPA with the same masks as attention.py (causal, sliding window via
  `config.window`, left padding); values may have a head size other than the keys'.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from fucina.model.attention import attend
from fucina.model.cache import write_rows
from fucina.model.linear import make_linear
from fucina.model.norms import RMSNorm
from fucina.model.positions import RotaryEmbedding, apply_rotary

if TYPE_CHECKING:
    from fucina.model.config import ModelConfig
    from fucina.model.context import ForwardContext


class LatentKV:
    """Cache of one MLA layer: latents (B, max_length, kv rank) and shared rotated keys (B, max_length, rope)."""

    def __init__(
        self,
        batch_size: int,
        max_length: int,
        kv_rank: int,
        rope_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.latents = torch.zeros((batch_size, max_length, kv_rank), device=device, dtype=dtype)
        self.rope_keys = torch.zeros((batch_size, max_length, rope_dim), device=device, dtype=dtype)

    def update(
        self, latents: torch.Tensor, rope_keys: torch.Tensor, start: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, T, ·) at slots start..start+T; return every filled slot (all, for a tensor start)."""
        if isinstance(start, torch.Tensor):  # per-row (B, T) slots, as in cache.LayerKV
            write_rows(self.latents, latents, start, 1)
            write_rows(self.rope_keys, rope_keys, start, 1)
            return self.latents, self.rope_keys
        end = start + latents.size(1)
        self.latents[:, start:end] = latents
        self.rope_keys[:, start:end] = rope_keys
        return self.latents[:, :end], self.rope_keys[:, :end]  # (B, end, kv rank), (B, end, rope)

    def copy_row(self, row: int, source: LatentKV, length: int) -> None:
        """Row `row` takes the first `length` slots of row 0 of `source` (a prompt prefilled alone)."""
        self.latents[row, :length] = source.latents[0, :length]
        self.rope_keys[row, :length] = source.rope_keys[0, :length]

    def first_slots(self, count: int) -> LatentKV:
        """A view of slots 0..count-1 of every row, sharing the buffers (see KVCache.first_slots)."""
        view = copy.copy(self)
        view.latents, view.rope_keys = self.latents[:, :count], self.rope_keys[:, :count]
        return view


class LatentAttention(nn.Module):
    """Multi-head latent attention of one layer (registered as mixer "mla")."""

    fixed_shape_decoding = True  # accepts per-row slots: compiled decoding works
    attend = staticmethod(attend)  # the attention function; decoding may replace it on its own copy

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads = config.n_heads
        self.nope_dim, self.rope_dim = config.mla_nope_dim, config.mla_rope_dim
        self.value_dim, self.kv_rank = config.mla_value_dim, config.mla_kv_rank
        self.window = config.window(layer_index)
        self.dropout_p = config.dropout
        q_size = self.n_heads * (self.nope_dim + self.rope_dim)
        if config.mla_q_lora_rank is None:
            self.q_proj = make_linear(config, config.d_model, q_size)
        else:
            self.q_a_proj = make_linear(config, config.d_model, config.mla_q_lora_rank)
            self.q_a_norm = RMSNorm(config.mla_q_lora_rank, eps=config.norm_eps)
            self.q_b_proj = make_linear(config, config.mla_q_lora_rank, q_size)
        self.kv_a_proj = make_linear(config, config.d_model, self.kv_rank + self.rope_dim)
        self.kv_a_norm = RMSNorm(self.kv_rank, eps=config.norm_eps)
        self.kv_b_proj = make_linear(config, self.kv_rank, self.n_heads * (self.nope_dim + self.value_dim))
        self.out_proj = make_linear(config, self.n_heads * self.value_dim, config.d_model)
        self.out_proj.is_residual_output = True  # scaled at init (see transformer.py)
        self.rotary = RotaryEmbedding(
            self.rope_dim, config.context_length, config.rope_base, config.rope_scaling
        )
        self.resid_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, heads, nope + rope), before rotation."""
        B, T, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        return q.view(B, T, self.n_heads, self.nope_dim + self.rope_dim)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        q_nope, q_rope = self.queries(x).split([self.nope_dim, self.rope_dim], dim=-1)
        latents, k_rope = self.kv_a_proj(x).split([self.kv_rank, self.rope_dim], dim=-1)
        latents = self.kv_a_norm(latents)  # (B, T, kv rank): what the cache keeps
        cos, sin = self.rotary(ctx.positions, q_rope.dtype)
        q_rope = apply_rotary(q_rope, cos, sin)  # (B, T, H, rope)
        k_rope = apply_rotary(k_rope.unsqueeze(2), cos, sin).squeeze(2)  # (B, T, rope), one for all heads
        if ctx.cache is not None:
            latents, k_rope = ctx.cache.layers[self.layer_index].update(latents, k_rope, ctx.start)
        S = latents.size(1)
        kv = self.kv_b_proj(latents).view(B, S, self.n_heads, self.nope_dim + self.value_dim)
        k_nope, v = kv.split([self.nope_dim, self.value_dim], dim=-1)  # (B, S, H, nope), (B, S, H, v)
        k = torch.cat((k_nope, k_rope.unsqueeze(2).expand(B, S, self.n_heads, self.rope_dim)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T or S, ·)
        mask, is_causal = ctx.attention_mask(self.window)
        # (B, H, T, v); scale 1/sqrt(nope + rope), q's size; `attend` picks the fastest kernel
        y = self.attend(q, k, v, mask, is_causal, self.dropout_p if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.value_dim)
        return self.resid_dropout(self.out_proj(y))

    def new_layer_cache(
        self, batch_size: int, max_length: int, device: torch.device, dtype: torch.dtype
    ) -> LatentKV:
        """This layer's part of a KVCache: latents and rotated keys."""
        return LatentKV(batch_size, max_length, self.kv_rank, self.rope_dim, device, dtype)

    # Accounting hooks read by info.py ---------------------------------------------------------------
    @staticmethod
    def cache_bytes_per_token(config: ModelConfig, layer_index: int, dtype_bytes: int) -> int:
        """Bytes cached per token: the latent and the shared rotated key."""
        return (config.mla_kv_rank + config.mla_rope_dim) * dtype_bytes

    @staticmethod
    def sequence_flops_per_token(config: ModelConfig, layer_index: int, context_length: int) -> int:
        """Scores over nope + rope and the weighted sum of values, per head, over the attended span."""
        window = config.window(layer_index)
        attended = context_length if window is None else min(window, context_length)
        per_head = config.mla_nope_dim + config.mla_rope_dim + config.mla_value_dim
        return 2 * config.n_heads * per_head * attended

    @staticmethod
    def activation_elements_per_token(config: ModelConfig, layer_index: int) -> int:
        """Input, query latent, q, kv latent (raw and normed), decompressed k/v, full k, output."""
        heads, nope, rope, value = (
            config.n_heads,
            config.mla_nope_dim,
            config.mla_rope_dim,
            config.mla_value_dim,
        )
        q_latent = 0 if config.mla_q_lora_rank is None else 2 * config.mla_q_lora_rank
        kv_latent = 2 * config.mla_kv_rank + rope
        return (
            config.d_model
            + q_latent
            + heads * (nope + rope)
            + kv_latent
            + heads * (2 * nope + rope + 2 * value)
        )
