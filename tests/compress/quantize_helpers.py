"""Small model directories for the quantization tests (as training writes them), in tmp_path."""

from __future__ import annotations

from pathlib import Path

import torch

from fucina.model.config import ModelConfig
from fucina.model.io import save_model
from fucina.model.transformer import Transformer
from fucina.tokenizer import FucinaTokenizer

# Widths that are multiples of 32 and others that are not (PicoDAC's 240-style padding of int4 rows).
CONFIGS = {
    "llama": ModelConfig(
        vocab_size=320,
        context_length=64,
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        d_ff=160,
        positions="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        tie_embeddings=False,
    ),
    "picodac": ModelConfig(
        vocab_size=320,
        context_length=64,
        n_layers=2,
        d_model=48,
        n_heads=4,
        d_ff=200,
        positions="learned",
        norm="rmsnorm",
        mlp="silu",
        bias=True,
        tie_embeddings=True,
    ),
}


def make_model_dir(directory: Path, name: str, tokenizer: FucinaTokenizer | None, seed: int = 0) -> Path:
    """A model directory as training writes it, with a model at its usual random initialisation."""
    torch.manual_seed(seed)
    model = Transformer(CONFIGS[name]).eval()
    save_model(model, directory)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory
