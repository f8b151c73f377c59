"""Checkpoints: exact round trip, atomic writes, corruption detected, fallback, disk-full safety."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fucina.errors import CheckpointError
from fucina.train import checkpoint as ckpt
from fucina.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)


def _state(seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    generator = torch.Generator().manual_seed(seed)
    weights = {
        "a.weight": torch.randn(8, 4, generator=generator),
        "b.bias": torch.randn(4, generator=generator),
    }
    trainer = {"progress": {"step": seed, "position": [0, seed]}, "rng": {"torch": torch.get_rng_state()}}
    return weights, trainer


def test_round_trip_is_exact(tmp_path):
    weights, trainer = _state(3)
    save_checkpoint(tmp_path, 3, weights, trainer, keep_last=2)
    loaded = load_checkpoint(tmp_path / "step-00000003")
    assert loaded.step == 3
    assert all(torch.equal(loaded.model_state[k], v) for k, v in weights.items())
    assert loaded.trainer_state["progress"] == trainer["progress"]
    assert torch.equal(loaded.trainer_state["rng"]["torch"], trainer["rng"]["torch"])


def test_only_the_last_k_are_kept(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, *_state(step), keep_last=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 5]


def test_truncated_newest_checkpoint_falls_back_to_the_previous_and_is_kept_aside(tmp_path):
    save_checkpoint(tmp_path, 1, *_state(1), keep_last=3)
    newest = save_checkpoint(tmp_path, 2, *_state(2), keep_last=3)
    weights_file = newest / ckpt.MODEL_FILE
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    loaded = load_latest_checkpoint(tmp_path)
    assert loaded.step == 1
    kept = [p.name for p in tmp_path.iterdir() if p.name.startswith("corrupt-step-00000002")]
    assert kept, "the corrupt checkpoint must be kept, not deleted"


def test_no_usable_checkpoint_is_a_clear_error_naming_the_file_and_renames_nothing(tmp_path):
    path = save_checkpoint(tmp_path, 1, *_state(1), keep_last=3)
    (path / ckpt.STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"trainer_state.pt: truncated"):
        load_latest_checkpoint(tmp_path)
    assert path.is_dir()


def test_bit_flip_is_detected_by_the_checksum(tmp_path):
    path = save_checkpoint(tmp_path, 1, *_state(1), keep_last=3)
    data = bytearray((path / ckpt.MODEL_FILE).read_bytes())
    data[-1] ^= 0xFF
    (path / ckpt.MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt"):
        load_checkpoint(path)


def test_trainer_state_never_unpickles_arbitrary_objects(tmp_path):
    path = save_checkpoint(tmp_path, 1, *_state(1), keep_last=3)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    import hashlib
    import io
    import json

    buffer = io.BytesIO()
    torch.save({"evil": Evil()}, buffer)
    payload = buffer.getvalue()
    (path / ckpt.STATE_FILE).write_bytes(payload)
    manifest = json.loads((path / ckpt.MANIFEST_FILE).read_text())
    manifest["files"][ckpt.STATE_FILE] = {
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    (path / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="unreadable trainer state"):
        load_checkpoint(path)


def test_disk_full_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    previous = save_checkpoint(tmp_path, 1, *_state(1), keep_last=1)
    before = {p.name: p.read_bytes() for p in previous.iterdir()}

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.os, "fsync", no_space)
    with pytest.raises(CheckpointError, match="No space left on device") as error:
        save_checkpoint(tmp_path, 2, *_state(2), keep_last=1)
    monkeypatch.undo()
    assert "\n" not in str(error.value)
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == [previous.name]  # no temporary left behind
    assert load_latest_checkpoint(tmp_path).step == 1


def test_a_stray_temporary_write_is_ignored_and_cleared(tmp_path):
    save_checkpoint(tmp_path, 1, *_state(1), keep_last=3)
    stray = tmp_path / ".tmp-step-00000002.12345"
    stray.mkdir()
    (stray / ckpt.MODEL_FILE).write_bytes(b"half a file")
    assert load_latest_checkpoint(tmp_path).step == 1
    assert not stray.exists()


def test_kill_during_writes_never_leaves_a_broken_checkpoint(tmp_path):
    """SIGKILL a process that is saving big checkpoints back to back; what remains must load."""
    script = textwrap.dedent(
        f"""
        import os, signal, threading, torch
        from fucina.train.checkpoint import save_checkpoint
        weights = {{"w": torch.randn(2048, 2048)}}  # 16 MiB: a write takes a while
        threading.Timer(0.8, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
        for step in range(1, 1000):
            save_checkpoint({str(tmp_path)!r}, step, weights, {{"step": step}}, keep_last=2)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert result.returncode == -9, result.stderr.decode()
    saved = list_checkpoints(tmp_path)
    assert saved, "the process was killed before its first checkpoint; raise the timer"
    loaded = load_latest_checkpoint(tmp_path)
    assert loaded.step == saved[-1][0]
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
