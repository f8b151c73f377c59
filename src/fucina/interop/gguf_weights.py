"""Read the matrices of a GGUF file written by `export_gguf` back into fucina's layout, dequantized.

Why: what a GGUF quantization level (q8_0, q4_0, ...) costs in accuracy is then measured with fucina's
own evaluation on exactly the weights llama.cpp reads (bench/decode_speed.py reports bits per byte
per level), and tests can check that the quantized blocks hold our weights (rows, permutation, order).
Only the LLaMA layout (export_gguf's "llama" architecture) is read: the inverse of its tensor table,
q and k rows permuted back to rotate_half order, q|k|v and gate|up fused again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fucina.interop.source import ExportError
from fucina.model.transformer import Transformer


def _unpermute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of gguf.permute_for_llama_cpp: interleaved RoPE pairs back to the two-halves layout."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])  # (heads, hd/2, pair, ...)
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_matrices(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file by its llama.cpp name, dequantized to float32 in (rows, columns) order."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest axis first
        tensors[tensor.name] = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)
    return tensors


def load_gguf_weights(model: Transformer, path: str | Path) -> Transformer:
    """Load the (dequantized) weights of the llama-layout GGUF file `path` into `model`, strictly."""
    config = model.config
    tensors = gguf_matrices(path)
    if "position_embd.weight" in tensors or "blk.0.attn_qkv.weight" in tensors:
        raise ExportError(f"{path}: only the llama layout of export_gguf can be read back")
    state = {"token_embedding.weight": tensors["token_embd.weight"]}
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        state[ours + "mixer_norm.weight"] = tensors[theirs + "attn_norm.weight"]
        state[ours + "ffn_norm.weight"] = tensors[theirs + "ffn_norm.weight"]
        for kind in ("weight", "bias"):
            if f"{theirs}attn_q.{kind}" not in tensors:
                continue
            q = _unpermute(tensors[f"{theirs}attn_q.{kind}"], config.n_heads)
            k = _unpermute(tensors[f"{theirs}attn_k.{kind}"], config.kv_heads)
            state[f"{ours}mixer.qkv_proj.{kind}"] = torch.cat((q, k, tensors[f"{theirs}attn_v.{kind}"]))
            state[f"{ours}mixer.out_proj.{kind}"] = tensors[f"{theirs}attn_output.{kind}"]
            gate, up = tensors[f"{theirs}ffn_gate.{kind}"], tensors[f"{theirs}ffn_up.{kind}"]
            state[f"{ours}ffn.gate_up_proj.{kind}"] = torch.cat((gate, up))
            state[f"{ours}ffn.down_proj.{kind}"] = tensors[f"{theirs}ffn_down.{kind}"]
    state["final_norm.weight"] = tensors["output_norm.weight"]
    if not config.tie_embeddings:
        state["lm_head.weight"] = tensors["output.weight"]
    dtype = next(model.parameters()).dtype
    model.load_state_dict({name: t.to(dtype) for name, t in state.items()}, strict=True)
    return model
