"""Accounting for a ModelConfig: parameters, FLOPs, KV cache and memory, without real weights.

Everything is computed from a model built on the meta device (no memory, no init) and from hooks on the
mixer / feed-forward classes, so new kinds (MoE active parameters, MLA's latent cache) report correctly
by defining their own hooks (see registry.py).

Formulas (stated so they can be checked):
- FLOPs per token, forward = 2 * (weights multiplied per token: block projections, plus the LM head even
  when tied) + the mixers' sequence term (attention: 4 * n_heads * head_dim * attended span per layer,
  span = context or window, as Kaplan et al. / PaLM count it). Training = 3 * forward (~6N + 12*L*H*hd*T).
- KV cache per token and layer = 2 (K and V) * n_kv_heads * head_dim * bytes per value for attention,
  (kv latent + rotated key) * bytes for MLA, 0 for Mamba, whose generation state has a fixed size per
  sequence instead (conv window + float32 SSM state: `state_bytes`).
- Active parameters (MoE): the router, shared experts and top_k experts per MoE layer, plus the rest.
- Training memory = weights (fp32, 4 B/param) + gradients (fp32, 4 B) + AdamW moments (fp32, 8 B)
  + activations. Activations per token = per layer (2 norm inputs of d_model + what the mixer and the
  feed-forward keep for backward: qkv input, q/k/v, attention output; MLP input, pre-activation,
  activation) * activation bytes (2 under bf16 autocast, 4 in fp32), plus the logits (vocab * (activation
  bytes + 8): the logits, their fp32 copy for the loss and its gradient). With gradient checkpointing only
  each block's input (d_model) is kept, plus one block's activations while it is recomputed. Fused
  attention keeps no (T x T) matrix. Allocator overhead and temporary buffers are not counted: expect
  real peaks some 10-30% higher.
- Inference memory = weights (in the run dtype) + the KV cache for the whole context + fixed states.
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


def state_bytes(config: ModelConfig, dtype_bytes: int) -> list[int]:
    """Bytes of fixed-size generation state per sequence (not per token), one entry per layer."""
    sizes = []
    for i in range(config.n_layers):
        mixer = MIXERS[config.mixer_name(i)]
        sizes.append(mixer.state_bytes(config, i, dtype_bytes) if hasattr(mixer, "state_bytes") else 0)
    return sizes


def attention_cache_comparison(config: ModelConfig, dtype_bytes: int) -> dict[str, int]:
    """Cache bytes per token and layer of MHA, GQA and MQA with this config's heads, next to MLA's.

    GQA uses the config's kv heads when it has fewer than its query heads, else n_heads / 4 when that
    divides the heads, else the largest divisor of n_heads up to n_heads / 2 (no GQA line when none).
    """
    heads, head_size = config.n_heads, config.head_size
    groups = config.kv_heads
    if groups >= heads:
        divisors = [d for d in range(2, heads // 2 + 1) if heads % d == 0]
        groups = heads // 4 if heads % 4 == 0 and heads >= 8 else max(divisors, default=1)
    sizes = {f"MHA ({heads} kv heads)": 2 * heads * head_size * dtype_bytes}
    if 1 < groups < heads:
        sizes[f"GQA ({groups} kv heads)"] = 2 * groups * head_size * dtype_bytes
    sizes["MQA (1 kv head)"] = 2 * head_size * dtype_bytes
    sizes["MLA"] = (config.mla_kv_rank + config.mla_rope_dim) * dtype_bytes
    return sizes


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
    gradient_checkpointing: bool = False,
) -> TrainingMemory:
    """Memory to train `config` on batches of batch_size x context_length tokens."""
    tokens = batch_size * (context_length or config.context_length)
    params = count_parameters(config).total
    per_layer = [_activation_elements_per_token(config, i) for i in range(config.n_layers)]
    kept = config.n_layers * config.d_model + max(per_layer) if gradient_checkpointing else sum(per_layer)
    kept += 2 * config.d_model  # embedding output, final norm input
    activations = tokens * (kept * activation_bytes + config.vocab_size * (activation_bytes + 8))
    return TrainingMemory(
        weights=4 * params, gradients=4 * params, optimizer=8 * params, activations=activations
    )


@dataclass
class InferenceMemory:
    weights: int
    kv_cache: int
    state: int = 0  # fixed-size recurrent states (Mamba), whatever the length

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.state


def inference_memory(
    config: ModelConfig, dtype_bytes: int = 2, batch_size: int = 1, context_length: int | None = None
) -> InferenceMemory:
    """Memory to generate with `config`: weights plus a full-context KV cache per row."""
    tokens = batch_size * (context_length or config.context_length)
    return InferenceMemory(
        weights=count_parameters(config).total * dtype_bytes,
        kv_cache=tokens * sum(cache_bytes_per_token(config, dtype_bytes)),
        state=batch_size * sum(state_bytes(config, dtype_bytes)),
    )


def ternary_weight_bytes(config: ModelConfig, dense_bytes: int = 2) -> int:
    """Weight bytes of a BitNet model packed by ternary_export: 2 bits per ternary weight + a float32
    scale per matrix, the other parameters at `dense_bytes` each (tied head once)."""
    from fucina.model.bitnet import BitLinear

    with torch.device("meta"):
        model = Transformer(config)
    ternary = [m.weight for m in model.modules() if isinstance(m, BitLinear)]
    packed = sum(-(-w.numel() // 4) + 4 for w in ternary)
    return packed + (_numel(model) - sum(w.numel() for w in ternary)) * dense_bytes


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
    mixers = _layer_kinds(config.mixer_name, config.n_layers)
    ffns = _layer_kinds(config.ffn_name, config.n_layers)
    windowed = [i for i in range(config.n_layers) if config.window(i) is not None]
    heads = f"{config.n_heads} heads ({config.kv_heads} kv, head_dim {config.head_size})"
    lines = [
        f"{name}: {config.n_layers} layers, d_model {config.d_model}, {heads}, d_ff {config.ff_size} "
        f"{config.mlp}, {config.positions} positions, {config.norm}, "
        f"{'tied' if config.tie_embeddings else 'untied'} head, {'with' if config.bias else 'no'} biases, "
        f"vocab {config.vocab_size}, context {config.context_length}",
        f"  mixers: {_kinds_text(mixers)}; feed-forward: {_kinds_text(ffns)}; linear: {config.linear}"
        + (
            f"; sliding window {config.sliding_window} on {len(windowed)} of {config.n_layers} layers"
            if windowed
            else ""
        ),
        *_architecture_lines(config, mixers, ffns),
        f"parameters: {_count(counts.total)} total",
        f"  embeddings     {_count(counts.embeddings)}",
        f"  {'attention' if list(mixers) == ['attention'] else 'mixers':14s} {_count(counts.attention)}",
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
        lines += _cache_lines(config, mixers, label, dtype_bytes)
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
            + (f" + recurrent state {_size(memory.state)}" if memory.state else "")
        )
    if config.linear == "bitnet":
        packed = ternary_weight_bytes(config)
        lines.append(
            f"run memory (ternary export: 2-bit projections + bf16 rest): weights {_size(packed)} "
            f"({packed / inference_memory(config, 2).weights:.0%} of bf16; see fucina/model/ternary_export.py)"
        )
    lines.append(
        "formulas: train = 16 B/param (fp32 weights, grads, AdamW m and v) + activations (per token: each "
        "layer's saved tensors x activation bytes + vocab x (activation bytes + 8) for the logits); "
        "see fucina/model/info.py"
    )
    return "\n".join(lines)


def _layer_kinds(name_of, n_layers: int) -> dict[str, list[int]]:
    """Registered name -> the layers using it, in first-use order."""
    kinds: dict[str, list[int]] = {}
    for i in range(n_layers):
        kinds.setdefault(name_of(i), []).append(i)
    return kinds


def _kinds_text(kinds: dict[str, list[int]]) -> str:
    if len(kinds) == 1:
        return next(iter(kinds))
    return ", ".join(f"{name} x {len(layers)}" for name, layers in kinds.items())


def _architecture_lines(config: ModelConfig, mixers: dict, ffns: dict) -> list[str]:
    """One line per non-default part: its sizes as used."""
    lines = []
    if "moe" in ffns:
        capacity = (
            "dropless"
            if config.moe_capacity_factor is None
            else f"capacity factor {config.moe_capacity_factor}"
        )
        lines.append(
            f"  moe: {config.moe_num_experts} experts of d_ff {config.expert_ff_size}, top-{config.moe_top_k}, "
            f"{config.moe_shared_experts} shared, {capacity}, balance loss weight {config.moe_aux_loss_weight}"
        )
    if "mla" in mixers:
        q = "full-rank q" if config.mla_q_lora_rank is None else f"q latent {config.mla_q_lora_rank}"
        lines.append(
            f"  mla: kv latent {config.mla_kv_rank}, {q}, qk nope {config.mla_nope_dim} + rope "
            f"{config.mla_rope_dim}, v {config.mla_value_dim} per head"
        )
    if "mamba" in mixers:
        lines.append(
            f"  mamba: d_inner {config.mamba_inner}, d_state {config.mamba_d_state}, d_conv "
            f"{config.mamba_d_conv}, dt rank {config.mamba_dt_size}, scan chunk {config.mamba_chunk_size} "
            f"({config.mamba_scan})"
        )
    return lines


def _cache_lines(config: ModelConfig, mixers: dict, label: str, dtype_bytes: int) -> list[str]:
    """KV cache per token (per kind of mixer when they differ), MLA against MHA/GQA, fixed states."""
    per_layer = cache_bytes_per_token(config, dtype_bytes)
    total = sum(per_layer)
    if len(mixers) == 1:
        split = f"{_size(per_layer[0])} per layer"
    else:
        split = ", ".join(
            f"{name} {_size(per_layer[layers[0]])} x {len(layers)}" for name, layers in mixers.items()
        )
    lines = [
        f"KV cache per token ({label}): {split}, {_size(total)} all layers; "
        f"{_size(total * config.context_length)} for the full context"
    ]
    if "mla" in mixers:
        comparison = attention_cache_comparison(config, dtype_bytes)
        mla = comparison.pop("MLA")
        lines.append(
            f"  MLA caches {_size(mla)} per token and layer; with the same heads "
            + ", ".join(
                f"{name} would cache {_size(size)} ({size / mla:.1f}x)" for name, size in comparison.items()
            )
        )
    states = state_bytes(config, dtype_bytes)
    if any(states):
        layers = [i for i, size in enumerate(states) if size]
        lines.append(
            f"recurrent state ({label}): {_size(states[layers[0]])} per layer x {len(layers)}, "
            f"{_size(sum(states))} per sequence whatever its length"
        )
    return lines
