"""The LoRA model directory: the adapter beside a reference to its frozen base, loadable by every command.

Layout: a model directory (fucina.model_dir) whose
- `config.json` is the base's ModelConfig plus `"fucina_lora": {...}`: where the base is, the LoRA
  settings, and the layout of every adapter (layer, rows, rank, scale);
- `model.safetensors` holds the adapters' tensors only (`<layer>.lora.<part>.A` / `.B`);
- the tokenizer files (and training.json) as in any model directory.

Design choices, and why:
- The base is referenced, not copied: an adapter is a few MB against a base of hundreds, and that is
  the point of LoRA. The reference is stored relative to the adapter directory (so a run directory and
  its base can move together) and absolute (so the adapter can move alone); the base's config must
  equal the one recorded and its weights file must have the recorded size, so a base retrained in place
  is refused instead of silently giving another model.
- The base may be any kind of model directory (full precision, or int8/int4 from `fucina quantize`:
  QLoRA): it loads through `load_model_dir`, then the adapters are put back from the layout.
- Registered with fucina.model_dir as the kind "lora" (last line), so generate, chat, eval and serve
  load a LoRA run directory as they load any other, as base + adapter (unmerged: the output equals the
  training's model; `fucina lora merge` writes the merged, ordinary model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from fucina.adapt.lora import (
    adapter_state_dict,
    apply_layout,
    is_lora_model,
    layout_from_json,
    layout_to_json,
    load_adapter_state_dict,
    model_layout,
)
from fucina.adapt.lora_config import LoRAConfig
from fucina.errors import CheckpointError
from fucina.fsutil import atomic_path, write_json_atomically
from fucina.model.config import ModelConfig
from fucina.model.io import MODEL_VERSION, read_json_object, read_safetensors, save_model
from fucina.model.transformer import Transformer
from fucina.model_dir import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    is_model_dir,
    load_model_dir,
    register_loader,
    resolve_model_dir,
)

LORA_KIND = "lora"
LORA_KEY = "fucina_lora"


def save_adapter_dir(
    model: nn.Module,
    directory: str | Path,
    base_dir: str | Path,
    settings: LoRAConfig | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the adapters of `model` (a LoRA model on the base at `base_dir`) as a LoRA model directory."""
    directory, base_dir = Path(directory), resolve_model_dir(base_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        name: t.detach().to("cpu", torch.float32).contiguous()
        for name, t in adapter_state_dict(model).items()
    }
    marker: dict[str, Any] = {
        "base": os.path.relpath(base_dir, directory.resolve()),
        "base_absolute": str(base_dir),
        "base_weights_bytes": (base_dir / WEIGHTS_FILE).stat().st_size,
        "layout": layout_to_json(model_layout(model)),
        **(extra or {}),
    }
    if settings is not None:
        marker |= {
            "rank": settings.rank,
            "alpha": settings.alpha,
            "dropout": settings.dropout,
            "rslora": settings.rslora,
            "targets": list(settings.target_names()),
        }
    config = {"fucina_model_version": MODEL_VERSION, **model.config.to_dict(), LORA_KEY: marker}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, tmp, metadata={"format": "pt", "fucina": "lora-adapter"})
    write_json_atomically(directory / CONFIG_FILE, config, ensure_ascii=True)


def save_trained_model(
    model: nn.Module, directory: str | Path, init_from: str | None, settings: Any = None
) -> None:
    """What training publishes in best/ and final/: a LoRA model directory for a LoRA model, else the model."""
    if is_lora_model(model):
        if init_from is None:
            raise CheckpointError("a LoRA model needs its base (init_from) to be saved")
        save_adapter_dir(model, directory, init_from, settings)
    else:
        save_model(model, directory)


def is_lora_dir(path: str | Path) -> bool:
    """Whether `path` holds a LoRA model directory (its config.json has the `fucina_lora` marker)."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        return False
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and LORA_KEY in data


def read_lora_config(directory: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The base's model config and the `fucina_lora` marker of a LoRA model directory."""
    path = Path(directory) / CONFIG_FILE
    data = read_json_object(path, "a LoRA model directory holds config.json and model.safetensors")
    marker = data.pop(LORA_KEY, None)
    version = data.pop("fucina_model_version", None)
    if not isinstance(marker, dict) or not isinstance(version, int) or version > MODEL_VERSION:
        raise CheckpointError(f"{path}: not a LoRA model config of this fucina")
    try:
        return ModelConfig.from_dict(data), marker
    except Exception as err:  # ConfigError and the dataclass's own TypeErrors
        raise CheckpointError(f"{path}: bad model config ({err})") from None


def base_dir_of(directory: str | Path) -> Path:
    """The base model directory a LoRA model directory refers to (relative reference first)."""
    directory = Path(directory)
    _, marker = read_lora_config(directory)
    candidates = [directory / str(marker.get("base", "")), Path(str(marker.get("base_absolute", "")))]
    for candidate in candidates:
        if str(candidate) and is_model_dir(candidate):
            return candidate.resolve()
    raise CheckpointError(
        f"{directory}: the base model of this LoRA adapter is missing (looked in {candidates[0]} and "
        f"{candidates[1]}); put it back or import the adapter again on its base"
    )


def load_lora_dir(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """The base (any kind) with the adapters of the LoRA model directory `directory`, in eval mode."""
    directory = Path(directory)
    config, marker = read_lora_config(directory)
    base = base_dir_of(directory)
    size = (base / WEIGHTS_FILE).stat().st_size
    if marker.get("base_weights_bytes") not in (None, size):
        raise CheckpointError(
            f"{directory}: the base {base} changed since the adapter was trained (weights of {size} bytes, "
            f"expected {marker['base_weights_bytes']})"
        )
    model = load_model_dir(base, device=device, dtype=dtype)
    if model.config != config:
        raise CheckpointError(
            f"{directory}: the base {base} has another model configuration than the adapter's"
        )
    apply_layout(model, layout_from_json(marker.get("layout"), directory / CONFIG_FILE))
    weights = read_safetensors(directory / WEIGHTS_FILE, "a LoRA model directory holds the adapter")
    load_adapter_state_dict(model, weights, directory / WEIGHTS_FILE)
    for parameter in adapter_state_dict(model).values():
        parameter.data = parameter.data.to(device=device, dtype=dtype)
    return model.eval()


register_loader(LORA_KIND, is_lora_dir, load_lora_dir)
