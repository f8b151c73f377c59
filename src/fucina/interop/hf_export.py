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
- Weights are renamed and split from fucina's fused layouts (q|k|v rows of `qkv_proj`, gate|up rows of
  `gate_up_proj`; GPT-2's Conv1D wants them transposed), loaded into the real transformers class with
  every name checked, and written by the library's own `save_pretrained`: config.json and
  model.safetensors are exactly what transformers writes. A GPT-2 layout without biases gets zero
  biases (GPT-2's Conv1D always has them), which changes no output.
- The tokenizer is fucina's own tokenizer.json (it loads in PreTrainedTokenizerFast with identical ids)
  and tokenizer_config.json with the Jinja chat template, the special tokens and their ids
  (`added_tokens_decoder`); generation_config.json stops on every stop token of the chat template.
- The output directory is written aside and renamed into place (output.py); README.md is the model card.
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
from fucina.interop.model_card import write_model_card
from fucina.interop.source import ExportError, ExportSource
from fucina.model.config import ModelConfig
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
    hf_config, weights = _CONVERTERS[architecture](config, _float_state(source.model), source)
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


# --- configuration and weights per architecture -----------------------------------------------------------


def _float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", torch.float32) for name, tensor in model.state_dict().items()}


def _special_ids(source: ExportSource) -> dict[str, Any]:
    tok = source.tokenizer
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def _gpt2_block_fields(config: ModelConfig) -> dict:
    """The GPT-2-family config fields (shared by GPT2Config and ImageGPTConfig) of a fucina config."""
    return dict(
        n_positions=config.context_length,
        n_embd=config.d_model,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        n_inner=config.ff_size,
        activation_function=GPT2_ACTIVATIONS[config.mlp],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=config.norm_eps,
    )


def _gpt2(config: ModelConfig, state: dict[str, torch.Tensor], source: ExportSource):
    from transformers import GPT2Config

    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        **_gpt2_block_fields(config),
        tie_word_embeddings=config.tie_embeddings,
        **_special_ids(source),
    )

    def bias(name: str, size: int) -> torch.Tensor:
        return state.get(name, torch.zeros(size))  # a GPT-2 Conv1D always has a bias: zero changes nothing

    weights = {"transformer.wte.weight": state["token_embedding.weight"]}
    weights["transformer.wpe.weight"] = state["position_embedding.weight"]
    d, ff = config.d_model, config.ff_size
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        weights |= {
            theirs + "ln_1.weight": state[ours + "mixer_norm.weight"],
            theirs + "ln_1.bias": state[ours + "mixer_norm.bias"],
            theirs + "attn.c_attn.weight": state[ours + "mixer.qkv_proj.weight"].t(),  # Conv1D: (in, out)
            theirs + "attn.c_attn.bias": bias(ours + "mixer.qkv_proj.bias", 3 * d),
            theirs + "attn.c_proj.weight": state[ours + "mixer.out_proj.weight"].t(),
            theirs + "attn.c_proj.bias": bias(ours + "mixer.out_proj.bias", d),
            theirs + "ln_2.weight": state[ours + "ffn_norm.weight"],
            theirs + "ln_2.bias": state[ours + "ffn_norm.bias"],
            theirs + "mlp.c_fc.weight": state[ours + "ffn.up_proj.weight"].t(),
            theirs + "mlp.c_fc.bias": bias(ours + "ffn.up_proj.bias", ff),
            theirs + "mlp.c_proj.weight": state[ours + "ffn.down_proj.weight"].t(),
            theirs + "mlp.c_proj.bias": bias(ours + "ffn.down_proj.bias", d),
        }
    weights["transformer.ln_f.weight"] = state["final_norm.weight"]
    weights["transformer.ln_f.bias"] = state["final_norm.bias"]
    if not config.tie_embeddings:
        weights["lm_head.weight"] = state["lm_head.weight"]
    return hf_config, weights


def _llama_like_config(config: ModelConfig, source: ExportSource) -> dict[str, Any]:
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ff_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_size,
        max_position_embeddings=config.context_length,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        attention_dropout=0.0,
        **_special_ids(source),
    )


def _llama_like_weights(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LLaMA names for the embeddings, attention, norms and head (the MLP is added by the caller)."""
    q_size, kv_size = config.n_heads * config.head_size, config.kv_heads * config.head_size
    weights = {"model.embed_tokens.weight": state["token_embedding.weight"]}
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        weights[theirs + "input_layernorm.weight"] = state[ours + "mixer_norm.weight"]
        weights[theirs + "post_attention_layernorm.weight"] = state[ours + "ffn_norm.weight"]
        for kind in ("weight", "bias"):
            fused = state.get(f"{ours}mixer.qkv_proj.{kind}")
            if fused is None:
                continue
            q, k, v = fused.split([q_size, kv_size, kv_size])
            weights |= {
                f"{theirs}self_attn.q_proj.{kind}": q,
                f"{theirs}self_attn.k_proj.{kind}": k,
                f"{theirs}self_attn.v_proj.{kind}": v,
                f"{theirs}self_attn.o_proj.{kind}": state[f"{ours}mixer.out_proj.{kind}"],
                f"{theirs}mlp.down_proj.{kind}": state[f"{ours}ffn.down_proj.{kind}"],
            }
    weights["model.norm.weight"] = state["final_norm.weight"]
    if not config.tie_embeddings:
        weights["lm_head.weight"] = state["lm_head.weight"]
    return weights


def _swiglu_weights(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    weights = _llama_like_weights(config, state)
    for i in range(config.n_layers):
        for kind in ("weight", "bias"):
            fused = state.get(f"blocks.{i}.ffn.gate_up_proj.{kind}")
            if fused is not None:
                gate, up = fused.chunk(2)
                weights[f"model.layers.{i}.mlp.gate_proj.{kind}"] = gate
                weights[f"model.layers.{i}.mlp.up_proj.{kind}"] = up
    return weights


def _llama(config: ModelConfig, state: dict[str, torch.Tensor], source: ExportSource):
    from transformers import LlamaConfig

    hf_config = _make_config(
        LlamaConfig,
        **_llama_like_config(config, source),
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_base},
        attention_bias=config.bias,
        mlp_bias=config.bias,
    )
    return hf_config, _swiglu_weights(config, state)


def _mistral(config: ModelConfig, state: dict[str, torch.Tensor], source: ExportSource):
    from transformers import MistralConfig

    hf_config = _make_config(
        MistralConfig,
        **_llama_like_config(config, source),
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_base},
        sliding_window=config.sliding_window,
    )
    return hf_config, _swiglu_weights(config, state)


def _ministral(config: ModelConfig, state: dict[str, torch.Tensor], source: ExportSource):
    from transformers import MinistralConfig

    layer_types = [
        "sliding_attention" if config.window(i) is not None else "full_attention"
        for i in range(config.n_layers)
    ]
    hf_config = _make_config(
        MinistralConfig,
        **_llama_like_config(config, source),
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_base},
        sliding_window=config.sliding_window,
        layer_types=layer_types,
    )
    return hf_config, _swiglu_weights(config, state)


def _picodac(config: ModelConfig, state: dict[str, torch.Tensor], source: ExportSource):
    from fucina.interop.hf_remote.configuration_fucina_picodac import FucinaPicoDACConfig

    hf_config = _make_config(
        FucinaPicoDACConfig,
        **_llama_like_config(config, source),
        hidden_act={"gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}[config.mlp],
        attention_bias=config.bias,
        mlp_bias=config.bias,
    )
    weights = _llama_like_weights(config, state)
    weights["model.embed_positions.weight"] = state["position_embedding.weight"]
    for i in range(config.n_layers):
        for kind in ("weight", "bias"):
            up = state.get(f"blocks.{i}.ffn.up_proj.{kind}")
            if up is not None:
                weights[f"model.layers.{i}.mlp.up_proj.{kind}"] = up
    return hf_config, weights


def _imagegpt(config: ModelConfig, state: dict[str, torch.Tensor], source: ExportSource):
    from transformers import ImageGPTConfig

    hf_config = _make_config(
        ImageGPTConfig,
        vocab_size=config.vocab_size + 1,  # ImageGPT's head has vocab_size - 1 rows: see the module docstring
        **_gpt2_block_fields(config),
        tie_word_embeddings=False,
        **_special_ids(source),
    )
    # GPT-2's names and Conv1D layout; the RMS norms have no bias, so drop GPT-2's norm biases.
    _, weights = _gpt2(config, state | _zero_norm_biases(config, state), source)
    weights = {name: w for name, w in weights.items() if not (name.endswith(".bias") and ".ln_" in name)}
    embedding = state["token_embedding.weight"]
    weights["transformer.wte.weight"] = torch.cat((embedding, embedding.new_zeros(1, config.d_model)))
    weights["lm_head.weight"] = state["token_embedding.weight" if config.tie_embeddings else "lm_head.weight"]
    return hf_config, weights


def _zero_norm_biases(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Placeholder norm biases so _gpt2's mapping can be reused for RMS-normed models (removed after)."""
    names = ["final_norm.bias"] + [
        f"blocks.{i}.{norm}.bias" for i in range(config.n_layers) for norm in ("mixer_norm", "ffn_norm")
    ]
    return {name: torch.zeros(config.d_model) for name in names if name not in state}


_CONVERTERS: dict[str, Callable] = {
    "GPT2LMHeadModel": _gpt2,
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _mistral,
    "MinistralForCausalLM": _ministral,
    REMOTE_CODE_ARCHITECTURE: _picodac,
    IMAGEGPT_ARCHITECTURE: _imagegpt,
}


def _make_config(cls: type, **kwargs: Any):
    """A transformers config; its own validation errors (e.g. head counts) become ExportError."""
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
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
