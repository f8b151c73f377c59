"""Helpers of the training tests: tiny configs, a YAML writer, the CLI in a subprocess."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

TINY_VOCAB = 400


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` merged in, section by section."""
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def tiny_config(tokenizer_dir: Path | None, **changes: Any) -> dict[str, Any]:
    """A pretraining config of a 2-layer, 64-wide model on the built-in prose: seconds per run."""
    base = {
        "stage": "pretrain",
        "model": {"preset": "gpt2-tiny", "context_length": 32},
        "tokenizer": {"path": str(tokenizer_dir)} if tokenizer_dir else {"vocab_size": TINY_VOCAB},
        "data": {"train": ["builtin"], "val_fraction": 0.1},
        "optim": {"lr": 3.0e-3},
        "schedule": {"warmup_steps": 2},
        "train": {"max_steps": 8, "batch_size": 8, "num_threads": 1, "seed": 7},
        "eval": {"every": 4, "max_batches": 2},
        "checkpoint": {"every": 4, "keep_last": 2},
        "log": {"every": 2, "progress": False, "tensorboard": False, "plot": False},
    }
    return merge(base, changes)


def sft_config(init_from: Path, **changes: Any) -> dict[str, Any]:
    """A chat fine-tuning config on the built-in conversations, starting from `init_from`."""
    base = tiny_config(None, stage="sft", init_from=str(init_from), data={"train": ["builtin"]})
    del base["model"], base["tokenizer"]
    return merge(base, changes)


def write_config(directory: Path, data: dict[str, Any], name: str = "config.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`fucina ARGS` in a fresh interpreter (one CPU thread, like the in-process tests)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fucina.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
