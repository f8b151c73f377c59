"""Find and load a trained model: a model directory, or a run directory whose `best/` holds one.

A *model directory* holds `config.json` + `model.safetensors` (the model) and `tokenizer.json` +
`tokenizer_config.json` (the tokenizer with its chat template). Training writes one into `best/` (and
`final/`) of its run directory; every consumer (generate, chat, eval, export, serve) loads through here,
so "--model runs/x" means the same thing everywhere. A quantized model directory (`fucina quantize`, a
`fucina_quantization` marker in config.json) loads here too, with its int8/int4 layers in place.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fucina.errors import CheckpointError
from fucina.model.io import load_model
from fucina.model.transformer import Transformer
from fucina.tokenizer import FucinaTokenizer

MODEL_FILES = ("config.json", "model.safetensors")


def is_model_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in MODEL_FILES)


def resolve_model_dir(path: str | Path) -> Path:
    """`path` itself if it is a model directory, else its `best/`, else its `final/`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model not found: {path}")
    for candidate in (path, path / "best", path / "final"):
        if is_model_dir(candidate):
            return candidate
    raise CheckpointError(
        f"{path} holds no model: expected {' + '.join(MODEL_FILES)} in it or in its best/ subdirectory"
    )


def load_pretrained(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Transformer, FucinaTokenizer]:
    """Load model and tokenizer from a model or run directory; the tokenizer must fit the model."""
    from fucina.compress import is_quantized_dir, load_quantized

    model_dir = resolve_model_dir(path)
    if is_quantized_dir(model_dir):
        model = load_quantized(model_dir, device=device, dtype=dtype)
    else:
        model = load_model(model_dir, device=device, dtype=dtype)
    tokenizer = FucinaTokenizer.load(model_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"{model_dir}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size}"
        )
    return model, tokenizer
