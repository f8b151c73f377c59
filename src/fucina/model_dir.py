"""The model directory: its file names, finding one in a run, and loading it by kind.

A *model directory* holds `config.json` + `model.safetensors` (the model) and `tokenizer.json` +
`tokenizer_config.json` (the tokenizer with its chat template), plus `training.json` when training wrote
it. Training writes one into `best/` (and `final/`) of its run directory; every consumer (generate, chat,
eval, export, quantize, serve) resolves and loads through here, so "--model runs/x" means the same thing
everywhere.

Design choices, and why:
- Modules above the model and the tokenizer take these names from here. The names of the model's and
  the tokenizer's own files are defined by their formats (model/io.py, tokenizer.py) and re-exported
  here, because those lower modules never import upward (the model never reaches for the model
  directory).
- Kinds of model directory (full precision, quantized, ...) load through a small registry:
  `register_loader(kind, detect, load)`. The module that defines a format registers it, so this module
  imports no format code and the old `pretrained -> quantize -> pretrained` cycle is gone. The modules
  that register are named once, in `REGISTERING_MODULES`, and imported by name on the first lookup:
  `import fucina` stays light (tokenizer and data commands never import torch's quantized kernels), and
  whoever loads a model gets every kind, whatever they imported before.
- A directory no registered kind claims is a full-precision model (model/io.py). The ternary export
  (compress/ternary.py) is a single file without a tokenizer, not a model directory, so it has no entry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fucina.errors import CheckpointError, ConfigError
from fucina.model.io import CONFIG_FILE, WEIGHTS_FILE, load_model
from fucina.model.transformer import Transformer
from fucina.tokenizer import CONFIG_FILE as TOKENIZER_CONFIG_FILE
from fucina.tokenizer import TOKENIZER_FILE, FucinaTokenizer

TRAINING_INFO_FILE = "training.json"
BEST_DIR = "best"
FINAL_DIR = "final"
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE)
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)
FULL_KIND = "full"
# Modules whose import registers a kind of model directory (see the module docstring).
REGISTERING_MODULES = ("fucina.compress.quantize", "fucina.adapt.adapter_dir")

__all__ = [
    "BEST_DIR",
    "CONFIG_FILE",
    "FINAL_DIR",
    "MODEL_FILES",
    "TOKENIZER_CONFIG_FILE",
    "TOKENIZER_FILE",
    "TOKENIZER_FILES",
    "TRAINING_INFO_FILE",
    "WEIGHTS_FILE",
    "is_model_dir",
    "load_model_dir",
    "load_pretrained",
    "model_kind",
    "register_loader",
    "resolve_model_dir",
]

ModelLoad = Callable[[Path, str | torch.device, torch.dtype], Transformer]


@dataclass(frozen=True)
class _Loader:
    detect: Callable[[Path], bool]
    load: ModelLoad


_LOADERS: dict[str, _Loader] = {}


def register_loader(kind: str, detect: Callable[[Path], bool], load: ModelLoad) -> None:
    """Load model directories for which `detect(directory)` is true with `load(directory, device, dtype)`."""
    if kind == FULL_KIND:
        raise ConfigError(f"{FULL_KIND!r} is the built-in kind of model directory; register another name")
    _LOADERS[kind] = _Loader(detect, load)


def _loaders() -> dict[str, _Loader]:
    for module in REGISTERING_MODULES:
        importlib.import_module(module)  # registers on first import; a no-op afterwards
    return _LOADERS


def is_model_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in MODEL_FILES)


def resolve_model_dir(path: str | Path) -> Path:
    """`path` itself if it is a model directory, else its `best/`, else its `final/`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model not found: {path}")
    for candidate in (path, path / BEST_DIR, path / FINAL_DIR):
        if is_model_dir(candidate):
            return candidate
    raise CheckpointError(
        f"{path} holds no model: expected {' + '.join(MODEL_FILES)} in it or in its {BEST_DIR}/ subdirectory"
    )


def model_kind(path: str | Path) -> str:
    """The registered kind of the model directory `path` resolves to (`full` when none claims it)."""
    directory = resolve_model_dir(path)
    return next((kind for kind, loader in _loaders().items() if loader.detect(directory)), FULL_KIND)


def load_model_dir(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """The model of a model or run directory, loaded by its kind, on `device`, in eval mode."""
    directory = resolve_model_dir(path)
    kind = model_kind(directory)
    if kind == FULL_KIND:
        return load_model(directory, device=device, dtype=dtype)
    return _LOADERS[kind].load(directory, device, dtype)


def load_pretrained(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Transformer, FucinaTokenizer]:
    """Load model and tokenizer from a model or run directory; the tokenizer must fit the model."""
    directory = resolve_model_dir(path)
    model = load_model_dir(directory, device=device, dtype=dtype)
    tokenizer = FucinaTokenizer.load(directory)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"{directory}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size}"
        )
    return model, tokenizer
