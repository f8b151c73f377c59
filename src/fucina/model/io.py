"""Save and load a model: `model.safetensors` (the weights) + `config.json` (the ModelConfig).

Design choices:
- safetensors, not pickle: loading never runs code, and the header lets us check names and shapes
  before touching the model.
- config.json is the flat ModelConfig plus "fucina_model_version"; unknown keys are rejected by name.
- A tied LM head is stored once (as `token_embedding.weight`); loading re-ties it.
- Weights are saved in the model's own dtype (float32 for training checkpoints).
- Every file is written through fucina.fsutil (temporary name, fsync, os.replace), so a crash never
  leaves a half-written model behind the final name.
- Anything wrong on load (missing directory or file, truncated or corrupt safetensors, a config that
  does not match the weights) raises CheckpointError naming the path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fucina.errors import CheckpointError, ConfigError
from fucina.fsutil import atomic_path, write_json_atomically
from fucina.model.config import ModelConfig
from fucina.model.transformer import Transformer

MODEL_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TIED_HEAD = "lm_head.weight"


def save_model(model: Transformer, directory: str | Path) -> None:
    """Write model.safetensors and config.json into `directory` (created if needed), atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in model.state_dict().items()
        if not (model.config.tie_embeddings and name == TIED_HEAD)
    }
    config = {"fucina_model_version": MODEL_VERSION, **model.config.to_dict()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    write_json_atomically(directory / CONFIG_FILE, config, ensure_ascii=True)


def read_json_object(path: Path, hint: str) -> dict:
    """The JSON object in `path`; CheckpointError naming the file when it is missing (with `hint`) or bad."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({hint})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable config ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def load_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig stored in `directory/config.json`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model directory not found: {directory}")
    path = directory / CONFIG_FILE
    data = read_json_object(path, f"a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    version = data.pop("fucina_model_version", None)
    if version is None:
        raise CheckpointError(f"{path}: not a fucina model config (no fucina_model_version)")
    if not isinstance(version, int) or version > MODEL_VERSION:
        raise CheckpointError(
            f"{path}: model version {version!r} is newer than this fucina ({MODEL_VERSION})"
        )
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


def read_safetensors(path: Path, hint: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file on CPU; CheckpointError naming the file when missing or corrupt."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({hint})")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({err})") from None


def load_model(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """Rebuild the model saved in `directory` on `device` in `dtype`, in eval mode."""
    directory = Path(directory)
    config = load_config(directory)
    weights_path = directory / WEIGHTS_FILE
    weights = read_safetensors(weights_path, f"a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    with torch.device(device):
        model = Transformer(config)
    expected = {
        name: tensor
        for name, tensor in model.state_dict().items()
        if not (config.tie_embeddings and name == TIED_HEAD)
    }
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing {len(missing)} tensors ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
            )
        if unexpected:
            parts.append(
                f"unexpected {len(unexpected)} tensors ({', '.join(unexpected[:3])}"
                f"{', ...' if len(unexpected) > 3 else ''})"
            )
        raise CheckpointError(f"{weights_path}: does not match {directory / CONFIG_FILE}: {'; '.join(parts)}")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{weights_path}: tensor {name} has shape {tuple(tensor.shape)} but "
                f"{directory / CONFIG_FILE} implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(weights, strict=False)
    return model.to(dtype=dtype).eval()
