"""Helpers of the LoRA tests: random adapters, architecture model directories, LoRA directories."""

from __future__ import annotations

import dataclasses
from functools import cache
from pathlib import Path

import torch

from fucina.adapt.adapter_dir import save_adapter_dir
from fucina.adapt.lora import adapter_state_dict, apply_lora
from fucina.adapt.lora_config import LoRAConfig
from fucina.model.config import ModelConfig
from fucina.model.io import save_model
from fucina.model.transformer import Transformer
from fucina.model_dir import load_pretrained
from fucina.resources import builtin_prose_files
from fucina.tokenizer import FucinaTokenizer, train_tokenizer

_BASE = dict(vocab_size=416, context_length=64, n_layers=2, d_model=64, n_heads=4)
_LLAMA = dict(_BASE, n_kv_heads=2, d_ff=96, positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)
ARCHITECTURES: dict[str, ModelConfig] = {
    "gpt2": ModelConfig(
        **_BASE, positions="learned", norm="layernorm", mlp="gelu_tanh", bias=True, tie_embeddings=False
    ),
    "llama": ModelConfig(**_LLAMA, tie_embeddings=False),
    "mistral": ModelConfig(**_LLAMA, tie_embeddings=False, sliding_window=6),
}


@cache
def tokenizer() -> FucinaTokenizer:
    texts = [path.read_text(encoding="utf-8") for path in builtin_prose_files()[:4]]
    return train_tokenizer(texts, 400, template="chatml", show_progress=False)


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """Every parameter random and far from its init, so a misplaced tensor shows in the logits."""
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.3)
            else:
                parameter.uniform_(0.5, 1.5)
    return model.eval()


def base_dir(directory: Path, name: str, **overrides) -> Path:
    """A model directory of architecture `name` with random weights and the tiny tokenizer."""
    config = dataclasses.replace(ARCHITECTURES[name], **overrides)
    save_model(random_model(config), directory)
    tokenizer().save(directory)
    return directory


def randomize_adapters(model: torch.nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """Non-zero A and B everywhere: a freshly initialised adapter (B = 0) would hide mapping errors."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)


def lora_dir(directory: Path, base: Path, settings: LoRAConfig) -> Path:
    """A LoRA model directory with random adapters on `base`."""
    model, tok = load_pretrained(base)
    apply_lora(model, settings.validate())
    randomize_adapters(model)
    save_adapter_dir(model, directory, base, settings)
    tok.save(directory)
    return directory


def token_batch(seed: int = 0, vocab: int = 400, shape: tuple[int, int] = (2, 24)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
