"""Checkpoints that never lose work: atomic, verified, full precision, no pickle of arbitrary objects.

Layout: `<run>/checkpoints/step-00000500/` holding
- `model.safetensors`  the float32 weights (full precision, whatever the autocast dtype was),
- `trainer_state.pt`   optimizer (+ GradScaler) state, the weight average (EMA/SWA, if any), RNG states,
                       data position, step and progress,
                       plain tensors/numbers/lists only, loaded with `torch.load(weights_only=True)`,
- `manifest.json`      written last: step, and each file's size and SHA-256.

Design choices:
- Atomic: everything is written into `checkpoints/.tmp-step-...` (each file flushed and fsynced through
  fucina.fsutil, then the directory fsynced), which is renamed to its final name with `os.replace` and
  the parent fsynced. A crash at any moment leaves either the complete new checkpoint or a `.tmp-*`
  directory, which is never taken for a checkpoint (and is cleared away on the next start). The previous
  checkpoints are only pruned (`keep_last`) after the new one is in place.
- Verified: loading checks every file's size and hash against the manifest, so a truncated or
  bit-flipped checkpoint is caught with a message naming the file instead of loading garbage.
- Fallback (documented behaviour): when the newest checkpoint is unusable, resume warns, renames it to
  `corrupt-step-...` (kept for inspection, never deleted) and takes the previous good one. When no
  usable checkpoint is left it refuses with a CheckpointError naming the file and renames nothing.
- A failed write (disk full, permissions) removes its own temporary directory, leaves every earlier
  checkpoint untouched and raises one CheckpointError line naming the cause.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from fucina.errors import CheckpointError
from fucina.fsutil import fsync_directory, write_durably

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
SHARDED_FORMAT = 2  # dist.strategy ddp/fsdp: train/sharded_checkpoint.py
_NAME = re.compile(r"^step-(\d{8,})$")
TMP_PREFIX = ".tmp-"
CORRUPT_PREFIX = "corrupt-"


@dataclass
class Checkpoint:
    """A loaded, verified checkpoint."""

    path: Path
    step: int
    model_state: dict[str, torch.Tensor] | None  # None: sharded (train/sharded_checkpoint.py), in dcp/
    trainer_state: dict[str, Any]

    @property
    def sharded(self) -> bool:
        return self.model_state is None


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Completed checkpoints in `directory`, oldest first (temporary and corrupt ones excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _serialize_state(trainer_state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(trainer_state, buffer)
    return buffer.getvalue()


def _weights_for_saving(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors sharing storage (tied embeddings); separate float32 copies are exact.
    return {name: t.detach().to("cpu", torch.float32).contiguous().clone() for name, t in model_state.items()}


def save_checkpoint(
    directory: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically into `directory`, then prune all but the newest `keep_last`."""
    directory = Path(directory)
    final = directory / checkpoint_name(step)
    tmp = directory / f"{TMP_PREFIX}{checkpoint_name(step)}.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files = {
            MODEL_FILE: safetensors.torch.save(
                _weights_for_saving(model_state), metadata={"step": str(step)}
            ),
            STATE_FILE: _serialize_state(trainer_state),
        }
        for name, payload in files.items():
            write_durably(tmp / name, payload)
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "files": {name: {"bytes": len(p), "sha256": _sha256(p)} for name, p in files.items()},
        }
        write_durably(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
        fsync_directory(tmp)
        if final.exists():  # only possible for a checkpoint moved aside as corrupt and recreated
            final.rename(directory / f"{CORRUPT_PREFIX}{final.name}.{int(time.time())}")
        os.replace(tmp, final)
        fsync_directory(directory)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = err.strerror or str(err)
        raise CheckpointError(
            f"could not write checkpoint {final}: {reason} (earlier checkpoints are intact)"
        ) from None
    _prune(directory, keep_last)
    return final


def _prune(directory: Path, keep_last: int) -> None:
    for _, path in list_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def _read_verified(path: Path, name: str, expected: dict[str, Any]) -> bytes:
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"{file}: missing from checkpoint")
    data = file.read_bytes()
    if len(data) != expected.get("bytes"):
        raise CheckpointError(f"{file}: truncated ({len(data)} of {expected.get('bytes')} bytes)")
    if _sha256(data) != expected.get("sha256"):
        raise CheckpointError(f"{file}: corrupt (checksum does not match the manifest)")
    return data


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and verify one checkpoint directory; CheckpointError names the bad file."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        step = int(manifest["step"])
    except FileNotFoundError:
        raise CheckpointError(f"{manifest_path}: missing (incomplete checkpoint)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({err})") from None
    if manifest.get("format") == SHARDED_FORMAT:  # written by several processes: verify, state only
        for name, expected in files.items():
            _read_verified(path, name, expected)
        state = (path / STATE_FILE).read_bytes()
        return Checkpoint(path=path, step=step, model_state=None, trainer_state=_load_state(path, state))
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: unsupported checkpoint format {manifest.get('format')!r}")
    for name in (MODEL_FILE, STATE_FILE):
        if name not in files:
            raise CheckpointError(f"{manifest_path}: does not list {name}")
    weights = _read_verified(path, MODEL_FILE, files[MODEL_FILE])
    state = _read_verified(path, STATE_FILE, files[STATE_FILE])
    try:
        model_state = safetensors.torch.load(weights)
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path / MODEL_FILE}: unreadable weights ({err})") from None
    return Checkpoint(path=path, step=step, model_state=model_state, trainer_state=_load_state(path, state))


def _load_state(path: Path, state: bytes) -> dict[str, Any]:
    try:
        return torch.load(io.BytesIO(state), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError: a bad or hostile file
        raise CheckpointError(f"{path / STATE_FILE}: unreadable trainer state ({err})") from None


def clear_incomplete_writes(directory: str | Path) -> None:
    """Remove `.tmp-*` leftovers of writes interrupted by a crash (never complete checkpoints)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            log.info("removing an interrupted checkpoint write: %s", entry)
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def load_latest_checkpoint(directory: str | Path) -> Checkpoint | None:
    """The newest usable checkpoint, falling back past corrupt ones (moved aside, not deleted).

    None when there is no checkpoint at all; CheckpointError, with nothing renamed, when checkpoints
    exist but none is usable.
    """
    directory = Path(directory)
    clear_incomplete_writes(directory)
    unusable: list[tuple[Path, CheckpointError]] = []
    for _, path in reversed(list_checkpoints(directory)):
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError as err:
            unusable.append((path, err))
            continue
        for bad, err in unusable:
            aside = bad.with_name(f"{CORRUPT_PREFIX}{bad.name}.{int(time.time())}")
            log.warning("unusable checkpoint skipped and kept as %s: %s", aside.name, err)
            try:
                bad.rename(aside)
            except OSError:
                pass
        return checkpoint
    if unusable:
        raise CheckpointError(f"no usable checkpoint in {directory}: {unusable[0][1]}")
    return None
