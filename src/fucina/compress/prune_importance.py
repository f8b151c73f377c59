"""How much each attention head group, FFN channel and block matters: the scores pruning ranks by.

Design choices, and why:
- Activation importance follows Minitron (Muralidharan et al., 2024): run the model on a little
  calibration text and score each structure by what it actually produces there. A head's score is the
  mean over tokens of the L2 norm of its output (the slice of `out_proj`'s input it writes); an FFN
  channel's is the mean |activation| entering `down_proj` (after SwiGLU's gate); a block's is its Block
  Influence (Men et al., ShortGPT): 1 - the mean cosine similarity of the residual stream before and after
  the block, so a block that barely turns the stream scores near zero.
- Under GQA the unit of head pruning is a whole KV group (one key/value head and the query heads that
  share it), scored as the sum of its query heads: removing whole groups keeps n_heads a multiple of
  n_kv_heads and leaves every remaining query head its own keys and values. Multi-head attention is the
  case of groups of one head. With a single KV head (MQA) there is no group to drop, so the unit is one
  query head and the shared key/value head stays.
- Weight-magnitude importance needs no data: a head group by the norm of every row and column it owns
  (its q, k, v rows and its `out_proj` columns), a channel by the product of the norms of its input
  row(s) and its `down_proj` column (what it can write, whatever its input), a block by the norms of the
  matrices that write into the residual stream (`out_proj`, `down_proj`). The last is only a proxy:
  weights alone cannot say how a block turns its input; activation importance is the one to trust.
- Scores are float64 on CPU, one row per layer, so ranking never depends on the device or on ties
  broken differently by a reduced precision.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fucina.model.config import ModelConfig
from fucina.model.transformer import Transformer

METHODS = ("activation", "magnitude")


@dataclass
class Importance:
    """Scores of every prunable structure; higher means more important."""

    heads: torch.Tensor  # (n_layers, head_units(config)): one score per KV group (or query head, MQA)
    channels: torch.Tensor  # (n_layers, d_ff): one score per FFN hidden channel
    layers: torch.Tensor  # (n_layers,): one score per block
    method: str

    def negated(self) -> Importance:
        """The opposite ranking (the most important first to go): what pruning the wrong way costs."""
        return Importance(-self.heads, -self.channels, -self.layers, f"negated {self.method}")


def head_units(config: ModelConfig) -> int:
    """How many head units a layer has: its KV groups, or its query heads when one KV head is shared."""
    return config.n_heads if config.kv_heads == 1 else config.kv_heads


def heads_per_unit(config: ModelConfig) -> int:
    """Query heads in one head unit (the GQA group size; 1 for MHA and MQA)."""
    return 1 if config.kv_heads == 1 else config.n_heads // config.kv_heads


def _per_unit(config: ModelConfig, per_head: torch.Tensor) -> torch.Tensor:
    """(..., n_heads) query-head scores -> (..., head_units) unit scores (sums over each group)."""
    return per_head.unflatten(-1, (head_units(config), heads_per_unit(config))).sum(-1)


@torch.no_grad()
def activation_importance(model: Transformer, batches: Iterable[torch.Tensor]) -> Importance:
    """Minitron-style scores from forward passes over `batches` of token ids (B, T); see the module doc."""
    config = model.config
    L, H, hd = config.n_layers, config.n_heads, config.head_size
    head_sums = torch.zeros(L, H, dtype=torch.float64)
    channel_sums = torch.zeros(L, config.ff_size, dtype=torch.float64)
    cosine_sums = torch.zeros(L, dtype=torch.float64)
    tokens = 0
    hooks = []

    def record_heads(index: int):
        def hook(module, inputs):
            heads = inputs[0].reshape(-1, H, hd).float()  # (B*T, H, hd): each head's output
            head_sums[index] += heads.norm(dim=-1).sum(0).double().cpu()

        return hook

    def record_channels(index: int):
        def hook(module, inputs):
            hidden = inputs[0].reshape(-1, inputs[0].shape[-1]).float()  # (B*T, d_ff)
            channel_sums[index] += hidden.abs().sum(0).double().cpu()

        return hook

    def record_turn(index: int):
        def hook(module, inputs, output):
            before, after = inputs[0].float(), output.float()  # (B, T, d_model) each
            cosine_sums[index] += F.cosine_similarity(before, after, dim=-1).sum().double().cpu()

        return hook

    for index, block in enumerate(model.blocks):
        hooks.append(block.mixer.out_proj.register_forward_pre_hook(record_heads(index)))
        hooks.append(block.ffn.down_proj.register_forward_pre_hook(record_channels(index)))
        hooks.append(block.register_forward_hook(record_turn(index)))
    was_training = model.training
    model.eval()
    device = model.token_embedding.weight.device
    try:
        for batch in batches:
            model(batch.to(device))
            tokens += batch.numel()
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("activation importance needs at least one calibration batch")
    return Importance(
        heads=_per_unit(config, head_sums / tokens),
        channels=channel_sums / tokens,
        layers=1.0 - cosine_sums / tokens,
        method="activation",
    )


@torch.no_grad()
def magnitude_importance(model: Transformer) -> Importance:
    """Weight-norm scores, no data needed; see the module doc for what each score is."""
    config = model.config
    H, KV, hd, ff = config.n_heads, config.kv_heads, config.head_size, config.ff_size
    heads, channels, layers = [], [], []
    for block in model.blocks:
        attention, ffn = block.mixer, block.ffn
        qkv = attention.qkv_proj.weight.detach().double().cpu()
        q = qkv[: H * hd].reshape(H, hd, -1).pow(2).sum((1, 2))  # (H,) squared norms of each head's rows
        kv_rows = qkv[H * hd :].reshape(2, KV, hd, -1).pow(2).sum((0, 2, 3))  # (KV,) its k and v rows
        out = attention.out_proj.weight.detach().double().cpu()  # (d_model, H * hd)
        out_columns = out.reshape(-1, H, hd).pow(2).sum((0, 2))  # (H,)
        per_head = q + out_columns
        if KV == 1:  # MQA: units are query heads; the shared key/value head is never removed
            heads.append(per_head.sqrt())
        else:
            heads.append((_per_unit(config, per_head) + kv_rows).sqrt())
        down = ffn.down_proj.weight.detach().double().cpu()  # (d_model, d_ff)
        score = down.norm(dim=0)  # (d_ff,)
        if ffn.gated:
            gate_up = ffn.gate_up_proj.weight.detach().double().cpu()  # (2 d_ff, d_model)
            score = score * gate_up[:ff].norm(dim=1) * gate_up[ff:].norm(dim=1)
        else:
            score = score * ffn.up_proj.weight.detach().double().cpu().norm(dim=1)
        channels.append(score)
        layers.append(out.norm() + down.norm())
    return Importance(torch.stack(heads), torch.stack(channels), torch.stack(layers), "magnitude")
