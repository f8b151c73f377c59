"""`fucina model` commands: describe a model shape (parameters, FLOPs, cache, memory), list presets."""

from __future__ import annotations

import argparse
from pathlib import Path

from fucina.errors import CheckpointError
from fucina.model.config import ModelConfig


def register(subparsers) -> None:
    model = subparsers.add_parser(
        "model", help="inspect model shapes", description="Inspect model shapes and presets."
    )
    commands = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)

    info = commands.add_parser(
        "info",
        help="parameters, FLOPs per token, KV cache and memory of a preset or saved model",
        description=(
            "Print total and per-component parameters, FLOPs per token, KV-cache bytes per token and the "
            "memory needed to train (AdamW) and to run a preset or a saved model."
        ),
    )
    info.add_argument("model", help="a preset name (see `fucina model presets`), or a model/run directory")
    info.add_argument("--batch-size", type=int, default=8, help="batch size for the training-memory estimate")
    info.add_argument("--context", type=int, default=None, help="sequence length (default: the model's)")
    info.set_defaults(func=_info)

    presets = commands.add_parser("presets", help="list the model presets with their sizes")
    presets.set_defaults(func=_presets)


def _config_for(name_or_path: str) -> tuple[str, ModelConfig]:
    """A preset by name, or the config.json of a model directory (or a run's best/ or final/)."""
    from fucina.model.io import CONFIG_FILE, load_config
    from fucina.presets import get_preset

    path = Path(name_or_path)
    if not path.exists():
        if len(path.parts) > 1:
            raise CheckpointError(f"model directory not found: {path}")
        return name_or_path, get_preset(name_or_path)
    for candidate in (path, path / "best", path / "final"):
        if (candidate / CONFIG_FILE).is_file():
            return str(candidate), load_config(candidate)
    raise CheckpointError(f"{path} holds no {CONFIG_FILE} (nor does its best/ or final/ subdirectory)")


def _info(args: argparse.Namespace) -> None:
    from fucina.model.info import describe

    name, config = _config_for(args.model)
    print(describe(config, name, batch_size=args.batch_size, context_length=args.context))


def _presets(args: argparse.Namespace) -> None:
    from fucina.model.info import count_parameters
    from fucina.presets import PRESETS

    for name, config in PRESETS.items():
        total = count_parameters(config).total
        print(
            f"{name:14s} {total / 1e6:8.2f}M  {config.n_layers:2d} layers, d {config.d_model}, "
            f"{config.n_heads} heads/{config.kv_heads} kv, {config.mlp}, {config.positions}, {config.norm}, "
            f"context {config.context_length}, vocab {config.vocab_size}"
            + (f", window {config.sliding_window}" if config.sliding_window else "")
        )
