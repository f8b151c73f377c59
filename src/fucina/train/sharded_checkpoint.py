"""Distributed checkpoints (dist.strategy ddp or fsdp): DCP shards, resumable at any world size.

Layout: `<run>/checkpoints/step-00000500/` holding
- `dcp/`                  torch.distributed.checkpoint files: the model and optimizer state, each rank
                          writing its own shards (under DDP the replicated tensors are written once);
- `trainer_state.pt`      rank 0's progress, data position, GradScaler and RNG states (no optimizer:
                          that is in dcp/), loaded with `torch.load(weights_only=True)`;
- `rng-rank-R.pt`         every rank's RNG states;
- `manifest.json`         written last by rank 0: format 2, step, world size, each file's size and SHA-256.

Design choices:
- Atomic like the single-process kind (train/checkpoint.py): every rank writes into
  `checkpoints/.tmp-step-N.dist` (a name they all know), rank 0 renames it after a barrier, so a run killed
  during a save resumes from the previous checkpoint; a `.tmp-` leftover is cleared on the next start.
- DCP plans the load for the world size that reads, so a checkpoint saved by N processes resumes in M.
  A rank with no RNG file of its own (M > N) takes rank 0's.
- Loading goes through `get_state_dict`/`set_state_dict`, which map fully-qualified names to the DDP or
  FSDP layout of the reader, whatever the writer's was.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from fucina.errors import CheckpointError
from fucina.fsutil import fsync_directory, write_durably
from fucina.model.config import ModelConfig
from fucina.model.transformer import Transformer
from fucina.train.checkpoint import (
    MANIFEST_FILE,
    SHARDED_FORMAT,
    STATE_FILE,
    TMP_PREFIX,
    _prune,
    _sha256,
    checkpoint_name,
)
from fucina.train.process_group import ProcessGroup

DCP_DIR = "dcp"


def rng_file(rank: int) -> str:
    return f"rng-rank-{rank}.pt"


def _to_bytes(state: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save_sharded_checkpoint(
    directory: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    rng_state: dict[str, Any],
    group: ProcessGroup,
    keep_last: int,
) -> Path:
    """Every rank calls this: DCP shards + each rank's RNG, then rank 0 writes the manifest and renames."""
    final = directory / checkpoint_name(step)
    tmp = directory / f"{TMP_PREFIX}{checkpoint_name(step)}.dist"
    if group.is_writer:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    group.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp / DCP_DIR))
    write_durably(tmp / rng_file(group.rank), _to_bytes(rng_state))
    group.barrier()
    if group.is_writer:
        try:
            write_durably(tmp / STATE_FILE, _to_bytes(trainer_state))
            files = {
                str(path.relative_to(tmp)): path.read_bytes()
                for path in sorted(tmp.rglob("*"))
                if path.is_file()
            }
            manifest = {
                "format": SHARDED_FORMAT,
                "step": step,
                "world_size": group.world_size,
                "strategy": group.strategy,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "files": {
                    name: {"bytes": len(data), "sha256": _sha256(data)} for name, data in files.items()
                },
            }
            write_durably(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
            fsync_directory(tmp / DCP_DIR)
            fsync_directory(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_directory(directory)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"could not write checkpoint {final}: {err.strerror or err} (earlier checkpoints are intact)"
            ) from None
        _prune(directory, keep_last)
    group.barrier()
    return final


def load_sharded_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint's model and optimizer state into this rank's (wrapped) model."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))
    except Exception as err:  # DCP raises its own CheckpointException and RuntimeErrors
        raise CheckpointError(f"{path / DCP_DIR}: unreadable distributed checkpoint ({err})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_rank_rng(path: Path, rank: int) -> dict[str, Any]:
    """This rank's RNG states from a sharded checkpoint (rank 0's when it was saved by fewer ranks)."""
    file = path / rng_file(rank)
    if not file.is_file():
        file = path / rng_file(0)
    return torch.load(io.BytesIO(file.read_bytes()), map_location="cpu", weights_only=True)


def gathered_model(model: torch.nn.Module, config: ModelConfig) -> Transformer | None:
    """Every rank calls this: FSDP's shards gathered into one plain model on rank 0 (None elsewhere),
    which best/ and final/ are written from as ordinary full safetensors."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:  # ranks other than 0 receive nothing with cpu_offload
        return None
    with torch.random.fork_rng(devices=[]):  # building it must not move rank 0's random stream
        plain = Transformer(config)
    plain.load_state_dict(full)
    return plain.eval()
