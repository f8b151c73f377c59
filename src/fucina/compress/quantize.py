"""Quantize a model, and save / load a quantized model directory that generate and chat can use.

Design choices, and why:
- What is quantized: every projection inside the blocks (attention q|k|v and output, MLP up/gate and
  down; any plain nn.Linear there), plus an untied LM head, which always gets int8 (even in int4 mode:
  the head's errors land directly on the logits, and llama.cpp's 4-bit mixes keep it at 6-8 bits too).
  Embeddings (token and position; a tied head is the token embedding), norms and biases stay in float32,
  as PicoDAC does: they are a small share of the weights and quantizing them costs the most accuracy.
- A quantized model directory is a model directory (config.json + model.safetensors + tokenizer files,
  training.json copied) whose config.json also holds `"fucina_quantization": {...}`: the marker
  `is_quantized_dir` checks, with the method, bits and group size. model.safetensors holds the int8
  (or nibble-packed int4) weights with their float32 scales; scales.json is the readable manifest of
  every quantized tensor (scheme, shape, where its scales are, the rounding error) and of the tensors
  kept in float.
- `load_quantized` rebuilds the fucina Transformer, swaps in the quantized layers and loads the
  state dict strictly (every name and shape checked), so generation code sees an ordinary model.
- This module registers the kind "quantized" with fucina.model_dir (the last line), so
  `load_pretrained` loads such a directory without importing this module itself.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fucina.compress.quantized_layers import INT4_GROUP_SIZES, Int4Linear, Int8Linear
from fucina.errors import CheckpointError, ConfigError
from fucina.fsutil import atomic_path, staged_output, write_atomically, write_json_atomically
from fucina.model.config import ModelConfig
from fucina.model.io import MODEL_VERSION, load_model
from fucina.model.transformer import Transformer
from fucina.model_dir import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    TOKENIZER_FILES,
    TRAINING_INFO_FILE,
    WEIGHTS_FILE,
    register_loader,
    resolve_model_dir,
)

log = logging.getLogger(__name__)

QUANTIZED_KIND = "quantized"
QUANTIZATION_KEY = "fucina_quantization"
MANIFEST_FILE = "scales.json"
COPIED_FILES = (*TOKENIZER_FILES, TRAINING_INFO_FILE)
BITS = (8, 4)
DEFAULT_GROUP_SIZE = 32


@dataclass
class QuantizationSpec:
    """How a model was (or is to be) quantized; stored in config.json under `fucina_quantization`."""

    bits: int
    group_size: int | None = None  # int4 only
    method: str = ""
    layers: dict[str, int] = field(default_factory=dict)  # module name -> bits actually used

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ConfigError(f"quantization bits must be 8 or 4, got {self.bits}")
        if self.bits == 4:
            self.group_size = DEFAULT_GROUP_SIZE if self.group_size is None else self.group_size
            if self.group_size not in INT4_GROUP_SIZES:
                raise ConfigError(
                    f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {self.group_size}"
                )
            self.method = self.method or "int4-group-asymmetric-weight-only"
        else:
            self.group_size = None
            self.method = self.method or "int8-per-channel-symmetric-weight-only"


def quantizable_linears(model: Transformer) -> dict[str, nn.Linear]:
    """The layers to quantize: plain nn.Linear inside the blocks, and an untied LM head."""
    layers = {
        f"blocks.{name}": module
        for name, module in model.blocks.named_modules()
        # plain projections only: other subclasses (BitNet's BitLinear) carry their own quantization
        if type(module) is nn.Linear
    }
    if not model.config.tie_embeddings:
        layers["lm_head"] = model.lm_head
    return layers


def quantize_model(model: Transformer, bits: int, group_size: int | None = None) -> QuantizationSpec:
    """Replace the model's projections by quantized layers, in place; returns what was done."""
    spec = QuantizationSpec(bits, group_size)
    layers = quantizable_linears(model)
    if not layers:
        raise ConfigError("this model has no plain linear layers to quantize")
    for name, linear in layers.items():
        layer_bits = 8 if name == "lm_head" else bits
        quantized = (
            Int8Linear.from_float(linear)
            if layer_bits == 8
            else Int4Linear.from_float(linear, spec.group_size)
        )
        _set_module(model, name, quantized)
        spec.layers[name] = layer_bits
    model.eval()
    return spec


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _empty_quantized(model: Transformer, spec: QuantizationSpec) -> None:
    """Swap in quantized layers of the right shapes (values come from the state dict)."""
    for name, linear in quantizable_linears(model).items():
        if name not in spec.layers:
            continue
        bias = linear.bias is not None
        if spec.layers[name] == 8:
            layer = Int8Linear(linear.in_features, linear.out_features, bias)
        else:
            layer = Int4Linear(linear.in_features, linear.out_features, bias, spec.group_size)
        _set_module(model, name, layer.to(linear.weight.device))


def _tensors_to_save(model: Transformer) -> dict[str, torch.Tensor]:
    tied = model.config.tie_embeddings
    return {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }


def _manifest(
    model: Transformer, spec: QuantizationSpec, originals: dict[str, torch.Tensor]
) -> dict[str, Any]:
    tensors = {}
    for name, bits in spec.layers.items():
        layer = model.get_submodule(name)
        entry = {
            "bits": bits,
            "scheme": "symmetric per output channel" if bits == 8 else "asymmetric per group",
            "shape": [layer.out_features, layer.in_features],
            "values": f"{name}.weight",
            "scales": f"{name}.scale",
        }
        if bits == 4:
            entry |= {
                "group_size": layer.group_size,
                "minimums": f"{name}.minimum",
                "packing": "2 per byte, low first",
            }
        if name in originals:
            original = originals[name].float()
            error = (layer.dequantized().to(original.device) - original).abs()
            entry |= {"max_abs_error": float(error.max()), "mean_abs_error": float(error.mean())}
        tensors[name] = entry
    quantized = {f"{name}.{part}" for name in spec.layers for part in ("weight", "scale", "minimum")}
    kept = sorted(name for name in _tensors_to_save(model) if name not in quantized)
    return {
        "method": spec.method,
        "bits": spec.bits,
        "group_size": spec.group_size,
        "quantized": tensors,
        "kept_in_float32": kept,
    }


def save_quantized(
    model: Transformer,
    spec: QuantizationSpec,
    directory: str | Path,
    source_dir: str | Path | None = None,
    originals: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the quantized model directory (see the module docstring); copies the tokenizer from source_dir.

    `originals` (module name -> float weight) adds the rounding error of each layer to scales.json.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(_tensors_to_save(model), tmp, metadata={"format": "pt"})
    config = {
        "fucina_model_version": MODEL_VERSION,
        **model.config.to_dict(),
        QUANTIZATION_KEY: {
            "method": spec.method,
            "bits": spec.bits,
            "group_size": spec.group_size,
            "layers": spec.layers,
        },
    }
    write_json_atomically(directory / CONFIG_FILE, config, ensure_ascii=True)
    write_json_atomically(
        directory / MANIFEST_FILE, _manifest(model, spec, originals or {}), ensure_ascii=True
    )
    if source_dir is not None:
        for name in COPIED_FILES:
            if (Path(source_dir) / name).is_file():
                write_atomically(directory / name, (Path(source_dir) / name).read_bytes())


def is_quantized_dir(path: str | Path) -> bool:
    """Whether `path` holds a quantized model directory (its config.json has the quantization marker)."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        return False
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and QUANTIZATION_KEY in data


def read_quantized_config(directory: str | Path) -> tuple[ModelConfig, QuantizationSpec]:
    """The model config and the quantization spec of a quantized model directory."""
    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable model config ({err})") from None
    marker = data.pop(QUANTIZATION_KEY, None)
    version = data.pop("fucina_model_version", None)
    if not isinstance(marker, dict) or not isinstance(version, int) or version > MODEL_VERSION:
        raise CheckpointError(f"{path}: not a quantized fucina model config")
    try:
        spec = QuantizationSpec(
            bits=marker["bits"],
            group_size=marker.get("group_size"),
            method=marker.get("method", ""),
            layers={str(k): int(v) for k, v in marker["layers"].items()},
        )
        return ModelConfig.from_dict(data), spec
    except (ConfigError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: bad {QUANTIZATION_KEY} or model config ({err})") from None


def load_quantized(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """Rebuild a quantized model saved by `save_quantized`, on `device`, its float parts in `dtype`."""
    directory = Path(directory)
    config, spec = read_quantized_config(directory)
    weights_path = directory / WEIGHTS_FILE
    try:
        with safe_open(weights_path, framework="pt", device="cpu") as handle:
            weights = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for missing, truncated or corrupt files
        raise CheckpointError(f"{weights_path}: cannot read quantized weights ({err})") from None
    model = Transformer(config)
    _empty_quantized(model, spec)
    expected = _tensors_to_save(model)
    problems = sorted(set(expected) ^ set(weights)) + sorted(
        name for name in set(expected) & set(weights) if expected[name].shape != weights[name].shape
    )
    if problems:
        raise CheckpointError(
            f"{weights_path}: does not match {directory / CONFIG_FILE} ({', '.join(problems[:4])})"
        )
    model.load_state_dict(weights, strict=False)
    model.to(device=device, dtype=dtype)
    for module in model.modules():
        if isinstance(module, Int8Linear | Int4Linear):
            module.prepare()
    return model.eval()


@dataclass
class QuantizeResult:
    """Where the quantized model went, and its size against the source's."""

    path: Path
    spec: QuantizationSpec
    source_bytes: int
    quantized_bytes: int


def quantize_model_dir(
    path: str | Path, out: str | Path, bits: int, group_size: int | None = None, overwrite: bool = False
) -> QuantizeResult:
    """Quantize the model of a model or run directory into the quantized model directory `out`."""
    source_dir = resolve_model_dir(path)
    if is_quantized_dir(source_dir):
        raise ConfigError(f"{source_dir} is already quantized; quantize the full-precision model")
    if not (source_dir / TOKENIZER_FILE).is_file():
        raise CheckpointError(
            f"{source_dir} has no {TOKENIZER_FILE}: a quantized model directory needs the model's tokenizer "
            "to be used by generate and chat"
        )
    QuantizationSpec(bits, group_size)  # validate before the (slow) load
    model = load_model(source_dir)
    originals = {name: layer.weight.detach().clone() for name, layer in quantizable_linears(model).items()}
    spec = quantize_model(model, bits, group_size)
    with staged_output(out, overwrite=overwrite, is_dir=True, protected=source_dir) as tmp:
        save_quantized(model, spec, tmp, source_dir=source_dir, originals=originals)
    out = Path(out)
    return QuantizeResult(
        path=out,
        spec=spec,
        source_bytes=(source_dir / WEIGHTS_FILE).stat().st_size,
        quantized_bytes=(out / WEIGHTS_FILE).stat().st_size,
    )


register_loader(QUANTIZED_KIND, is_quantized_dir, load_quantized)
