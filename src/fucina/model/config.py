"""ModelConfig: one typed, validated object that selects every architectural choice.

Design choices:
- A flat dataclass, like litgpt's Config: every field is a plain value, so `config.json` is readable and
  `ModelConfig.from_dict` (fucina.config.from_dict) rejects unknown keys by name.
- Derived sizes stay `None` until read through a property (`kv_heads`, `head_size`, `ff_size`), so
  `dataclasses.replace(config, d_model=...)` never leaves a stale value behind.
- Swappable parts are chosen by *name* from registries (`mixer`, `ffn`, `linear`; see registry.py and
  linear.py), with optional per-layer lists (`layer_mixers`, `layer_ffns`), so a new architecture (MoE,
  MLA, Mamba, BitNet) slots in by registering a class, not by rewriting the model. A per-layer list
  either names every layer or is a pattern whose length divides `n_layers`, repeated over the layers
  (`layer_ffns: [mlp, moe]` alternates dense and MoE layers; Elleci's `[mamba, mamba, mla]`), so
  changing `n_layers` keeps the pattern.
- `mlp` names the feed-forward activation of the built-in MLP: "gelu" (exact), "gelu_tanh" (GPT-2's
  gelu_new), "silu" (non-gated), "swiglu" (LLaMA's gated SiLU, two input projections).
- Sliding-window attention (Mistral) applies to the layers in `sliding_window_layers` (all when None):
  query i attends keys j with i - window < j <= i.
- The fields of the other architectures carry a prefix naming the part that reads them (`moe_*` for
  ffn "moe", `mla_*` for mixer "mla", `mamba_*` for mixer "mamba"; see moe.py, mla.py, mamba.py). They
  are validated whether or not a layer uses that part, and their `None` sizes derive from the main ones
  like `head_dim` and `d_ff` do (DeepSeek-V2's and Mamba's own ratios). BitNet needs no field: it is
  `linear: "bitnet"` (bitnet.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from fucina.config import from_dict
from fucina.errors import ConfigError

POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLP_ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "swiglu")
MAMBA_SCANS = ("auto", "parallel", "sequential")
# Keys that config.json files once held and that no longer describe the architecture (gradient
# checkpointing became a training option, train.gradient_checkpointing).
RETIRED_KEYS = frozenset({"gradient_checkpointing"})


@dataclass
class ModelConfig:
    """Every choice that shapes a fucina Transformer; see the module docstring for the options."""

    vocab_size: int = 8000
    context_length: int = 256
    n_layers: int = 6
    d_model: int = 256
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: n_heads (MHA); 1 < n < n_heads: GQA; 1: MQA
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int | None = None  # None: 4 * d_model
    positions: Literal["learned", "rope"] = "learned"
    rope_base: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # longer context: linear, ntk or yarn (rope_scaling.py)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "gelu_tanh", "silu", "swiglu"] = "gelu"
    bias: bool = True  # biases of the attention and MLP projections
    tie_embeddings: bool = True
    dropout: float = 0.0
    sliding_window: int | None = None
    sliding_window_layers: list[int] | None = None  # None: every layer (when sliding_window is set)
    mixer: str = "attention"
    ffn: str = "mlp"
    layer_mixers: list[str] | None = None  # per layer, or a repeated pattern; overrides `mixer`
    layer_ffns: list[str] | None = None  # per layer, or a repeated pattern; overrides `ffn`
    linear: str = "dense"  # factory for the blocks' projection layers (linear.py)
    init_std: float = 0.02
    # Mixture of experts (ffn "moe", moe.py)
    moe_num_experts: int = 8
    moe_top_k: int = 2  # 1: Switch (gate = the top probability); 2+: Mixtral (top-k renormalised)
    moe_d_ff: int | None = None  # hidden size of one expert; None: d_ff
    moe_shared_experts: int = 0  # experts every token goes through (DeepSeekMoE), added to the routed ones
    moe_capacity_factor: float | None = None  # None: dropless; else Switch capacity, overflow dropped
    moe_aux_loss_weight: float = 0.01  # weight of the Switch load-balancing loss in auxiliary_loss()
    # Multi-head latent attention (mixer "mla", mla.py); None sizes follow DeepSeek-V2's ratios
    mla_q_lora_rank: int | None = None  # None: full-rank query projection (DeepSeek-V2-Lite)
    mla_kv_lora_rank: int | None = None  # the cached latent; None: 4 * head size
    mla_qk_nope_head_dim: int | None = None  # None: head size
    mla_qk_rope_head_dim: int | None = (
        None  # the decoupled RoPE key, shared by all heads; None: head size / 2
    )
    mla_v_head_dim: int | None = None  # None: head size
    # Selective state space (mixer "mamba", mamba.py); defaults are Mamba-1's
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | None = None  # None: ceil(d_model / 16)
    mamba_chunk_size: int = 64  # time steps per chunk of the training scan (bounds its temporaries)
    mamba_scan: Literal["auto", "parallel", "sequential"] = "auto"  # in-chunk scan; auto: parallel off-CPU

    def __post_init__(self) -> None:
        self._check_positive(
            "vocab_size", "context_length", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff"
        )
        for name, allowed in (
            ("positions", POSITIONS),
            ("norm", NORMS),
            ("mlp", MLP_ACTIVATIONS),
            ("mamba_scan", MAMBA_SCANS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}), "
                "or set model.head_dim"
            )
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.kv_heads})"
            )
        if self.positions == "rope" and self.head_size % 2:
            raise ConfigError(f"model.positions 'rope' needs an even head size, got {self.head_size}")
        if self.rope_base <= 0:
            raise ConfigError(f"model.rope_base must be positive, got {self.rope_base}")
        if self.norm_eps <= 0:
            raise ConfigError(f"model.norm_eps must be positive, got {self.norm_eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.init_std <= 0:
            raise ConfigError(f"model.init_std must be positive, got {self.init_std}")
        self._check_sliding_window()
        self._check_architecture_fields()
        self._check_registry_names()
        self._check_rope_scaling()

    def _check_rope_scaling(self) -> None:
        from fucina.model.rope_scaling import parse_rope_scaling

        if parse_rope_scaling(self.rope_scaling) is None:
            return
        rotated = self.positions == "rope" or any(self.mixer_name(i) == "mla" for i in range(self.n_layers))
        if not rotated:
            raise ConfigError(
                "model.rope_scaling needs RoPE (model.positions 'rope' or MLA layers); learned positions "
                "are extended by init_from with a larger model.context_length instead"
            )

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {value}")

    def _check_sliding_window(self) -> None:
        if self.sliding_window is None:
            if self.sliding_window_layers is not None:
                raise ConfigError("model.sliding_window_layers is set but model.sliding_window is not")
            return
        if self.sliding_window < 1:
            raise ConfigError(f"model.sliding_window must be a positive integer, got {self.sliding_window}")
        for index in self.sliding_window_layers or []:
            if not 0 <= index < self.n_layers:
                raise ConfigError(
                    f"model.sliding_window_layers: layer {index} does not exist (n_layers is {self.n_layers})"
                )

    def _check_architecture_fields(self) -> None:
        self._check_positive(
            "moe_num_experts",
            "moe_top_k",
            "moe_d_ff",
            "mla_q_lora_rank",
            "mla_kv_lora_rank",
            "mla_qk_nope_head_dim",
            "mla_qk_rope_head_dim",
            "mla_v_head_dim",
            "mamba_d_state",
            "mamba_d_conv",
            "mamba_expand",
            "mamba_dt_rank",
            "mamba_chunk_size",
        )
        if self.moe_top_k > self.moe_num_experts:
            raise ConfigError(
                f"model.moe_top_k ({self.moe_top_k}) exceeds model.moe_num_experts ({self.moe_num_experts})"
            )
        if self.moe_shared_experts < 0:
            raise ConfigError(f"model.moe_shared_experts must be >= 0, got {self.moe_shared_experts}")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            raise ConfigError(f"model.moe_capacity_factor must be positive, got {self.moe_capacity_factor}")
        if self.moe_aux_loss_weight < 0:
            raise ConfigError(f"model.moe_aux_loss_weight must be >= 0, got {self.moe_aux_loss_weight}")
        if self.mla_rope_dim % 2:
            raise ConfigError(
                f"model.mla_qk_rope_head_dim must be even (RoPE pairs), got {self.mla_rope_dim}"
            )

    def _check_registry_names(self) -> None:
        # Imported here: the registries import the layer classes, which only need this module for hints.
        from fucina.model.linear import LINEARS
        from fucina.model.registry import FEED_FORWARDS, MIXERS

        for field_name, registry in (("mixer", MIXERS), ("ffn", FEED_FORWARDS), ("linear", LINEARS)):
            _check_name(f"model.{field_name}", getattr(self, field_name), registry)
        for field_name, registry in (("layer_mixers", MIXERS), ("layer_ffns", FEED_FORWARDS)):
            names = getattr(self, field_name)
            if names is None:
                continue
            if not names or self.n_layers % len(names):
                raise ConfigError(
                    f"model.{field_name} lists {len(names)} names but model.n_layers is {self.n_layers}: "
                    "give one name per layer or a pattern whose length divides n_layers"
                )
            for index, name in enumerate(names):
                _check_name(f"model.{field_name}[{index}]", name, registry)

    # Derived sizes -------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (n_kv_heads, or n_heads when unset)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_size(self) -> int:
        """Size of one attention head (head_dim, or d_model // n_heads when unset)."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def ff_size(self) -> int:
        """Hidden size of the feed-forward network (d_ff, or 4 * d_model when unset)."""
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    @property
    def expert_ff_size(self) -> int:
        """Hidden size of one MoE expert (moe_d_ff, or ff_size when unset)."""
        return self.ff_size if self.moe_d_ff is None else self.moe_d_ff

    @property
    def mla_kv_rank(self) -> int:
        """Size of MLA's cached key/value latent (mla_kv_lora_rank, or 4 * head size)."""
        return 4 * self.head_size if self.mla_kv_lora_rank is None else self.mla_kv_lora_rank

    @property
    def mla_nope_dim(self) -> int:
        """Per-head query/key size without rotation (mla_qk_nope_head_dim, or the head size)."""
        return self.head_size if self.mla_qk_nope_head_dim is None else self.mla_qk_nope_head_dim

    @property
    def mla_rope_dim(self) -> int:
        """Size of MLA's rotated query/key part (mla_qk_rope_head_dim, or about half the head size)."""
        if self.mla_qk_rope_head_dim is not None:
            return self.mla_qk_rope_head_dim
        return 2 * max(1, self.head_size // 4)  # half the head, kept even

    @property
    def mla_value_dim(self) -> int:
        """Per-head value size of MLA (mla_v_head_dim, or the head size)."""
        return self.head_size if self.mla_v_head_dim is None else self.mla_v_head_dim

    @property
    def mamba_inner(self) -> int:
        """Channels of a Mamba layer (mamba_expand * d_model)."""
        return self.mamba_expand * self.d_model

    @property
    def mamba_dt_size(self) -> int:
        """Rank of Mamba's step-size projection (mamba_dt_rank, or ceil(d_model / 16))."""
        return -(-self.d_model // 16) if self.mamba_dt_rank is None else self.mamba_dt_rank

    def mixer_name(self, layer_index: int) -> str:
        """The registered mixer used by layer `layer_index`."""
        if self.layer_mixers is None:
            return self.mixer
        return self.layer_mixers[layer_index % len(self.layer_mixers)]

    def ffn_name(self, layer_index: int) -> str:
        """The registered feed-forward used by layer `layer_index`."""
        if self.layer_ffns is None:
            return self.ffn
        return self.layer_ffns[layer_index % len(self.layer_ffns)]

    def window(self, layer_index: int) -> int | None:
        """The sliding-window size of layer `layer_index`, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.sliding_window_layers is None or layer_index in self.sliding_window_layers:
            return self.sliding_window
        return None

    # Serialisation -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model") -> ModelConfig:
        """Build from plain data (config.json, YAML); unknown keys and bad values raise ConfigError.

        Keys in RETIRED_KEYS (fields that moved out of the architecture) are dropped, so config.json
        files written before the move still load.
        """
        return from_dict(cls, {k: v for k, v in data.items() if k not in RETIRED_KEYS}, where)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data that `from_dict` turns back into an equal config.

        `rope_scaling` is left out when unset, so unscaled models write the config.json they always did.
        """
        data = dataclasses.asdict(self)
        if data["rope_scaling"] is None:
            del data["rope_scaling"]
        return data


def _check_name(where: str, name: str, registry: dict[str, Any]) -> None:
    if name not in registry:
        raise ConfigError(f"{where}: unknown name {name!r} (known: {', '.join(sorted(registry))})")
