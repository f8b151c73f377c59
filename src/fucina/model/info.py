"""Accounting for a ModelConfig: parameters, FLOPs, KV cache and memory, without real weights.

Everything is computed from a model built on the meta device (no memory, no init) and from hooks on the
mixer / feed-forward classes, so new kinds (MoE active parameters, MLA's latent cache) report correctly
by defining their own hooks (see registry.py).

Formulas (stated so they can be checked):
- FLOPs per token, forward = 2 * (weights multiplied per token: block projections, plus the LM head even
  when tied) + the mixers' sequence term (attention: 4 * n_heads * head_dim * attended span per layer,
  span = context or window, as Kaplan et al. / PaLM count it). Training = 3 * forward (~6N + 12*L*H*hd*T).
- KV cache per token and layer = 2 (K and V) * n_kv_heads * head_dim * bytes per value.
- Training memory = weights (fp32, 4 B/param) + gradients (fp32, 4 B) + AdamW moments (fp32, 8 B)
  + activations. Activations per token = per layer (2 norm inputs of d_model + what the mixer and the
  feed-forward keep for backward: qkv input, q/k/v, attention output; MLP input, pre-activation,
  activation) * activation bytes (2 under bf16 autocast, 4 in fp32), plus the logits (vocab * (activation
  bytes + 8): the logits, their fp32 copy for the loss and its gradient). With gradient checkpointing only
  each block's input (d_model) is kept, plus one block's activations while it is recomputed. Fused
  attention keeps no (T x T) matrix. Allocator overhead and temporary buffers are not counted: expect
  real peaks some 10-30% higher.
- Inference memory = weights (in the run dtype) + the KV cache for the whole context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fucina.model.config import ModelConfig
from fucina.model.registry import FEED_FORWARDS, MIXERS
from fucina.model.transformer import Transformer

DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclass
class ParameterCounts:
    """Parameters by component; `total` counts a tied matrix once."""

    embeddings: int  # token embedding (+ learned positions)
    attention: int  # the sequence mixers of all layers
    feed_forward: int
    norms: int
    head: int  # the LM head when untied (0 when tied to the embedding)
    total: int
    active: int  # used per token (less than total only when a part defines active_parameters)
    matmul: int  # weights multiplied per token: active mixer/ffn weights + the LM head (tied or not)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embeddings


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_parameters(config: ModelConfig) -> ParameterCounts:
    """Parameter counts of the model `config` describes (built on the meta device)."""
    with torch.device("meta"):
        model = Transformer(config)
    embeddings = _numel(model.token_embedding)
    if model.position_embedding is not None:
        embeddings += _numel(model.position_embedding)
    attention = feed_forward = norms = active_parts = 0
    for block in model.blocks:
        attention += _numel(block.mixer)
        feed_forward += _numel(block.ffn)
        norms += _numel(block.mixer_norm) + _numel(block.ffn_norm)
        for part in (block.mixer, block.ffn):
            active_parts += part.active_parameters() if hasattr(part, "active_parameters") else _numel(part)
    norms += _numel(model.final_norm)
    head = 0 if config.tie_embeddings else _numel(model.lm_head)
    total = _numel(model)
    inactive = attention + feed_forward - active_parts
    return ParameterCounts(
        embeddings=embeddings,
        attention=attention,
        feed_forward=feed_forward,
        norms=norms,
        head=head,
        total=total,
        active=total - inactive,
        matmul=active_parts + config.vocab_size * config.d_model,
    )


@dataclass
class FlopsPerToken:
    forward: int
    training: int
    parameter_term: int  # 2 * matmul weights
    sequence_term: int  # attention scores and weighted sums over the context


def flops_per_token(config: ModelConfig, context_length: int | None = None) -> FlopsPerToken:
    """Forward and training FLOPs per token at `context_length` (default: the model's context)."""
    span = context_length or config.context_length
    parameter_term = 2 * count_parameters(config).matmul
    sequence_term = sum(
        MIXERS[config.mixer_name(i)].sequence_flops_per_token(config, i, span) for i in range(config.n_layers)
    )
    forward = parameter_term + sequence_term
    return FlopsPerToken(forward, 3 * forward, parameter_term, sequence_term)


def cache_bytes_per_token(config: ModelConfig, dtype_bytes: int) -> list[int]:
    """Bytes of generation cache per token, one entry per layer."""
    return [
        MIXERS[config.mixer_name(i)].cache_bytes_per_token(config, i, dtype_bytes)
        for i in range(config.n_layers)
    ]


def _activation_elements_per_token(config: ModelConfig, layer_index: int) -> int:
    mixer = MIXERS[config.mixer_name(layer_index)].activation_elements_per_token(config, layer_index)
    ffn = FEED_FORWARDS[config.ffn_name(layer_index)].activation_elements_per_token(config, layer_index)
    return 2 * config.d_model + mixer + ffn


@dataclass
class TrainingMemory:
    """Bytes needed to train with AdamW at one batch shape (see the module docstring)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def training_memory(
    config: ModelConfig,
    batch_size: int,
    context_length: int | None = None,
    activation_bytes: int = 2,
    gradient_checkpointing: bool | None = None,
) -> TrainingMemory:
    """Memory to train `config` on batches of batch_size x context_length tokens."""
    tokens = batch_size * (context_length or config.context_length)
    params = count_parameters(config).total
    per_layer = [_activation_elements_per_token(config, i) for i in range(config.n_layers)]
    checkpointing = (
        config.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    )
    kept = config.n_layers * config.d_model + max(per_layer) if checkpointing else sum(per_layer)
    kept += 2 * config.d_model  # embedding output, final norm input
    activations = tokens * (kept * activation_bytes + config.vocab_size * (activation_bytes + 8))
    return TrainingMemory(
        weights=4 * params, gradients=4 * params, optimizer=8 * params, activations=activations
    )


@dataclass
class InferenceMemory:
    weights: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def inference_memory(
    config: ModelConfig, dtype_bytes: int = 2, batch_size: int = 1, context_length: int | None = None
) -> InferenceMemory:
    """Memory to generate with `config`: weights plus a full-context KV cache per row."""
    tokens = batch_size * (context_length or config.context_length)
    return InferenceMemory(
        weights=count_parameters(config).total * dtype_bytes,
        kv_cache=tokens * sum(cache_bytes_per_token(config, dtype_bytes)),
    )


def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:,.0f} {unit}" if unit == "B" else f"{n_bytes:,.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError("unreachable")


def _count(n: int) -> str:
    return f"{n:,} ({n / 1e6:.2f}M)"


def describe(
    config: ModelConfig, name: str = "model", batch_size: int = 8, context_length: int | None = None
) -> str:
    """A human-readable report of everything above, as printed by `fucina model info`."""
    span = context_length or config.context_length
    counts = count_parameters(config)
    flops = flops_per_token(config, span)
    mixers = sorted({config.mixer_name(i) for i in range(config.n_layers)})
    windowed = [i for i in range(config.n_layers) if config.window(i) is not None]
    heads = f"{config.n_heads} heads ({config.kv_heads} kv, head_dim {config.head_size})"
    lines = [
        f"{name}: {config.n_layers} layers, d_model {config.d_model}, {heads}, d_ff {config.ff_size} "
        f"{config.mlp}, {config.positions} positions, {config.norm}, "
        f"{'tied' if config.tie_embeddings else 'untied'} head, {'with' if config.bias else 'no'} biases, "
        f"vocab {config.vocab_size}, context {config.context_length}",
        f"  mixers: {', '.join(mixers)}"
        + (
            f"; sliding window {config.sliding_window} on {len(windowed)} of {config.n_layers} layers"
            if windowed
            else ""
        ),
        f"parameters: {_count(counts.total)} total",
        f"  embeddings     {_count(counts.embeddings)}",
        f"  attention      {_count(counts.attention)}",
        f"  feed-forward   {_count(counts.feed_forward)}",
        f"  norms          {_count(counts.norms)}",
        f"  head           {_count(counts.head)}"
        + ("  (tied to the embedding)" if config.tie_embeddings else ""),
        f"  non-embedding  {_count(counts.non_embedding)}",
    ]
    if counts.active != counts.total:
        lines.append(f"  active per token {_count(counts.active)}")
    lines += [
        f"FLOPs per token at context {span}: forward {flops.forward / 1e6:,.1f} MFLOP "
        f"(2 x {counts.matmul:,} matmul weights + {flops.sequence_term / 1e6:,.1f} M attention), "
        f"training {flops.training / 1e6:,.1f} MFLOP (3 x forward)",
    ]
    for label, dtype_bytes in DTYPE_BYTES.items():
        per_layer = cache_bytes_per_token(config, dtype_bytes)
        lines.append(
            f"KV cache per token ({label}): {_size(per_layer[0])} per layer, {_size(sum(per_layer))} all layers; "
            f"{_size(sum(per_layer) * config.context_length)} for the full context"
        )
    if windowed:
        lines.append("  (sliding-window layers keep the full cache and mask it: see fucina/model/cache.py)")
    for label, act_bytes in (("bf16 autocast", 2), ("fp32", 4)):
        memory = training_memory(config, batch_size, span, activation_bytes=act_bytes)
        lines.append(
            f"train memory ({label}, batch {batch_size} x {span}, AdamW): {_size(memory.total)} = weights "
            f"{_size(memory.weights)} + grads {_size(memory.gradients)} + AdamW {_size(memory.optimizer)} "
            f"+ activations {_size(memory.activations)}"
        )
    for label, dtype_bytes in DTYPE_BYTES.items():
        memory = inference_memory(config, dtype_bytes)
        lines.append(
            f"run memory ({label}, batch 1, full context {config.context_length}): {_size(memory.total)} = "
            f"weights {_size(memory.weights)} + KV cache {_size(memory.kv_cache)}"
        )
    lines.append(
        "formulas: train = 16 B/param (fp32 weights, grads, AdamW m and v) + activations (per token: each "
        "layer's saved tensors x activation bytes + vocab x (activation bytes + 8) for the logits); "
        "see fucina/model/info.py"
    )
    return "\n".join(lines)
