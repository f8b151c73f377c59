"""What an export reads: the model directory (or run directory) with its tokenizer and training records.

Design choices, and why:
- Resolved through `fucina.model_dir.resolve_model_dir`, so `--model runs/x` means the same thing for
  export as for generate, chat and eval (the run's best/, else final/).
- An export without its tokenizer would be unusable (no ids to feed, no chat template), so a model
  directory lacking tokenizer.json is refused up front with a message naming the directory.
- A quantized model directory (fucina quantize) is refused: every format here wants full-precision
  weights (GGUF quantizes on its own with `--quant q8_0`).
- The run directory around best/ or final/ is found when it holds the training records
  (train_config.yaml, train_stats.json): the model card reads them, and does without them when absent.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fucina.errors import FucinaError
from fucina.model.io import load_model
from fucina.model.transformer import Transformer
from fucina.model_dir import TRAINING_INFO_FILE, resolve_model_dir
from fucina.tokenizer import TOKENIZER_FILE, FucinaTokenizer

log = logging.getLogger(__name__)

RUN_RECORDS = ("train_config.yaml", "train_stats.json")


class ExportError(FucinaError):
    """A model cannot be exported as asked (unsupported architecture, missing tokenizer, bad output path)."""


@dataclass
class ExportSource:
    """A loaded model and tokenizer plus whatever training records lie beside them."""

    model_dir: Path
    run_dir: Path | None
    model: Transformer
    tokenizer: FucinaTokenizer
    training_info: dict[str, Any]  # best/training.json: stage, step, validation figures
    train_config: dict[str, Any]  # the run's resolved train_config.yaml
    train_stats: dict[str, Any]  # the run's train_stats.json: every evaluation and the best one


def load_source(path: str | Path) -> ExportSource:
    """Load the model directory at `path` (or the one of the run directory `path`) for export."""
    model_dir = resolve_model_dir(path)
    from fucina.compress import is_quantized_dir

    if is_quantized_dir(model_dir):
        raise ExportError(
            f"{model_dir} holds a quantized model (fucina quantize); export the full-precision model "
            "instead (GGUF quantizes on its own with --quant q8_0)"
        )
    if not (model_dir / TOKENIZER_FILE).is_file():
        raise ExportError(
            f"{model_dir} has no {TOKENIZER_FILE}: an export needs the tokenizer the model was trained "
            "with (copy tokenizer.json and tokenizer_config.json of its run into it)"
        )
    model = load_model(model_dir)
    tokenizer = FucinaTokenizer.load(model_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ExportError(
            f"{model_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size}"
        )
    run_dir = _run_dir_of(model_dir)
    return ExportSource(
        model_dir=model_dir,
        run_dir=run_dir,
        model=model,
        tokenizer=tokenizer,
        training_info=_read_json(model_dir / TRAINING_INFO_FILE),
        train_config=_read_yaml(run_dir / "train_config.yaml") if run_dir else {},
        train_stats=_read_json(run_dir / "train_stats.json") if run_dir else {},
    )


def _run_dir_of(model_dir: Path) -> Path | None:
    """The run directory holding `model_dir` (as best/ or final/), or the model directory itself."""
    for candidate in (model_dir.parent, model_dir):
        if any((candidate / name).is_file() for name in RUN_RECORDS):
            return candidate
    return None


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when it is absent or unreadable (records are optional)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("ignoring unreadable %s (%s)", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        log.warning("ignoring unreadable %s (%s)", path, err)
        return {}
    return data if isinstance(data, dict) else {}
