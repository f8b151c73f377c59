"""Import Hugging Face checkpoints (GPT-2, LLaMA, Mistral) from a local directory into fucina models.

Design choices:
- The HF model class is never instantiated: `config.json` is mapped onto a ModelConfig and the tensors
  are read straight from `model.safetensors` (single or sharded through its `.index.json`), or from
  `pytorch_model.bin` with `torch.load(weights_only=True)`, which unpickles tensors only, never code.
- Names and layouts come from hf_mapping.py's table of the architecture, the one the export reads too
  (GPT-2's Conv1D matrices transposed, LLaMA's q/k/v_proj concatenated into `qkv_proj` and gate/up_proj
  into `gate_up_proj`). Both use the "rotate_half" RoPE layout fucina uses, so no rows are permuted.
  Every tensor of the checkpoint must be used (bar known buffers such as GPT-2's causal-mask
  `attn.bias`), and every fucina weight must be found: a mismatch is an error.
- Anything fucina cannot compute exactly is refused with a FucinaError naming the config key
  (rope scaling, attention biases without MLP biases, cross-attention, other activations...), rather
  than imported into a model that would silently compute something else.
- Dropout is set to 0 (the HF `*_pdrop` values are training settings, not part of the function).
- Tokenizers: a byte-level BPE `tokenizer.json` (GPT-2, LLaMA 3) becomes a FucinaTokenizer with a chat
  template. Special tokens of the template the checkpoint lacks (for GPT-2 and "chatml":
  `<|im_start|>`, `<|im_end|>`) are appended, and the model's embedding (and untied head) grow by as
  many rows, set to the mean of the existing rows: the logits of the original vocabulary are unchanged
  and a new token's logit is the average one, so the base model never prefers it before fine-tuning.
  SentencePiece-style tokenizers (LLaMA 2, Mistral) are not byte-level and are not imported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fucina.errors import CheckpointError, TokenizerError
from fucina.interop.hf_mapping import GPT2, LLAMA, LM_HEAD, HFTable
from fucina.model.config import ModelConfig
from fucina.model.io import read_json_object, read_safetensors
from fucina.model.transformer import Transformer

logger = logging.getLogger(__name__)

HF_CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILE = "tokenizer.json"

# GPT-2 activation names (transformers ACT2FN) that fucina's MLP computes exactly.
_GPT2_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "silu": "silu",
    "swish": "silu",
}
# Checkpoint tensors that are buffers, not weights: recomputed by fucina, safe to skip.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


class UnsupportedCheckpointError(CheckpointError):
    """The checkpoint uses an architecture or a feature that fucina's model cannot compute."""


# Reading -------------------------------------------------------------------------------------------
def read_hf_config(directory: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of an HF checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"Hugging Face checkpoint directory not found: {directory}")
    return read_json_object(directory / HF_CONFIG_FILE, "save the model with save_pretrained")


def _shard_files(directory: Path, index_name: str) -> list[Path]:
    index_path = directory / index_name
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path}: unreadable shard index ({err})") from None
    return [directory / name for name in sorted(set(weight_map.values()))]


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path, "an HF checkpoint holds model.safetensors or its shards")


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses any pickle that is not plain tensors
        raise CheckpointError(f"{path}: not a plain tensor checkpoint ({err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return state


def read_hf_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `directory`, by its HF name (safetensors preferred)."""
    directory = Path(directory)
    if (directory / SAFETENSORS_FILE).is_file():
        return _read_safetensors(directory / SAFETENSORS_FILE)
    if (directory / SAFETENSORS_INDEX).is_file():
        files, reader = _shard_files(directory, SAFETENSORS_INDEX), _read_safetensors
    elif (directory / TORCH_FILE).is_file():
        return _read_torch(directory / TORCH_FILE)
    elif (directory / TORCH_INDEX).is_file():
        files, reader = _shard_files(directory, TORCH_INDEX), _read_torch
    else:
        raise CheckpointError(f"{directory}: no {SAFETENSORS_FILE}, {TORCH_FILE} or shard index found")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(reader(file))
    return weights


# Configs -------------------------------------------------------------------------------------------
def _require(hf: dict[str, Any], key: str, where: Path) -> Any:
    if hf.get(key) is None:
        raise CheckpointError(f"{where}: missing key {key!r}")
    return hf[key]


def _refuse(where: Path, key: str, value: Any, why: str) -> None:
    raise UnsupportedCheckpointError(f"{where}: {key}={value!r} is not supported: {why}")


def _sizes(mapping: HFTable, hf: dict[str, Any], where: Path) -> dict[str, Any]:
    """The ModelConfig size fields read from `hf` through `mapping`'s config table."""
    return {field.field: field.read(hf, where) for field in mapping.config_fields}


def _gpt2_config(hf: dict[str, Any], where: Path) -> ModelConfig:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _GPT2_ACTIVATIONS:
        _refuse(where, "activation_function", activation, f"use one of {', '.join(_GPT2_ACTIVATIONS)}")
    if hf.get("add_cross_attention"):
        _refuse(where, "add_cross_attention", True, "fucina models are decoder-only")
    if hf.get("scale_attn_weights", True) is not True:
        _refuse(where, "scale_attn_weights", hf["scale_attn_weights"], "attention is always scaled")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        _refuse(where, "scale_attn_by_inverse_layer_idx", True, "no per-layer attention scaling")
    vocab_size = _require(hf, "vocab_size", where)
    sizes = _sizes(GPT2, hf, where)
    sizes["d_ff"] = sizes["d_ff"] or 4 * sizes["d_model"]
    return ModelConfig(
        vocab_size=vocab_size,
        **sizes,
        positions="learned",
        norm="layernorm",
        mlp=_GPT2_ACTIVATIONS[activation],
        bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        dropout=0.0,
    )


def _rope_base(hf: dict[str, Any], where: Path) -> float:
    """rope_theta from transformers 4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`) configs."""
    parameters = hf.get("rope_parameters") or {}
    if parameters.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse(
            where, "partial_rotary_factor", parameters["partial_rotary_factor"], "RoPE rotates whole heads"
        )
    return float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0)))


# RoPE scaling read from config.json: the rope types fucina computes (model/rope_scaling.py).
_YARN_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings"}
_YARN_KEYS |= {"beta_fast", "beta_slow", "attention_factor", "truncate"}


def _rope_scaling(hf: dict[str, Any], where: Path) -> dict[str, Any] | None:
    """`model.rope_scaling` from `rope_parameters` (transformers 5) or `rope_scaling` (4); linear and
    yarn are read, every other scaling (dynamic, longrope, llama3, DeepSeek's mscale) is refused."""
    for key in ("rope_parameters", "rope_scaling"):
        scaling = hf.get(key) or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type != "default":
            break
    else:
        return None
    if rope_type not in ("linear", "yarn"):
        _refuse(where, f"{key}.rope_type", rope_type, "fucina computes linear, ntk (static) and yarn scaling")
    factor = float(scaling.get("factor") or 1.0)
    context = int(hf.get("max_position_embeddings", 0)) or None
    if rope_type == "linear":
        original = round(context / factor) if context else 1
        return {"rope_type": "linear", "factor": factor, "original_context_length": max(original, 1)}
    extra = sorted(k for k in scaling if k not in _YARN_KEYS and scaling[k] is not None)
    if extra or scaling.get("truncate", True) is False:
        _refuse(
            where,
            f"{key}.{(extra or ['truncate'])[0]}",
            scaling.get((extra or ["truncate"])[0]),
            "yarn is read with "
            "factor, original_max_position_embeddings, beta_fast, beta_slow and attention_factor only",
        )
    result = {
        "rope_type": "yarn",
        "factor": factor,
        "original_context_length": int(scaling.get("original_max_position_embeddings") or context),
    }
    for name in ("beta_fast", "beta_slow", "attention_factor"):
        if scaling.get(name) is not None:
            result[name] = float(scaling[name])
    return result


def _llama_config(hf: dict[str, Any], where: Path) -> ModelConfig:
    activation = hf.get("hidden_act", "silu")
    if activation != "silu":
        _refuse(where, "hidden_act", activation, "the gated MLP (SwiGLU) uses silu")
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        key = "attention_bias" if attention_bias else "mlp_bias"
        _refuse(where, key, True, "fucina puts biases on all block projections or on none")
    sizes = _sizes(LLAMA, hf, where)
    sizes["n_kv_heads"] = sizes["n_kv_heads"] or sizes["n_heads"]
    if sizes["head_dim"] == sizes["d_model"] // sizes["n_heads"]:
        sizes["head_dim"] = None  # the default: config.json keeps the plain layout
    sliding_window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    return ModelConfig(
        **sizes,
        positions="rope",
        rope_base=_rope_base(hf, where),
        rope_scaling=_rope_scaling(hf, where),
        norm="rmsnorm",
        mlp="swiglu",
        bias=attention_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dropout=0.0,
        sliding_window=sliding_window,
    )


# Weights -------------------------------------------------------------------------------------------
class _Tensors:
    """The checkpoint's tensors by name, with a record of which ones were used."""

    def __init__(self, weights: dict[str, torch.Tensor], prefix: str, where: Path):
        self.where = where
        self.prefix = prefix
        # Checkpoints saved from the base model (GPT2Model, the original gpt2 files) lack the prefix.
        self.original_names = {name.removeprefix(prefix): name for name in weights}
        self.weights = {name.removeprefix(prefix): tensor for name, tensor in weights.items()}
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name.removeprefix(self.prefix) in self.weights

    def take(self, name: str) -> torch.Tensor:
        """The tensor of the *ForCausalLM name `name` (prefixed or not in the checkpoint)."""
        name = name.removeprefix(self.prefix)
        if name not in self.weights:
            raise CheckpointError(f"{self.where}: tensor {name!r} is missing from the checkpoint")
        self.used.add(name)
        return self.weights[name]

    def check_all_used(self) -> None:
        unused = sorted(
            self.original_names[name]
            for name in set(self.weights) - self.used
            if not name.endswith(_IGNORED_SUFFIXES)
        )
        if unused:
            shown = ", ".join(unused[:3]) + (", ..." if len(unused) > 3 else "")
            raise UnsupportedCheckpointError(
                f"{self.where}: {len(unused)} checkpoint tensors have no place in a fucina model ({shown})"
            )


@dataclass(frozen=True)
class _Architecture:
    config: Callable[[dict[str, Any], Path], ModelConfig]
    mapping: HFTable  # names and layouts, shared with the export


ARCHITECTURES = {
    "gpt2": _Architecture(_gpt2_config, GPT2),
    "llama": _Architecture(_llama_config, LLAMA),
    "mistral": _Architecture(_llama_config, LLAMA),
}


def _architecture(hf: dict[str, Any], where: Path) -> _Architecture:
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        _refuse(where, "model_type", model_type, f"fucina imports {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def hf_model_config(directory: str | Path) -> ModelConfig:
    """The fucina ModelConfig equivalent to the HF checkpoint in `directory` (its config.json only)."""
    hf = read_hf_config(directory)
    where = Path(directory) / HF_CONFIG_FILE
    return _architecture(hf, where).config(hf, where)


def _converted_state(directory: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The ModelConfig and the fucina-named state dict (LM head included even when tied)."""
    hf = read_hf_config(directory)
    architecture = _architecture(hf, directory / HF_CONFIG_FILE)
    config = architecture.config(hf, directory / HF_CONFIG_FILE)
    tensors = _Tensors(read_hf_weights(directory), architecture.mapping.prefix, directory)
    state = architecture.mapping.from_hf(tensors.take, config, directory)
    if config.tie_embeddings and LM_HEAD in tensors:
        tensors.take(LM_HEAD)  # a tied copy saved anyway: the embedding stands for both
    tensors.check_all_used()
    return config, state


def _build_model(
    config: ModelConfig, state: dict[str, torch.Tensor], where: Path, device: str | torch.device, dtype
) -> Transformer:
    with torch.device(device):
        model = Transformer(config)
    expected = model.state_dict()
    for name, tensor in state.items():
        if name not in expected:
            raise CheckpointError(f"{where}: converted tensor {name} has no place in the model")
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{where}: tensor for {name} has shape {tuple(tensor.shape)}, the config implies "
                f"{tuple(expected[name].shape)}"
            )
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{where}: no checkpoint tensor for {', '.join(missing[:3])}")
    model.load_state_dict(state)
    return model.to(dtype=dtype).eval()


def import_hf_model(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """The fucina Transformer computing the same function as the HF checkpoint in `directory`.

    Supports GPT2LMHeadModel, LlamaForCausalLM and MistralForCausalLM saved with `save_pretrained`
    (safetensors or pytorch_model.bin, single or sharded). Unsupported features raise
    UnsupportedCheckpointError naming the config key; missing or extra tensors CheckpointError.
    """
    directory = Path(directory)
    config, state = _converted_state(directory)
    return _build_model(config, state, directory, device, dtype)


# Tokenizer -----------------------------------------------------------------------------------------
def _is_byte_level_bpe(spec: dict[str, Any]) -> bool:
    if (spec.get("model") or {}).get("type") != "BPE":
        return False
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(step.get("type") == "ByteLevel" for step in steps if isinstance(step, dict))


def _read_tokenizer(path: Path, template: str):
    """(FucinaTokenizer, the template's special tokens that had to be appended)."""
    from tokenizers import Tokenizer

    from fucina.chat_template import get_chat_template
    from fucina.tokenizer import FucinaTokenizer

    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"no tokenizer at {path}: expected {TOKENIZER_FILE}")
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
        backend = Tokenizer.from_file(str(file))
    except Exception as err:  # json or the Rust loader (which raises plain Exception)
        raise TokenizerError(f"{file}: not a valid tokenizer.json ({err})") from None
    if not _is_byte_level_bpe(spec):
        kind = (spec.get("model") or {}).get("type")
        raise TokenizerError(
            f"{file}: a {kind} tokenizer without byte-level pre-tokenization; fucina imports byte-level BPE "
            "tokenizers only (GPT-2, LLaMA 3)"
        )
    chat_template = get_chat_template(template)
    missing = [token for token in chat_template.special_tokens if backend.token_to_id(token) is None]
    if missing:
        backend.add_special_tokens(missing)
        logger.info("added the %s special tokens %s to the tokenizer of %s", template, missing, file)
    return FucinaTokenizer(backend, chat_template, pretokenizer="custom"), missing


def import_hf_tokenizer(path: str | Path, template: str = "chatml"):
    """A FucinaTokenizer from an HF byte-level BPE `tokenizer.json` (a file or its directory).

    The special tokens of the chat template `template` that the tokenizer lacks are appended as new
    special tokens (see the module docstring); TokenizerError when the tokenizer is not byte-level BPE.
    """
    return _read_tokenizer(Path(path), template)[0]


def _grow_vocabulary(state: dict[str, torch.Tensor], config: ModelConfig, size: int) -> ModelConfig:
    """Append rows to the embedding (and untied head) up to `size`, each the mean of the existing rows."""
    extra = size - config.vocab_size
    for name in ("token_embedding.weight", "lm_head.weight"):
        weight = state[name]
        state[name] = torch.cat((weight, weight.mean(dim=0, keepdim=True).expand(extra, -1)))
    if config.tie_embeddings:
        state["lm_head.weight"] = state["token_embedding.weight"]
    return dataclasses.replace(config, vocab_size=size)


@dataclass
class ImportResult:
    """What `import_hf_checkpoint` wrote."""

    out_dir: Path
    config: ModelConfig
    tokenizer_imported: bool
    added_tokens: tuple[str, ...]  # the chat template's special tokens appended to the tokenizer
    note: str  # why no tokenizer was imported, or ""


def import_hf_checkpoint(
    directory: str | Path,
    out_dir: str | Path,
    tokenizer: str | Path | None = None,
    template: str = "chatml",
    dtype: torch.dtype = torch.float32,
) -> ImportResult:
    """Write a fucina model directory into `out_dir` from the HF checkpoint in `directory`.

    `tokenizer`: a tokenizer.json (or its directory) to import instead of `directory`'s own; when the
    tokenizer is missing or not byte-level BPE, only the model is written and `note` says why.
    """
    from fucina.model.io import save_model

    directory, out_dir = Path(directory), Path(out_dir)
    config, state = _converted_state(directory)
    tokenizer_path = Path(tokenizer) if tokenizer is not None else directory
    fucina_tokenizer, note, added = None, "", []
    if tokenizer is None and not (directory / TOKENIZER_FILE).is_file():
        note = f"{directory} holds no {TOKENIZER_FILE}"
    else:
        try:
            fucina_tokenizer, added = _read_tokenizer(tokenizer_path, template)
        except TokenizerError as err:
            if tokenizer is not None:
                raise
            note = str(err)
    if fucina_tokenizer is not None:
        own_size = fucina_tokenizer.vocab_size - len(added)
        if own_size > config.vocab_size:
            raise TokenizerError(
                f"{tokenizer_path}: the tokenizer has {own_size} tokens but the model only {config.vocab_size}"
            )
        if fucina_tokenizer.vocab_size > config.vocab_size:
            config = _grow_vocabulary(state, config, fucina_tokenizer.vocab_size)
    model = _build_model(config, state, directory, "cpu", dtype)
    save_model(model, out_dir)
    if fucina_tokenizer is not None:
        fucina_tokenizer.save(out_dir)
    return ImportResult(out_dir, config, fucina_tokenizer is not None, tuple(added), note)
