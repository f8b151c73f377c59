"""The run directory: its layout, who may write it, when a run resumes, and how models are published.

Layout (PicoDAC's, plus what resuming needs):
    train_config.yaml        the resolved training configuration (absolute paths, every default filled)
    config.json              the model's configuration
    tokenizer.json, tokenizer_config.json
    train_stats.json         every evaluation, the best one, progress
    metrics.jsonl            training and evaluation records, one JSON object per line
    tb/                      TensorBoard events
    plots/loss.png           training and validation loss, refreshed at each evaluation
    data/                    packed pretraining tokens (pretraining only)
    checkpoints/step-NNNNNNNN/   resumable checkpoints, the newest `checkpoint.keep_last` kept
    best/                    model directory of the best validation loss (config.json, model.safetensors,
                             tokenizer.json, tokenizer_config.json, training.json)
    final/                   model directory at the end of training

Resume policy (documented in `fucina train --help`):
- A directory that already holds a run (train_config.yaml or checkpoints) is resumed by default from
  its newest usable checkpoint, provided its configuration is the same. Changing only the budget
  (train.max_steps, train.epochs), evaluation cadence, checkpointing, logging or thread count is
  allowed; any other difference is refused, naming the keys. Exception: a start that never trained
  (failed on bad data, say: no checkpoint, best/ or final/) is restarted with the new configuration,
  after removing the tokenizer, packed data and logs it had derived from the old one.
- `--no-resume` on such a directory refuses, unless `--overwrite` is given too, which MOVES the old run
  aside to `<dir>.old-<timestamp>` (a run is never silently deleted) and starts afresh.
- `--resume` on a directory with nothing to resume is an error (it would silently start from scratch).
- A lock file keeps two processes from training in the same directory at once.
- Model directories (best/, final/) are written into a temporary sibling and swapped in by renames, so a
  crash leaves the previous best/ or the new one, never a mix; a start-up sweep finishes an
  interrupted swap.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from fucina.config import load_yaml
from fucina.errors import CheckpointError, ConfigError, FucinaError
from fucina.fsutil import staged_output, write_atomically, write_json_atomically
from fucina.model_dir import BEST_DIR, FINAL_DIR, TOKENIZER_FILES, TRAINING_INFO_FILE
from fucina.model_dir import CONFIG_FILE as MODEL_CONFIG_FILE
from fucina.train.checkpoint import Checkpoint, list_checkpoints, load_latest_checkpoint
from fucina.train.config import TrainConfig, config_from_dict

log = logging.getLogger(__name__)

CONFIG_FILE = "train_config.yaml"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = ".lock"
# What a start derives from its configuration before the first step: regenerable, never training results.
SETUP_FILES = (
    *TOKENIZER_FILES,
    MODEL_CONFIG_FILE,
    "data",
    "data-val",
    "metrics.jsonl",
    "train_stats.json",
    "tb",
    "plots",
)
# Keys that may differ when resuming: they change how long or how visibly a run trains, not what it is.
RESUMABLE_CHANGES = (
    "train.max_steps",
    "train.epochs",
    "train.num_threads",
    "eval.every",
    "eval.max_batches",
    "eval.batch_size",
    "eval.early_stopping_patience",
    "eval.min_delta",
    "checkpoint.",
    "log.",
    "dist.timeout_s",
)


class RunDirectoryError(FucinaError):
    """The run directory cannot be used as asked (busy, holds another run, nothing to resume)."""


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "model":
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_differences(saved: TrainConfig, current: TrainConfig) -> tuple[list[str], list[str]]:
    """(keys that may change on resume, keys that may not) whose values differ."""
    old, new = _flatten(saved.to_dict()), _flatten(current.to_dict())
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    allowed = [
        k for k in changed if any(k == c or (c.endswith(".") and k.startswith(c)) for c in RESUMABLE_CHANGES)
    ]
    return allowed, [k for k in changed if k not in allowed]


class RunDirectory:
    """A run directory held (locked) by this process for the duration of training."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_handle = None

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def best(self) -> Path:
        return self.path / BEST_DIR

    @property
    def final(self) -> Path:
        return self.path / FINAL_DIR

    def holds_run(self) -> bool:
        return (self.path / CONFIG_FILE).is_file() or self.holds_progress()

    def holds_progress(self) -> bool:
        """Whether training got anywhere: a checkpoint (even a corrupt one), best/ or final/."""
        if self.best.exists() or self.final.exists() or list_checkpoints(self.checkpoints):
            return True
        return self.checkpoints.is_dir() and any(self.checkpoints.iterdir())

    def clear_setup(self) -> None:
        """Remove what a start that never trained derived from its configuration (all regenerable)."""
        for name in SETUP_FILES:
            path = self.path / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks; the user keeps runs apart
            return
        handle = open(self.path / LOCK_FILE, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunDirectoryError(f"another fucina process is training in {self.path}") from None
        self._lock_handle = handle

    def release(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    def saved_config(self) -> TrainConfig:
        path = self.path / CONFIG_FILE
        try:
            return config_from_dict(load_yaml(path))
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def write_config(self, config: TrainConfig) -> None:
        text = "# The resolved configuration of this run, written by `fucina train`.\n" + yaml.safe_dump(
            config.to_dict(), sort_keys=False, allow_unicode=True
        )
        write_atomically(self.path / CONFIG_FILE, text)

    def recover_model_dirs(self) -> None:
        """Finish or undo a best/ or final/ swap that a crash interrupted."""
        for name in (BEST_DIR, FINAL_DIR):
            target = self.path / name
            for tmp in self.path.glob(f".{name}.tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)
            for old in sorted(self.path.glob(f".{name}.old-*")):
                if target.exists():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.rename(target)


def open_run_directory(
    path: str | Path, config: TrainConfig, resume: bool | None, overwrite: bool
) -> tuple[RunDirectory, Checkpoint | None]:
    """Prepare `path` for `config` per the resume policy; returns it locked, with the checkpoint to resume."""
    run = RunDirectory(path)
    if run.path.exists() and not run.path.is_dir():
        raise RunDirectoryError(f"{run.path} exists and is not a directory")
    if run.path.is_dir() and run.holds_run() and resume is False:
        if not overwrite:
            raise RunDirectoryError(
                f"{run.path} already holds a run; resume it (the default), pick another --out, or add "
                "--overwrite to move the old run aside"
            )
        aside = run.path.with_name(f"{run.path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        run.path.rename(aside)
        log.warning("moved the previous run to %s", aside)
    if (
        run.path.is_dir()
        and not run.holds_run()
        and any(p.name not in (LOCK_FILE,) for p in run.path.iterdir())
    ):
        raise RunDirectoryError(
            f"{run.path} is not empty and holds no fucina run (no {CONFIG_FILE}); choose a new directory"
        )
    run.path.mkdir(parents=True, exist_ok=True)
    run.lock()
    try:
        checkpoint = _resume_point(run, config, resume)
    except BaseException:
        run.release()
        raise
    run.recover_model_dirs()
    run.write_config(config)
    return run, checkpoint


def _resume_point(run: RunDirectory, config: TrainConfig, resume: bool | None) -> Checkpoint | None:
    if not run.holds_run():
        if resume:
            raise RunDirectoryError(f"nothing to resume in {run.path}: it holds no run")
        return None
    saved = run.saved_config() if (run.path / CONFIG_FILE).is_file() else config
    allowed, refused = config_differences(saved, config)
    if refused and run.holds_progress():
        raise ConfigError(
            f"{run.path} holds a run with a different configuration ({', '.join(refused)}); use the same "
            "configuration to resume it, or another --out"
        )
    if refused:
        log.warning(
            "%s: the previous start never trained (changed: %s); starting afresh",
            run.path,
            ", ".join(refused),
        )
        run.clear_setup()
        return None
    if allowed:
        log.warning("resuming %s with changed %s", run.path, ", ".join(allowed))
    checkpoint = load_latest_checkpoint(run.checkpoints)
    if checkpoint is None and resume:
        raise RunDirectoryError(f"nothing to resume in {run.path}: it holds no checkpoint yet")
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint.path)
    return checkpoint


def publish_model_dir(run: RunDirectory, name: str, write: Any, info: dict[str, Any]) -> Path:
    """Write a model directory `name` (best/ or final/) atomically: `write(tmp_dir)` then swap it in."""
    target = run.path / name
    try:
        # staged as .NAME.tmp-PID, the old one moved aside as .NAME.old-PID: see recover_model_dirs
        with staged_output(target, overwrite=True) as tmp:
            write(tmp)
            write_json_atomically(tmp / TRAINING_INFO_FILE, info, ensure_ascii=True)
    except OSError as err:
        raise CheckpointError(
            f"could not write {target}: {err.strerror or err} (the previous one is intact)"
        ) from None
    return target
