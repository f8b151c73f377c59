"""Causal self-attention: multi-head, grouped-query or multi-query, optional sliding window.

Design choices:
- One fused projection `qkv_proj` produces queries, keys and values (rows ordered q | k | v): one matmul
  instead of three. GPT-2's `c_attn` is exactly this matrix (transposed, Conv1D); LLaMA's q/k/v_proj
  concatenate into it.
- `n_kv_heads` < `n_heads` shares each key/value head among n_heads / n_kv_heads query heads (GQA;
  MQA when 1). The cache stores only the kv heads.
- Attention runs through torch's fused scaled_dot_product_attention. Without a mask we pass
  `is_causal=True` (or nothing, for one new token), which keeps the flash/memory-efficient kernels;
  GQA then uses SDPA's `enable_gqa` when the kernel supports it, else repeats kv heads.
- One exception, a training concern: CPU training in half precision at moderate lengths (see
  `_explicit_is_faster`) uses the written-out path, because torch's CPU flash backward is several times
  slower there than plain bf16 matmuls. It needs gradients, so decoding never takes it.
- The layer calls `self.attend`, the plain function below; decoding swaps in its own kernels per model
  (fucina.inference.cpu_kernels), so this file holds no decoding tricks.
- `attention_reference` is the same computation written out (scores, mask, softmax, weighted sum): the
  tests check the fused path against it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fucina.model.cache import LayerKV
from fucina.model.linear import make_linear
from fucina.model.positions import apply_rotary

if TYPE_CHECKING:
    from fucina.model.config import ModelConfig
    from fucina.model.context import ForwardContext

_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)
_EXPLICIT_MAX_KEYS = 256  # longest key span for which CPU bf16 training uses the explicit path


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, KV, S, hd) -> (B, KV * n_rep, S, hd), each kv head repeated for its group of query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Fused attention of q (B, H, T, hd) over k, v (B, KV, S, hd); mask is boolean, True = attend."""
    if dropout_p == 0.0 and _explicit_is_faster(q, k):
        hidden = None if mask is None else ~mask
        if is_causal:  # query t sits at key slot S - T + t and must not see the keys after it
            T, S = q.size(-2), k.size(-2)
            hidden = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1)
        return _explicit_attention(q, k, v, hidden)
    n_rep = q.size(1) // k.size(1)
    if n_rep > 1:
        # SDPA's own GQA works in the flash kernels (CPU, and CUDA half precision) but would send fp32
        # CUDA and masked calls to the slow math kernel: there, repeating kv heads is faster.
        if _SDPA_HAS_GQA and mask is None and (q.device.type == "cpu" or q.dtype != torch.float32):
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=True
            )
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)


def _explicit_is_faster(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether plain matmuls + softmax beat SDPA: CPU training in half precision at moderate lengths.

    torch's CPU flash kernel computes its bf16 backward several times slower than bf16 matmuls with a
    float32 softmax (forward + backward, 8 x 6 heads x 64 tokens: 5.4 vs 1.2 ms); at 256 keys the two are
    on par (2 x 6 heads / 2 kv: 7.8 vs 7.5 ms) and from ~512 keys flash wins (it never holds the (B, H, T, S)
    scores), so the explicit path is limited to S <= 256; fp32 and inference keep SDPA.
    """
    return (
        q.requires_grad
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.device.type == "cpu"
        and k.size(-2) <= _EXPLICIT_MAX_KEYS
    )


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain-math attention (explicit softmax); same shapes and mask convention as `attend`."""
    return _explicit_attention(q, k, v, None if mask is None else ~mask)


def _explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd), hiding keys where `hidden` is True) v, the softmax in float32.

    GQA without copies: the n_rep query heads of one kv head are stacked along the query axis, so each kv
    head is read once by one matmul (no repeated keys/values, no reduction over copies in backward). A
    mask shared by the batch becomes a -inf bias added inside the score matmul (baddbmm, which also
    applies the 1/sqrt(hd) scale): no separate masking or scaling pass over the scores, forward or back.
    """
    B, H, T, hd = q.shape
    KV, S = k.size(1), k.size(2)
    rows = H // KV * T  # query rows per kv head
    q3 = q.reshape(B * KV, rows, hd)  # (B*KV, n_rep*T, hd)
    k3 = k.reshape(B * KV, S, hd).transpose(1, 2)  # (B*KV, hd, S)
    scale = 1.0 / math.sqrt(hd)
    if hidden is not None and hidden.dim() == 4 and hidden.size(0) == 1:
        hidden = hidden[0, 0]  # (T, S): one mask for every row
    if hidden is None:
        scores = torch.bmm(q3, k3).view(B, H, T, S) * scale
    elif hidden.dim() == 2:
        bias = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill_(hidden, float("-inf"))
        scores = torch.baddbmm(bias.repeat(H // KV, 1), q3, k3, alpha=scale).view(B, H, T, S)
    else:  # per-row masks (left padding)
        scores = (torch.bmm(q3, k3).view(B, H, T, S) * scale).masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # (B, H, T, S)
    out = torch.bmm(probs.view(B * KV, rows, S), v.reshape(B * KV, S, v.size(-1)))
    return out.view(B, H, T, v.size(-1))  # (B, H, T, hd_v)


class Attention(nn.Module):
    """Causal self-attention of one layer; `config.window(layer_index)` selects a sliding window."""

    fixed_shape_decoding = True  # accepts per-row slots (see cache.py): compiled decoding works
    attend = staticmethod(attend)  # the attention function; decoding may replace it on its own copy

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads = config.n_heads
        self.kv_heads = config.kv_heads
        self.head_dim = config.head_size
        self.window = config.window(layer_index)
        self.dropout_p = config.dropout
        q_size, kv_size = self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv_proj = make_linear(config, config.d_model, q_size + 2 * kv_size)
        self.out_proj = make_linear(config, q_size, config.d_model)
        self.out_proj.is_residual_output = True  # scaled at init (see transformer.py)
        self.resid_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None  # None: no call

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, d_model = x.shape
        H, KV, hd = self.n_heads, self.kv_heads, self.head_dim
        # Projections see 2-D (B*T, d) inputs: torch's linear on 3-D inputs adds reshape kernels per call.
        qkv = self.qkv_proj(x.reshape(B * T, d_model)).view(B, T, H + 2 * KV, hd)  # (B, T, H + 2 KV, hd)
        qk, v = qkv[:, :, : H + KV], qkv[:, :, H + KV :]
        if ctx.rope is not None:  # queries and keys rotated together: half the kernels
            qk = apply_rotary(qk, *ctx.rope)
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # (B, H or KV, T, hd)
        v = v.transpose(1, 2)  # (B, KV, T, hd)
        if ctx.cache is not None:
            k, v = ctx.cache.layers[self.layer_index].update(k, v, ctx.start)  # (B, KV, S, hd)
        mask, is_causal = ctx.attention_mask(self.window)
        y = self.attend(q, k, v, mask, is_causal, self.dropout_p if self.training else 0.0)  # (B, H, T, hd)
        y = self.out_proj(y.transpose(1, 2).reshape(B * T, H * hd)).view(B, T, d_model)
        return y if self.resid_dropout is None else self.resid_dropout(y)

    def new_layer_cache(
        self, batch_size: int, max_length: int, device: torch.device, dtype: torch.dtype
    ) -> LayerKV:
        """This layer's part of a KVCache."""
        return LayerKV(batch_size, self.kv_heads, max_length, self.head_dim, device, dtype)

    # Accounting hooks read by info.py (every mixer class provides them) ---------------------------
    @staticmethod
    def cache_bytes_per_token(config: ModelConfig, layer_index: int, dtype_bytes: int) -> int:
        """Bytes this layer caches per token: one key and one value per kv head."""
        return 2 * config.kv_heads * config.head_size * dtype_bytes

    @staticmethod
    def sequence_flops_per_token(config: ModelConfig, layer_index: int, context_length: int) -> int:
        """FLOPs beyond the projections, per token: q.k scores and the weighted sum of values.

        Counted over the full attended span (context or window), as Kaplan et al. and PaLM do; the
        causal mask halves the true average but kernels rarely realise that saving.
        """
        window = config.window(layer_index)
        attended = context_length if window is None else min(window, context_length)
        return 2 * 2 * config.n_heads * config.head_size * attended

    @staticmethod
    def activation_elements_per_token(config: ModelConfig, layer_index: int) -> int:
        """Values kept for the backward pass per token: qkv input, q/k/v, attention output."""
        q_size = config.n_heads * config.head_size
        return config.d_model + q_size + 2 * config.kv_heads * config.head_size + q_size
