"""Export a fucina model as one GGUF file for llama.cpp, tokenizer and chat template included.

Design choices, and why:
- Two llama.cpp architectures hold fucina models exactly:
    "llama": RoPE + RMSNorm + SwiGLU, any GQA, optional biases (a sliding window only when it covers the
             whole context, since llama.cpp's llama graph has none);
    "gpt2":  learned positions + LayerNorm + GELU-tanh MLP, multi-head attention (llama.cpp's gpt2 graph
             uses the tanh GELU; exact GELU or SiLU would not be the same function). A model without
             biases gets zero biases, which gpt2 requires and which change nothing.
  PicoDAC's layout (learned positions + RMSNorm) has no llama.cpp architecture, and neither have MoE,
  state-space or latent-attention blocks: those are refused with the reason (use the HF export).
- Q and K rows are permuted for llama: our RoPE rotates the two halves of each head (HF's rotate_half),
  llama.cpp's llama graph rotates adjacent pairs, so each head's rows are reordered from
  [x_0..x_{d/2-1}, x_{d/2}..] to interleaved pairs, exactly as convert_hf_to_gguf.py's LlamaModel.permute
  does for HF LLaMA checkpoints.
- Tensor types: norms and biases stay f32; matrices are in the type asked (GGUF_QUANTS: every type the
  `gguf` package can write). The block types (q8_0, q5_1, q5_0, q4_1, q4_0) need rows whose length is a
  multiple of 32 (their block); a matrix that is not falls back to f16, as convert_hf_to_gguf.py does.
  At 4 and 5 bits the token embedding and the output head are written in q8_0, as fucina's int4 keeps
  its head in int8 (and llama.cpp's own 4-bit mixes keep the head at 6-8 bits): their errors land
  directly on every logit.
- The tokenizer is written as llama.cpp's byte-level BPE ("gpt2" model): the byte-level token strings in
  id order, their types (chat special tokens CONTROL, padding rows of a vocabulary larger than the
  tokenizer UNUSED), the merges in rank order, the bos/eos/pad ids (and the template's other stop token
  as end-of-turn), no automatic BOS, and `tokenizer.ggml.pre` from
  fucina.tokenizer.LLAMA_CPP_PRETOKENIZER (the llama.cpp pre-tokenizer whose splits our "italian" pieces
  refine, and "gpt-2" for "bytelevel"), so an unpatched llama.cpp tokenizes text to our ids. The Jinja chat template goes in
  tokenizer.chat_template.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fucina.fsutil import staged_output
from fucina.interop.architecture import describe, unsupported_parts
from fucina.interop.source import ExportError, ExportSource
from fucina.model.config import ModelConfig
from fucina.model.rope_scaling import ntk_base, parse_rope_scaling
from fucina.tokenizer import LLAMA_CPP_PRETOKENIZER, FucinaTokenizer, bpe_merges

log = logging.getLogger(__name__)

GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
GGUF_BLOCK = 32  # elements per block of every q* type above
LOW_BIT_QUANTS = ("q5_1", "q5_0", "q4_1", "q4_0")  # token embedding and head in q8_0 (module docstring)
KEPT_AT_8_BITS = ("token_embd.weight", "output.weight")


@dataclass(frozen=True)
class GGUFExport:
    """What was written: the file, its llama.cpp architecture and its tensor type."""

    path: Path
    architecture: str
    quant: str
    tensors: int


def gguf_architecture(config: ModelConfig) -> str:
    """The llama.cpp architecture ("llama" or "gpt2") for `config`; ExportError when there is none."""
    problems = unsupported_parts(config)
    if problems:
        raise ExportError(f"a model with {'; '.join(problems)} cannot be exported to GGUF (use --format hf)")
    if config.positions == "rope" and config.norm == "rmsnorm" and config.mlp == "swiglu":
        if config.sliding_window is not None and config.sliding_window < config.context_length:
            raise ExportError(
                f"llama.cpp's llama architecture has no sliding window ({config.sliding_window} < context "
                f"{config.context_length}): cannot export this model to GGUF (use --format hf)"
            )
        return "llama"
    if config.positions == "learned" and config.norm == "layernorm" and config.mlp == "gelu_tanh":
        if config.kv_heads != config.n_heads or config.head_size * config.n_heads != config.d_model:
            raise ExportError(
                "llama.cpp's gpt2 architecture needs plain multi-head attention (no GQA, no head_dim)"
            )
        return "gpt2"
    raise ExportError(
        f"llama.cpp has no architecture for a model with {describe(config)}: GGUF export supports LLaMA "
        "style (RoPE, RMSNorm, SwiGLU) and GPT-2 style (learned positions, LayerNorm, gelu_tanh MLP) "
        "models; PicoDAC, MoE and state-space models need --format hf"
    )


def export_gguf(
    source: ExportSource, out: str | Path, quant: str = "f16", overwrite: bool = False
) -> GGUFExport:
    """Write `source` as the GGUF file `out` with matrices in `quant` (one of GGUF_QUANTS)."""
    import gguf

    if quant not in GGUF_QUANTS:
        raise ExportError(f"--quant must be one of {', '.join(GGUF_QUANTS)}, got {quant!r}")
    config = source.model.config
    architecture = gguf_architecture(config)
    pretokenizer = LLAMA_CPP_PRETOKENIZER.get(source.tokenizer.pretokenizer)
    if pretokenizer is None:
        raise ExportError(
            f"the tokenizer's pre-tokenizer {source.tokenizer.pretokenizer!r} has no llama.cpp equivalent "
            f"(supported: {', '.join(LLAMA_CPP_PRETOKENIZER)})"
        )
    state = {name: t.detach().to("cpu", torch.float32) for name, t in source.model.state_dict().items()}
    tensors = list(_llama_tensors(config, state) if architecture == "llama" else _gpt2_tensors(config, state))
    with staged_output(out, overwrite=overwrite, is_dir=False, protected=source.model_dir) as tmp:
        writer = gguf.GGUFWriter(tmp, architecture)
        _write_hyperparameters(writer, architecture, config, source, quant)
        _write_tokenizer(writer, source.tokenizer, config.vocab_size, pretokenizer)
        for name, array in tensors:
            data, dtype = _encode(
                array, "q8_0" if quant in LOW_BIT_QUANTS and name in KEPT_AT_8_BITS else quant
            )
            writer.add_tensor(name, data, raw_dtype=dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    log.info("wrote %s (%s, %s, %d tensors)", out, architecture, quant, len(tensors))
    return GGUFExport(Path(out), architecture, quant, len(tensors))


# --- hyperparameters and tokenizer -------------------------------------------------------------------------


def _write_hyperparameters(
    writer, architecture: str, config: ModelConfig, source: ExportSource, quant: str
) -> None:
    import gguf

    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
        "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
        "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }
    writer.add_name(source.run_dir.name if source.run_dir is not None else source.model_dir.name)
    writer.add_file_type(file_types[quant])
    if quant.startswith("q"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ff_size)
    writer.add_head_count(config.n_heads)
    writer.add_vocab_size(config.vocab_size)
    if architecture == "llama":
        writer.add_head_count_kv(config.kv_heads)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_rope_dimension_count(config.head_size)
        _write_rope(writer, config)
        if config.head_size * config.n_heads != config.d_model:
            writer.add_key_length(config.head_size)
            writer.add_value_length(config.head_size)
    else:
        writer.add_layer_norm_eps(config.norm_eps)


def _write_rope(writer, config: ModelConfig) -> None:
    """RoPE's base and scaling as llama.cpp reads them (`{arch}.rope.freq_base`, `.rope.scaling.*`):
    linear and yarn have scaling types; static NTK-aware is the raised base (model/rope_scaling.py)."""
    import gguf

    scaling = parse_rope_scaling(config.rope_scaling)
    if scaling is None or scaling.rope_type == "ntk":
        base = (
            config.rope_base
            if scaling is None
            else ntk_base(config.rope_base, scaling.factor, config.head_size)
        )
        writer.add_rope_freq_base(base)
        return
    writer.add_rope_freq_base(config.rope_base)
    if scaling.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling.factor)
        return
    if scaling.attention_factor is not None and scaling.attention_factor != scaling.default_attention_factor:
        raise ExportError(
            "rope_scaling.attention_factor: llama.cpp derives YaRN's from the factor; cannot export"
        )
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(scaling.factor)
    writer.add_rope_scaling_orig_ctx_len(scaling.original_context_length)
    writer.add_rope_scaling_yarn_beta_fast(scaling.beta_fast)
    writer.add_rope_scaling_yarn_beta_slow(scaling.beta_slow)


def _write_tokenizer(writer, tok: FucinaTokenizer, vocab_size: int, pretokenizer: str) -> None:
    import gguf

    tokens, types = [], []
    for i in range(vocab_size):
        token = tok.id_to_token(i) if i < tok.vocab_size else None
        if token is None:  # model rows beyond the tokenizer: never produced, named like convert_hf_to_gguf
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if i in tok.special_ids else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pretokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{left} {right}" for left, right in bpe_merges(tok.backend)])
    if tok.bos_id is not None:
        writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    if tok.pad_id is not None:
        writer.add_pad_token_id(tok.pad_id)
    if tok.unk_id is not None:
        writer.add_unk_token_id(tok.unk_id)
    end_of_turn = [i for i in tok.template.stop_token_ids(tok) if i != tok.eos_id]
    if end_of_turn:
        writer.add_eot_token_id(end_of_turn[0])
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tok.template.jinja)


# --- tensors -----------------------------------------------------------------------------------------------


def permute_for_llama_cpp(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from the rotate_half layout to llama.cpp's interleaved RoPE pairs.

    Same as convert_hf_to_gguf.py's LlamaModel.permute; works for weights (rows, in) and biases (rows,).
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])  # (heads, halves, hd/2, ...)
        .swapaxes(1, 2)  # (heads, hd/2, halves, ...): pair i of a head = (x_i, x_{i + hd/2})
        .reshape(weight.shape)
    )


def _llama_tensors(config: ModelConfig, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, np.ndarray]]:
    q_size, kv_size = config.n_heads * config.head_size, config.kv_heads * config.head_size
    yield "token_embd.weight", state["token_embedding.weight"]
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        yield theirs + "attn_norm.weight", state[ours + "mixer_norm.weight"]
        for kind in ("weight", "bias"):
            fused = state.get(f"{ours}mixer.qkv_proj.{kind}")
            if fused is None:
                continue
            q, k, v = fused.split([q_size, kv_size, kv_size])
            yield f"{theirs}attn_q.{kind}", permute_for_llama_cpp(q, config.n_heads)
            yield f"{theirs}attn_k.{kind}", permute_for_llama_cpp(k, config.kv_heads)
            yield f"{theirs}attn_v.{kind}", v
            yield f"{theirs}attn_output.{kind}", state[f"{ours}mixer.out_proj.{kind}"]
            gate, up = state[f"{ours}ffn.gate_up_proj.{kind}"].chunk(2)
            yield f"{theirs}ffn_gate.{kind}", gate
            yield f"{theirs}ffn_up.{kind}", up
            yield f"{theirs}ffn_down.{kind}", state[f"{ours}ffn.down_proj.{kind}"]
        yield theirs + "ffn_norm.weight", state[ours + "ffn_norm.weight"]
    yield "output_norm.weight", state["final_norm.weight"]
    if not config.tie_embeddings:
        yield "output.weight", state["lm_head.weight"]


def _gpt2_tensors(config: ModelConfig, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, np.ndarray]]:
    d, ff = config.d_model, config.ff_size

    def bias(name: str, size: int) -> torch.Tensor:
        return state.get(name, torch.zeros(size))  # llama.cpp's gpt2 requires biases: zeros change nothing

    yield "token_embd.weight", state["token_embedding.weight"]
    yield "position_embd.weight", state["position_embedding.weight"]
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        yield theirs + "attn_norm.weight", state[ours + "mixer_norm.weight"]
        yield theirs + "attn_norm.bias", state[ours + "mixer_norm.bias"]
        yield theirs + "attn_qkv.weight", state[ours + "mixer.qkv_proj.weight"]
        yield theirs + "attn_qkv.bias", bias(ours + "mixer.qkv_proj.bias", 3 * d)
        yield theirs + "attn_output.weight", state[ours + "mixer.out_proj.weight"]
        yield theirs + "attn_output.bias", bias(ours + "mixer.out_proj.bias", d)
        yield theirs + "ffn_norm.weight", state[ours + "ffn_norm.weight"]
        yield theirs + "ffn_norm.bias", state[ours + "ffn_norm.bias"]
        yield theirs + "ffn_up.weight", state[ours + "ffn.up_proj.weight"]
        yield theirs + "ffn_up.bias", bias(ours + "ffn.up_proj.bias", ff)
        yield theirs + "ffn_down.weight", state[ours + "ffn.down_proj.weight"]
        yield theirs + "ffn_down.bias", bias(ours + "ffn.down_proj.bias", d)
    yield "output_norm.weight", state["final_norm.weight"]
    yield "output_norm.bias", state["final_norm.bias"]
    if not config.tie_embeddings:
        yield "output.weight", state["lm_head.weight"]


def _encode(tensor: torch.Tensor, quant: str):
    """(array, GGML type) of one tensor: vectors in f32, matrices in `quant` (f16 if rows aren't whole blocks)."""
    import gguf

    array = tensor.contiguous().numpy()
    if array.ndim == 1 or quant == "f32":
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    if quant == "f16" or (quant != "bf16" and array.shape[-1] % GGUF_BLOCK):
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16
    kind = gguf.GGMLQuantizationType[quant.upper()]
    return gguf.quants.quantize(array.astype(np.float32), kind), kind
