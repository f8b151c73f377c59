"""The decoder-only transformer: embeddings -> blocks -> final norm -> LM head.

Design choices:
- Read top-down like the paper; the parts (norms, attention, MLP) live in their own modules and are
  chosen by ModelConfig, the swappable ones through the registries (registry.py, linear.py).
- Initialisation follows GPT-2: every Linear and Embedding weight ~ N(0, init_std = 0.02), biases 0,
  norm scales 1; the projections that write into the residual stream (attention `out_proj`, MLP
  `down_proj`: any module flagged `is_residual_output`) use std init_std / sqrt(2 * n_layers), because
  each layer adds two residual branches and their variance would otherwise grow with depth. A part with
  parameters of its own kind can define `init_special_parameters()`, called after this pass.
- `tie_embeddings` shares one matrix between the token embedding and the LM head (it is saved once).
- `forward(input_ids, cache)` computes logits for every position; with a KVCache the new tokens are
  appended to it (prefill a prompt, then one token at a time). `last_only=True` skips the LM head for all
  but the last position, which is all generation needs. `forward(input_ids, labels=labels)` returns
  the summed training loss instead, through a fused LM-head + cross-entropy (loss.py).
- `maybe_compile` wraps torch.compile. Gradient checkpointing is a training option: the trainer wraps
  each block (train/activation_checkpointing.py); the model always runs its blocks plainly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fucina.model.block import Block
from fucina.model.cache import KVCache
from fucina.model.config import ModelConfig
from fucina.model.context import ForwardContext, compute_dtype
from fucina.model.loss import cross_entropy_sum, linear_cross_entropy_sum
from fucina.model.norms import RMSNorm, build_norm
from fucina.model.positions import RotaryEmbedding


class Transformer(nn.Module):
    """A decoder-only language model built from a ModelConfig."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = (
            nn.Embedding(config.context_length, config.d_model) if config.positions == "learned" else None
        )
        self.rotary = (
            RotaryEmbedding(config.head_size, config.context_length, config.rope_base, config.rope_scaling)
            if config.positions == "rope"
            else None
        )
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()  # no call cost
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = build_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 initialisation (see the module docstring)."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(
                    0.0, residual_std if getattr(module, "is_residual_output", False) else std
                )
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm | RMSNorm):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        for module in self.modules():
            if module is not self and hasattr(module, "init_special_parameters"):
                module.init_special_parameters()

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for input_ids (B, T); (B, 1, vocab) with last_only.

        With `labels` (B, T), already shifted, IGNORE_INDEX where not trained: instead of logits, the
        summed next-token loss in nats (a float32 scalar), computed without float32 logits (loss.py).

        With a cache the new tokens are appended to each row's cached sequence: at one common offset
        when the rows agree (`cache.length`), else at each row's own length (`cache.lengths`).
        """
        B, T = input_ids.shape
        if labels is not None and (last_only or labels.shape != input_ids.shape):
            raise ValueError(
                f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)} (not last_only)"
            )
        pad_lengths = cache.pad_lengths if cache is not None and cache.padded else None
        positions: slice | torch.Tensor
        if cache is not None and cache.length is None:  # per-row lengths: the slots are a tensor
            start = cache.lengths.unsqueeze(1) + torch.arange(T, device=input_ids.device)  # (B, T)
            positions = start.clamp(max=self.config.context_length - 1)  # a free row may sit anywhere
        else:
            start = 0 if cache is None else cache.length
            end = start + T
            limit = self.config.context_length if cache is None else cache.max_length
            if end > limit:
                raise ValueError(
                    f"{end} tokens do not fit: the {'context' if cache is None else 'cache'} holds {limit}"
                )
            if pad_lengths is None:
                positions = slice(start, end)  # every row at the same offsets
            else:  # left-padded rows count from their first real token
                slots = torch.arange(start, end, device=input_ids.device)
                positions = (slots.unsqueeze(0) - pad_lengths.unsqueeze(1)).clamp(
                    0, self.config.context_length - 1
                )

        x = self.token_embedding(input_ids)  # (B, T, d_model)
        if self.position_embedding is not None:
            x = x + self.position_embedding.weight[positions]
        x = self.dropout(x)
        ctx = ForwardContext(
            start=start,
            length=T,
            positions=positions,
            device=input_ids.device,
            cache=cache,
            pad_lengths=pad_lengths,
            rope=self.rotary(positions, compute_dtype(x)) if self.rotary is not None else None,
        )
        for block in self.blocks:
            x = block(x, ctx)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        x = self.final_norm(x)
        if labels is not None:
            if type(self.lm_head) is nn.Linear:  # a plain matrix (not quantized, not an adapter)
                return linear_cross_entropy_sum(x, self.lm_head.weight, labels)
            return cross_entropy_sum(self.lm_head(x), labels)
        return self.lm_head(x)  # (B, T, vocab)

    def auxiliary_loss(self) -> torch.Tensor:
        """Extra training loss from the last forward (e.g. MoE load balance); 0 when no part has one."""
        total = self.token_embedding.weight.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            for part in (block.mixer, block.ffn):
                if hasattr(part, "auxiliary_loss"):
                    total = total + part.auxiliary_loss()
        return total

    def new_cache(
        self,
        batch_size: int,
        max_length: int | None = None,
        pad_lengths: Sequence[int] | torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty cache for `batch_size` rows of up to `max_length` slots (default: the context).

        `pad_lengths[b]` left-padding slots of row b are ignored by attention; slots beyond the context
        are allowed for padded rows as long as each row's positions stay inside it.
        """
        weight = self.token_embedding.weight
        max_length = self.config.context_length if max_length is None else max_length
        pads = None
        if pad_lengths is not None:
            pads = torch.as_tensor(pad_lengths, dtype=torch.long, device=weight.device)
            if pads.shape != (batch_size,) or bool((pads < 0).any()):
                raise ValueError(f"pad_lengths must be {batch_size} non-negative counts, got {pad_lengths}")
        limit = self.config.context_length + (int(pads.max()) if pads is not None else 0)
        if not 0 < max_length <= limit:
            raise ValueError(f"cache length {max_length} must be in 1..{limit}")
        layers = [
            block.mixer.new_layer_cache(batch_size, max_length, weight.device, dtype or weight.dtype)
            for block in self.blocks
        ]
        return KVCache(layers, max_length, batch_size, weight.device, pads)


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile(model) when enabled (training speed on GPU), else the model unchanged."""
    return torch.compile(model) if enabled else model
