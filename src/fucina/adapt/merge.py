"""Merge LoRA adapters into their base: W + scale * B A, written as an ordinary model directory.

Design choices, and why:
- The merged model is a plain fucina Transformer (nn.Linear projections), so export, quantize, prune,
  eval and serve read it like any trained model, and its outputs equal base + adapter up to float
  rounding (the merge is computed in float32).
- A tied LM head that carries an adapter is untied explicitly: the head becomes its own matrix
  (embedding + update) and `tie_embeddings` turns false, so the token embedding keeps the base's
  values. Adding the update to the shared matrix would change the embedding too.
- A quantized base (QLoRA) is dequantized: the merged weights are W_dequantized + scale * B A in float32
  for the adapted layers, and the other quantized layers are dequantized too, so the result is one
  ordinary full-precision model (quantize it again with `fucina quantize` if wanted).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fucina.adapt.lora import QUANTIZED_LAYERS, LoRALinear, is_lora_model
from fucina.errors import ConfigError
from fucina.fsutil import staged_output, write_atomically
from fucina.model.io import save_model
from fucina.model.transformer import Transformer
from fucina.model_dir import TRAINING_INFO_FILE, load_pretrained, resolve_model_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeResult:
    """What `merge_lora_dir` wrote."""

    path: Path
    merged_layers: int
    dequantized_layers: int
    untied_head: bool


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Module) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.float())
    if getattr(like, "is_residual_output", False):
        linear.is_residual_output = True
    return linear


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def merge_lora(model: Transformer) -> tuple[Transformer, MergeResult]:
    """Fold every adapter of `model` into its weights, in place; the model becomes a plain Transformer."""
    merged = dequantized = 0
    untied = False
    with torch.no_grad():
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
            base = layer.base
            bias = base.bias.detach() if getattr(base, "bias", None) is not None else None
            _replace(model, name, _plain_linear(layer.merged_weight(), bias, base))
            merged += bool(layer.lora)
            dequantized += isinstance(base, QUANTIZED_LAYERS)
            if name == "lm_head" and model.config.tie_embeddings:
                model.config = dataclasses.replace(model.config, tie_embeddings=False)
                untied = True
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)]:
            bias = layer.bias.detach() if layer.bias is not None else None
            _replace(model, name, _plain_linear(layer.dequantized().float(), bias, layer))
            dequantized += 1
    model.requires_grad_(True)
    if untied:
        log.info("the LM head carried an adapter: untied from the token embedding (tie_embeddings: false)")
    return model, MergeResult(Path(), merged, dequantized, untied)


def merge_lora_dir(path: str | Path, out: str | Path, overwrite: bool = False) -> MergeResult:
    """Merge the LoRA model (directory or run) at `path` into the ordinary model directory `out`."""
    source = resolve_model_dir(path)
    model, tokenizer = load_pretrained(source)
    if not is_lora_model(model):
        raise ConfigError(f"{source} holds no LoRA adapter: nothing to merge")
    model, result = merge_lora(model)
    with staged_output(out, overwrite=overwrite, is_dir=True, protected=source) as tmp:
        save_model(model, tmp)
        tokenizer.save(tmp)
        if (source / TRAINING_INFO_FILE).is_file():
            write_atomically(tmp / TRAINING_INFO_FILE, (source / TRAINING_INFO_FILE).read_bytes())
    return dataclasses.replace(result, path=Path(out))
