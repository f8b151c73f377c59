"""Export a fucina model as a Hugging Face transformers model directory.

Design choices, and why:
- Each architecture becomes the standard transformers class that computes exactly the same function, so
  the export loads with `AutoModelForCausalLM.from_pretrained(dir)` and no custom code:
    learned positions + LayerNorm + non-gated MLP (GPT-2)      -> GPT2LMHeadModel
    RoPE + RMSNorm + SwiGLU (LLaMA)                             -> LlamaForCausalLM
    ... + a sliding window on every layer (Mistral)             -> MistralForCausalLM
    ... + a sliding window on some layers only                  -> MinistralForCausalLM (layer_types)
  PicoDAC's TinyGPT (learned positions + RMSNorm + non-gated MLP, tied head): of the 230 causal LM
  classes of transformers 5.x, the 38 with learned absolute positions all use LayerNorm. The one standard
  class that computes this network is ImageGPTForCausalImageModeling (GPT-2's block with an RMS norm,
  "ImageGPTLayerNorm", and any activation), which is the default (`picodac_class="imagegpt"`): no custom
  code. Its head has `vocab_size - 1` rows (the image SOS token is never predicted), so the export
  declares one extra, never-used embedding row and stores the head untied. Its price: it is not in
  AutoModelForCausalLM's mapping, so it loads as `ImageGPTForCausalImageModeling.from_pretrained(dir)`.
  `picodac_class="remote-code"` writes instead a small remote-code module (hf_remote/, `auto_map`) that
  loads through AutoModelForCausalLM (pipelines, chat UIs) with `trust_remote_code=True`.
  Anything else (LayerNorm with RoPE, a gated MLP with learned positions, MoE, state-space layers, ...)
  is refused with the reason.
- Weights are renamed and split from fucina's fused layouts by hf_mapping.py's table of the class (the
  one import reads too), loaded into the real transformers class with every name checked, and written
  by the library's own `save_pretrained`: config.json and model.safetensors are exactly what
  transformers writes. A GPT-2 layout without biases gets zero biases (GPT-2's Conv1D always has them),
  which changes no output.
- The tokenizer is fucina's own tokenizer.json (it loads in PreTrainedTokenizerFast with identical ids)
  and tokenizer_config.json with the Jinja chat template, the special tokens and their ids
  (`added_tokens_decoder`); generation_config.json stops on every stop token of the chat template.
- The output directory is written aside and renamed into place (fucina.fsutil); README.md is the model card.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fucina.fsutil import staged_output
from fucina.interop.architecture import describe, unsupported_parts
from fucina.interop.hf_mapping import GPT2, LLAMA, TABLES, HFTable
from fucina.interop.model_card import write_model_card
from fucina.interop.source import ExportError, ExportSource
from fucina.model.config import ModelConfig
from fucina.model.rope_scaling import ntk_base, parse_rope_scaling
from fucina.tokenizer import CONFIG_FILE as TOKENIZER_CONFIG_FILE

log = logging.getLogger(__name__)

GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}
REMOTE_CODE_ARCHITECTURE = "FucinaPicoDACForCausalLM"
IMAGEGPT_ARCHITECTURE = "ImageGPTForCausalImageModeling"
PICODAC_CLASSES = ("imagegpt", "remote-code")  # how a PicoDAC-style model is exported (module docstring)


@dataclass(frozen=True)
class HFExport:
    """What was written: where, as which transformers class, and whether it needs trust_remote_code."""

    path: Path
    architecture: str
    remote_code: bool
    parameters: int


def hf_architecture(config: ModelConfig, picodac_class: str = "imagegpt") -> str:
    """The transformers class a model of `config` is exported as; ExportError when none can hold it."""
    if picodac_class not in PICODAC_CLASSES:
        raise ExportError(
            f"--picodac-class must be one of {', '.join(PICODAC_CLASSES)}, got {picodac_class!r}"
        )
    problems = unsupported_parts(config)
    if problems:
        raise ExportError(
            f"a model with {'; '.join(problems)} cannot be exported to Hugging Face format: only "
            "attention + MLP blocks have a transformers counterpart"
        )
    gated = config.mlp == "swiglu"
    if config.positions == "learned" and config.norm == "layernorm" and not gated:
        if config.sliding_window is not None:
            raise ExportError("GPT-2 has no sliding-window attention: cannot export this model")
        if config.kv_heads != config.n_heads or config.head_size * config.n_heads != config.d_model:
            raise ExportError(
                "GPT-2 needs n_kv_heads == n_heads and head_dim * n_heads == d_model: cannot export "
                f"{config.kv_heads} kv heads of size {config.head_size} for {config.n_heads} heads"
            )
        return "GPT2LMHeadModel"
    if config.positions == "rope" and config.norm == "rmsnorm" and gated:
        if config.sliding_window is None:
            return "LlamaForCausalLM"
        if config.bias:
            raise ExportError(
                "Mistral has no projection biases: cannot export a sliding-window model with them"
            )
        if config.sliding_window_layers is None:
            return "MistralForCausalLM"
        return "MinistralForCausalLM"
    if config.positions == "learned" and config.norm == "rmsnorm" and not gated:
        if config.sliding_window is not None:
            raise ExportError("the PicoDAC export has no sliding-window attention: cannot export this model")
        if picodac_class == "remote-code":
            return REMOTE_CODE_ARCHITECTURE
        if config.kv_heads != config.n_heads or config.head_size * config.n_heads != config.d_model:
            raise ExportError(
                "ImageGPT needs n_kv_heads == n_heads and head_dim * n_heads == d_model: export this model "
                "with --picodac-class remote-code"
            )
        return IMAGEGPT_ARCHITECTURE
    raise ExportError(
        f"no transformers class computes a model with {describe(config)}; supported: GPT-2 style (learned "
        "positions, LayerNorm, GELU/SiLU MLP), LLaMA/Mistral style (RoPE, RMSNorm, SwiGLU) and PicoDAC "
        "style (learned positions, RMSNorm, non-gated MLP)"
    )


def export_hf(
    source: ExportSource, out: str | Path, overwrite: bool = False, picodac_class: str = "imagegpt"
) -> HFExport:
    """Write `source` as a transformers model directory at `out` (refused if it exists, unless overwrite).

    `picodac_class` chooses how a PicoDAC-style model is written: "imagegpt" or "remote-code".
    """
    config = source.model.config
    architecture = hf_architecture(config, picodac_class)
    hf_config = _CONFIGS[architecture](config, source)
    weights = TABLES[architecture].to_hf(_float_state(source.model), config)
    model = _build_hf_model(architecture, hf_config)
    _load_weights(model, weights, config.tie_embeddings and architecture != IMAGEGPT_ARCHITECTURE)
    model.generation_config = _generation_config(source)
    parameters = sum(p.numel() for p in source.model.parameters())  # the model's own count (tied once)
    with staged_output(out, overwrite=overwrite, is_dir=True, protected=source.model_dir) as tmp:
        model.save_pretrained(tmp)
        _write_tokenizer(source, tmp)
        write_model_card(
            source,
            tmp / "README.md",
            architecture=architecture,
            remote_code=architecture == REMOTE_CODE_ARCHITECTURE,
            export_format="hf",
        )
    path = Path(out)
    log.info("wrote %s (%s, %d parameters)", path, architecture, parameters)
    return HFExport(path, architecture, architecture == REMOTE_CODE_ARCHITECTURE, parameters)


# --- configuration per architecture (the weights follow hf_mapping's tables) ------------------------------


def _float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", torch.float32) for name, tensor in model.state_dict().items()}


def _special_ids(source: ExportSource) -> dict[str, Any]:
    tok = source.tokenizer
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def _sizes(mapping: HFTable, config: ModelConfig) -> dict[str, Any]:
    """The config.json size fields of `mapping`'s architecture, from a fucina config."""
    return {field.hf: field.value(config) for field in mapping.config_fields}


def _gpt2_block_fields(config: ModelConfig) -> dict:
    """The GPT-2-family config fields (shared by GPT2Config and ImageGPTConfig) of a fucina config."""
    return _sizes(GPT2, config) | dict(
        activation_function=GPT2_ACTIVATIONS[config.mlp], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )


def _gpt2(config: ModelConfig, source: ExportSource):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=config.vocab_size,
        **_gpt2_block_fields(config),
        tie_word_embeddings=config.tie_embeddings,
        **_special_ids(source),
    )


def _llama_like_config(config: ModelConfig, source: ExportSource) -> dict[str, Any]:
    return _sizes(LLAMA, config) | dict(
        tie_word_embeddings=config.tie_embeddings, attention_dropout=0.0, **_special_ids(source)
    )


def _rope(config: ModelConfig) -> dict[str, Any]:
    """transformers 5's `rope_parameters`, RoPE scaling included (model/rope_scaling.py): linear and yarn
    map to their rope types; static NTK-aware is plain RoPE with the raised base, the same numbers."""
    scaling = parse_rope_scaling(config.rope_scaling)
    if scaling is None:
        return {"rope_type": "default", "rope_theta": config.rope_base}
    if scaling.rope_type == "ntk":
        return {
            "rope_type": "default",
            "rope_theta": ntk_base(config.rope_base, scaling.factor, config.head_size),
        }
    parameters = {"rope_type": scaling.rope_type, "rope_theta": config.rope_base, "factor": scaling.factor}
    if scaling.rope_type == "yarn":
        parameters.update(
            original_max_position_embeddings=scaling.original_context_length,
            beta_fast=scaling.beta_fast,
            beta_slow=scaling.beta_slow,
            attention_factor=scaling.yarn_attention_factor,
        )
    return parameters


def _llama(config: ModelConfig, source: ExportSource):
    from transformers import LlamaConfig

    return _make_config(
        LlamaConfig,
        **_llama_like_config(config, source),
        hidden_act="silu",
        rope_parameters=_rope(config),
        attention_bias=config.bias,
        mlp_bias=config.bias,
    )


def _mistral(config: ModelConfig, source: ExportSource):
    from transformers import MistralConfig

    return _make_config(
        MistralConfig,
        **_llama_like_config(config, source),
        hidden_act="silu",
        rope_parameters=_rope(config),
        sliding_window=config.sliding_window,
    )


def _ministral(config: ModelConfig, source: ExportSource):
    from transformers import MinistralConfig

    layer_types = [
        "sliding_attention" if config.window(i) is not None else "full_attention"
        for i in range(config.n_layers)
    ]
    return _make_config(
        MinistralConfig,
        **_llama_like_config(config, source),
        hidden_act="silu",
        rope_parameters=_rope(config),
        sliding_window=config.sliding_window,
        layer_types=layer_types,
    )


def _picodac(config: ModelConfig, source: ExportSource):
    from fucina.interop.hf_remote.configuration_fucina_picodac import FucinaPicoDACConfig

    return _make_config(
        FucinaPicoDACConfig,
        **_llama_like_config(config, source),
        hidden_act={"gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}[config.mlp],
        attention_bias=config.bias,
        mlp_bias=config.bias,
    )


def _imagegpt(config: ModelConfig, source: ExportSource):
    from transformers import ImageGPTConfig

    return _make_config(
        ImageGPTConfig,
        vocab_size=config.vocab_size + 1,  # ImageGPT's head has vocab_size - 1 rows: see the module docstring
        **_gpt2_block_fields(config),
        tie_word_embeddings=False,
        **_special_ids(source),
    )


# transformers class -> the function building its config
_CONFIGS: dict[str, Callable] = {
    "GPT2LMHeadModel": _gpt2,
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _mistral,
    "MinistralForCausalLM": _ministral,
    REMOTE_CODE_ARCHITECTURE: _picodac,
    IMAGEGPT_ARCHITECTURE: _imagegpt,
}


def _make_config(cls: type, **kwargs: Any):
    """A transformers config; its own validation errors (e.g. head counts) become ExportError."""
    from huggingface_hub.errors import StrictDataclassError  # transformers 5 validates configs with it

    try:
        return cls(**kwargs)
    except (ValueError, TypeError, StrictDataclassError) as err:
        raise ExportError(f"transformers' {cls.__name__} refuses this model: {err}") from None


def _build_hf_model(architecture: str, hf_config) -> torch.nn.Module:
    if architecture == REMOTE_CODE_ARCHITECTURE:
        from fucina.interop.hf_remote.modeling_fucina_picodac import FucinaPicoDACForCausalLM

        # save_pretrained then copies the two remote-code files and writes config.json's auto_map.
        type(hf_config).register_for_auto_class()
        FucinaPicoDACForCausalLM.register_for_auto_class("AutoModelForCausalLM")
        return FucinaPicoDACForCausalLM(hf_config)
    import transformers

    return getattr(transformers, architecture)(hf_config)


def _load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], tied: bool) -> None:
    """Load `weights` into the transformers model, every name and shape checked."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights) - ({"lm_head.weight"} if tied else set()))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(
        name for name in weights if name in expected and weights[name].shape != expected[name].shape
    )
    if missing or unexpected or wrong:  # a bug in the mapping above, not a user error
        raise RuntimeError(
            f"weight mapping mismatch: missing {missing}, unexpected {unexpected}, shape {wrong}"
        )
    model.load_state_dict(weights, strict=False)
    if tied:
        model.tie_weights()
    model.eval()


def _generation_config(source: ExportSource):
    from transformers import GenerationConfig

    tok = source.tokenizer
    return GenerationConfig(
        bos_token_id=tok.bos_id,
        eos_token_id=tok.template.stop_token_ids(tok),
        pad_token_id=tok.pad_id,
    )


def _write_tokenizer(source: ExportSource, directory: Path) -> None:
    """tokenizer.json + tokenizer_config.json with the chat template, special tokens and their ids."""
    tok = source.tokenizer
    tok.save(directory)
    path = directory / TOKENIZER_CONFIG_FILE
    config = json.loads(path.read_text(encoding="utf-8"))
    config["model_max_length"] = source.model.config.context_length
    config["added_tokens_decoder"] = {
        str(i): {
            "content": tok.id_to_token(i),
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i in sorted(tok.special_ids)
    }
    path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
