"""Tiny models and tokenizers for the export tests: one model per exportable architecture.

Weights are drawn wider than the usual init (matrices N(0, 0.3), norm scales and biases random too) so
logits are peaked and every tensor matters: a weight mapped to the wrong place, transposed or left at
its initial value changes the logits far beyond the 1e-4 tolerance.
"""

from __future__ import annotations

import dataclasses
from functools import cache
from pathlib import Path

import torch

from fucina.model.config import ModelConfig
from fucina.model.io import save_model
from fucina.model.transformer import Transformer
from fucina.resources import builtin_prose_files
from fucina.tokenizer import FucinaTokenizer, train_tokenizer

TOKENIZER_VOCAB = 400
_BASE = dict(vocab_size=416, context_length=96, n_layers=2, d_model=64, n_heads=4)
_LLAMA = dict(_BASE, n_kv_heads=2, d_ff=96, positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)

# name -> (model config, chat template the tokenizer is trained for)
ARCHITECTURES: dict[str, tuple[ModelConfig, str]] = {
    "gpt2": (
        ModelConfig(
            **_BASE, positions="learned", norm="layernorm", mlp="gelu_tanh", bias=True, tie_embeddings=False
        ),
        "chatml",
    ),
    "llama": (ModelConfig(**_LLAMA, tie_embeddings=False), "chatml"),
    "mistral": (ModelConfig(**_LLAMA, tie_embeddings=False, sliding_window=6), "microdac"),
    "ministral": (
        ModelConfig(**_LLAMA, tie_embeddings=True, sliding_window=6, sliding_window_layers=[1]),
        "chatml",
    ),
    "picodac": (
        ModelConfig(
            **_BASE,
            d_ff=128,
            positions="learned",
            norm="rmsnorm",
            mlp="silu",
            bias=False,
            tie_embeddings=True,
        ),
        "picodac",
    ),
}

ITALIAN_SAMPLES = (
    "Il caffè è buonissimo, dell'acqua fresca e l’altra sera 1234 euro!\nPerché? Così è.\n\n  Città: Roma (42).",
    "À È É Ì Ò Ù... «ciao» — un po' di più; 3,14 e 2.000.000\tfine\n",
    "Un'ottima idea: c'è l'uomo dell'anno, quell'albero e sant'Antonio... l'8 marzo del 1861!",
)


@cache
def tiny_tokenizer(template: str = "chatml", pretokenizer: str = "italian") -> FucinaTokenizer:
    """A real byte-level BPE trained on a few KB of the built-in Italian prose (cached per kind)."""
    texts = [path.read_text(encoding="utf-8") for path in builtin_prose_files()[:6]]
    return train_tokenizer(
        texts, TOKENIZER_VOCAB, template=template, pretokenizer=pretokenizer, show_progress=False
    )


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """A model whose every parameter is random and far from its initial value (see the module doc)."""
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.3)
            else:
                parameter.uniform_(0.5, 1.5)
    return model.eval()


def write_model_dir(directory: Path, model: Transformer, tokenizer: FucinaTokenizer | None) -> Path:
    """A model directory as training writes it (config.json, model.safetensors, tokenizer files)."""
    save_model(model, directory)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def architecture_model_dir(directory: Path, name: str, pretokenizer: str = "italian", **overrides) -> Path:
    """The model directory of architecture `name` (ARCHITECTURES) with its tiny tokenizer."""
    config, template = ARCHITECTURES[name]
    config = dataclasses.replace(config, **overrides)
    return write_model_dir(directory, random_model(config), tiny_tokenizer(template, pretokenizer))
