"""One table per architecture between fucina's parameter names and Hugging Face transformers' names.

Design choices, and why:
- Import (hf_import.py, HF -> fucina) and export (hf_export.py, fucina -> HF) both read these tables,
  in the spirit of torchtitan's `StateDictAdapter.from_hf/to_hf`: a name or a layout fixed here is fixed
  in both directions, and a tensor one direction knows the other cannot miss.
- A row is declarative: our name, the HF name(s), how the tensor changes on the way, and when it exists.
  Names hold `{i}` for the layer index, expanded for every layer of the config. Transforms:
    GPT-2's Conv1D stores (in, out) matrices                      -> `transpose`
    our fused `qkv_proj` (q|k|v rows) and `gate_up_proj` (gate|up) -> several HF names, split by `sizes`
    ImageGPT's embedding has one extra, never-read row            -> `pad_rows`
  A row HF always has but fucina may not (GPT-2's Conv1D biases on a bias-free model) is `hf_requires`:
  export writes zeros, which change no output, and import refuses a non-zero one it would drop.
- HF names are those of the *ForCausalLM class (with its `transformer.` or `model.` prefix); the LM
  head is left out when the embeddings are tied, as transformers ties it on loading, except for
  ImageGPT whose head (one row shorter than its embedding) is never tied.
- The config fields that are plain sizes map one to one here too; what needs a decision (activations,
  RoPE scaling, sliding windows, refusals) stays in the importer and exporter, which own the checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fucina.errors import CheckpointError
from fucina.model.config import ModelConfig

LM_HEAD = "lm_head.weight"


def _always(config: ModelConfig) -> bool:
    return True


def _biased(config: ModelConfig) -> bool:
    return config.bias


def _untied(config: ModelConfig) -> bool:
    return not config.tie_embeddings


def _qkv_sizes(config: ModelConfig) -> list[int]:
    kv = config.kv_heads * config.head_size
    return [config.n_heads * config.head_size, kv, kv]


def _halves(config: ModelConfig) -> list[int]:
    return [config.ff_size, config.ff_size]


@dataclass(frozen=True)
class Row:
    """One of our tensors and the HF tensor(s) holding it; `{i}` in the names stands for the layer."""

    ours: str
    theirs: tuple[str, ...]
    transpose: bool = False  # HF stores the matrix as (in, out): GPT-2's Conv1D
    sizes: Callable[[ModelConfig], list[int]] | None = None  # row split of a fused tensor over `theirs`
    pad_rows: int = 0  # never-read zero rows HF appends (ImageGPT's image SOS token)
    when: Callable[[ModelConfig], bool] = _always  # whether fucina's model has this tensor
    hf_requires: bool = False  # a bias HF has even when fucina does not: zeros, which change nothing

    def to_hf(self, tensor: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
        """The HF tensor(s) holding our `tensor`."""
        if self.transpose:
            tensor = tensor.t()
        if self.pad_rows:
            tensor = torch.cat((tensor, tensor.new_zeros(self.pad_rows, *tensor.shape[1:])))
        if self.sizes is None:
            return [tensor]
        return list(tensor.split(self.sizes(config)))

    def from_hf(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Our tensor from the HF tensor(s), the inverse of `to_hf`."""
        tensor = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        if self.pad_rows:
            tensor = tensor[: -self.pad_rows]
        return tensor.t() if self.transpose else tensor


@dataclass(frozen=True)
class ConfigField:
    """A config.json key holding one of our sizes: import fills the ModelConfig `field` from it (`default`
    when the key is absent, an error when there is none), export writes the resolved `ours` into it."""

    hf: str
    field: str
    ours: str | None = None  # the ModelConfig attribute exported (ff_size for d_ff), when not `field`
    required: bool = True
    default: Any = None

    def value(self, config: ModelConfig) -> Any:
        """What export writes under `hf`."""
        return getattr(config, self.ours or self.field)

    def read(self, hf: dict[str, Any], where: object) -> Any:
        """What import takes from the config.json `hf`."""
        if hf.get(self.hf) is not None:
            return hf[self.hf]
        if self.required:
            raise CheckpointError(f"{where}: missing key {self.hf!r}")
        return self.default


@dataclass(frozen=True)
class HFTable:
    """The whole table of one architecture: global rows, per-layer rows, config sizes."""

    prefix: str  # of the base model inside the *ForCausalLM class ("transformer.", "model.")
    rows: tuple[Row, ...]
    layer_rows: tuple[Row, ...]
    config_fields: tuple[ConfigField, ...]

    def expand(self, config: ModelConfig) -> list[Row]:
        """Every row for `config`, layer templates filled in, rows fucina's model lacks kept only when
        HF requires them (their `when` tells which is which)."""
        rows = list(self.rows)
        for i in range(config.n_layers):
            rows += [
                dataclasses.replace(
                    row, ours=row.ours.format(i=i), theirs=tuple(name.format(i=i) for name in row.theirs)
                )
                for row in self.layer_rows
            ]
        return [row for row in rows if row.when(config) or row.hf_requires]

    def to_hf(self, state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        """HF-named tensors from our state dict (the LM head left out when tied, see the module doc)."""
        weights: dict[str, torch.Tensor] = {}
        for row in self.expand(config):
            if row.when(config):
                tensor = state[row.ours]
            else:  # a bias HF requires: one zero per output row of its weight
                weight = state[row.ours.removesuffix(".bias") + ".weight"]
                tensor = weight.new_zeros(weight.shape[0])
            weights |= dict(zip(row.theirs, row.to_hf(tensor, config), strict=True))
        return weights

    def from_hf(
        self, take: Callable[[str], torch.Tensor], config: ModelConfig, where: object
    ) -> dict[str, torch.Tensor]:
        """Our state dict (LM head included, tied or not) from HF tensors read by `take(name)`."""
        state: dict[str, torch.Tensor] = {}
        for row in self.expand(config):
            tensors = [take(name) for name in row.theirs]
            if row.when(config):
                state[row.ours] = row.from_hf(tensors)
            elif any(tensor.count_nonzero() for tensor in tensors):
                raise CheckpointError(
                    f"{where}: {', '.join(row.theirs)} is not zero, and a model of this config has no "
                    f"{row.ours}"
                )
        if LM_HEAD not in state:
            state[LM_HEAD] = state["token_embedding.weight"]
        return state


def _gpt2_rows(norm_bias: bool, pad_rows: int, head_always: bool) -> tuple[tuple[Row, ...], tuple[Row, ...]]:
    """GPT-2's names; ImageGPT shares them, with RMS norms (no bias), a padded embedding, an untied head."""
    rows = [
        Row("token_embedding.weight", ("transformer.wte.weight",), pad_rows=pad_rows),
        Row("position_embedding.weight", ("transformer.wpe.weight",)),
        Row("final_norm.weight", ("transformer.ln_f.weight",)),
        Row(LM_HEAD, (LM_HEAD,), when=_always if head_always else _untied),
    ]
    norms = [("mixer_norm", "ln_1"), ("ffn_norm", "ln_2")]
    layer_rows = [
        Row(f"blocks.{{i}}.{ours}.weight", (f"transformer.h.{{i}}.{hf}.weight",)) for ours, hf in norms
    ]
    if norm_bias:
        rows.append(Row("final_norm.bias", ("transformer.ln_f.bias",)))
        layer_rows += [
            Row(f"blocks.{{i}}.{ours}.bias", (f"transformer.h.{{i}}.{hf}.bias",)) for ours, hf in norms
        ]
    projections = [
        ("mixer.qkv_proj", "attn.c_attn"),
        ("mixer.out_proj", "attn.c_proj"),
        ("ffn.up_proj", "mlp.c_fc"),
        ("ffn.down_proj", "mlp.c_proj"),
    ]
    for ours, hf in projections:
        layer_rows.append(
            Row(f"blocks.{{i}}.{ours}.weight", (f"transformer.h.{{i}}.{hf}.weight",), transpose=True)
        )
        layer_rows.append(
            Row(
                f"blocks.{{i}}.{ours}.bias",
                (f"transformer.h.{{i}}.{hf}.bias",),
                when=_biased,
                hf_requires=True,
            )
        )
    return tuple(rows), tuple(layer_rows)


def _llama_rows(gated: bool, learned_positions: bool) -> tuple[tuple[Row, ...], tuple[Row, ...]]:
    """LLaMA's names (Mistral, Ministral and the PicoDAC remote code share them)."""
    rows = [
        Row("token_embedding.weight", ("model.embed_tokens.weight",)),
        Row("final_norm.weight", ("model.norm.weight",)),
        Row(LM_HEAD, (LM_HEAD,), when=_untied),
    ]
    if learned_positions:
        rows.insert(1, Row("position_embedding.weight", ("model.embed_positions.weight",)))
    layer = "model.layers.{i}."
    layer_rows = [
        Row("blocks.{i}.mixer_norm.weight", (layer + "input_layernorm.weight",)),
        Row("blocks.{i}.ffn_norm.weight", (layer + "post_attention_layernorm.weight",)),
    ]
    for kind, when in (("weight", _always), ("bias", _biased)):
        qkv = tuple(f"{layer}self_attn.{p}_proj.{kind}" for p in "qkv")
        layer_rows += [
            Row(f"blocks.{{i}}.mixer.qkv_proj.{kind}", qkv, sizes=_qkv_sizes, when=when),
            Row(f"blocks.{{i}}.mixer.out_proj.{kind}", (f"{layer}self_attn.o_proj.{kind}",), when=when),
        ]
        if gated:
            gate_up = (f"{layer}mlp.gate_proj.{kind}", f"{layer}mlp.up_proj.{kind}")
            layer_rows.append(Row(f"blocks.{{i}}.ffn.gate_up_proj.{kind}", gate_up, sizes=_halves, when=when))
        else:
            layer_rows.append(
                Row(f"blocks.{{i}}.ffn.up_proj.{kind}", (f"{layer}mlp.up_proj.{kind}",), when=when)
            )
        layer_rows.append(
            Row(f"blocks.{{i}}.ffn.down_proj.{kind}", (f"{layer}mlp.down_proj.{kind}",), when=when)
        )
    return tuple(rows), tuple(layer_rows)


# GPT-2's vocab_size is not here: ImageGPT declares one more token than the model has.
_GPT2_FIELDS = (
    ConfigField("n_positions", "context_length"),
    ConfigField("n_embd", "d_model"),
    ConfigField("n_layer", "n_layers"),
    ConfigField("n_head", "n_heads"),
    ConfigField("n_inner", "d_ff", "ff_size", required=False),  # absent: 4 * n_embd
    ConfigField("layer_norm_epsilon", "norm_eps", required=False, default=1e-5),
)
_LLAMA_FIELDS = (
    ConfigField("vocab_size", "vocab_size"),
    ConfigField("hidden_size", "d_model"),
    ConfigField("intermediate_size", "d_ff", "ff_size"),
    ConfigField("num_hidden_layers", "n_layers"),
    ConfigField("num_attention_heads", "n_heads"),
    ConfigField("num_key_value_heads", "n_kv_heads", "kv_heads", required=False),  # absent: MHA
    ConfigField("head_dim", "head_dim", "head_size", required=False),  # absent: hidden / heads
    ConfigField("max_position_embeddings", "context_length"),
    ConfigField("rms_norm_eps", "norm_eps", required=False, default=1e-6),
)

GPT2 = HFTable("transformer.", *_gpt2_rows(norm_bias=True, pad_rows=0, head_always=False), _GPT2_FIELDS)
IMAGEGPT = HFTable("transformer.", *_gpt2_rows(norm_bias=False, pad_rows=1, head_always=True), _GPT2_FIELDS)
LLAMA = HFTable("model.", *_llama_rows(gated=True, learned_positions=False), _LLAMA_FIELDS)
PICODAC = HFTable("model.", *_llama_rows(gated=False, learned_positions=True), _LLAMA_FIELDS)

# transformers class -> its table (the importer picks GPT2 or LLAMA by config.json's model_type)
TABLES: dict[str, HFTable] = {
    "GPT2LMHeadModel": GPT2,
    "ImageGPTForCausalImageModeling": IMAGEGPT,
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "MinistralForCausalLM": LLAMA,
    "FucinaPicoDACForCausalLM": PICODAC,
}
