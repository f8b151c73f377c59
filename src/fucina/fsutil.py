"""Writing files and directories so that a crash or an error never leaves half of one behind.

Every writer in fucina goes through here: model and tokenizer files, checkpoints, run configuration and
metrics, packed-data metadata, reports, exports.

Design choices, and why:
- A file is written to a temporary sibling (`.NAME.tmp-PID`, same directory so the rename stays on one
  file system), flushed and fsynced, then moved over the final name with `os.replace`, and the directory
  fsynced. Readers see the old file or the new one, never a mix, even after a power cut; training resumes
  from these files, so every write gets the guarantee checkpoints need (an fsync is cheap next to a step).
- `atomic_path` is the same for libraries that write a file themselves (safetensors' `save_file`,
  `torch.save`): they write the temporary path, the rest happens on leaving the block.
- On an exception the temporary is removed and the old file is left as it was.
- Directories (`staged_output`): an existing output path is refused unless the caller passes
  `overwrite=True` (`--overwrite`): never a silent overwrite. A path that is, or contains, the model
  being read is refused even then. Everything is written into `.NAME.tmp-PID`, fsynced, and renamed into
  place when complete; with `overwrite` the previous output is moved aside (`.NAME.old-PID`) first,
  put back if the swap fails, and removed only after the new one is in place.
- A directory is never replaced by a file or the other way round, even with `overwrite`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fucina.errors import FucinaError


class OutputExistsError(FucinaError):
    """The output path exists and overwriting was not asked for (or cannot be done safely)."""


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    """The hidden name `path` is staged under (`.NAME.tmp-PID`) or moved aside to (`.NAME.old-PID`)."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def fsync_directory(directory: str | Path) -> None:
    """Make a rename or creation inside `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_durably(path: str | Path, data: bytes | str) -> None:
    """Write `data` to a NEW file (inside a directory staged as a whole) and fsync it."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with open(path, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and moved to `path`, else removed."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)


def write_atomically(path: str | Path, data: bytes | str) -> None:
    """Replace `path` by `data` (str is written as UTF-8): readers see the old or the new file, never half."""
    with atomic_path(path) as tmp:
        write_durably(tmp, data)


def write_json_atomically(
    path: str | Path, data: Any, *, indent: int | None = 2, ensure_ascii: bool = False
) -> None:
    """Write `data` as JSON (plus a final newline) to `path`, atomically."""
    write_atomically(path, json.dumps(data, ensure_ascii=ensure_ascii, indent=indent) + "\n")


def check_output(out: Path, overwrite: bool, is_dir: bool, protected: Path | None = None) -> None:
    """Raise OutputExistsError when writing `out` would replace something it must not."""
    if protected is not None:
        resolved, source = out.resolve(), protected.resolve()
        if resolved == source or resolved in source.parents:
            raise OutputExistsError(
                f"{out} is (or contains) the model being read, {protected}; choose another"
            )
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() != is_dir:
        kind = "a directory" if out.is_dir() else "a file"
        raise OutputExistsError(f"{out} exists and is {kind}; choose another output path")
    if not overwrite:
        raise OutputExistsError(f"{out} already exists; choose another path or add --overwrite to replace it")


@contextmanager
def staged_output(
    out: str | Path, overwrite: bool = False, is_dir: bool = True, protected: Path | None = None
) -> Iterator[Path]:
    """Yield a temporary path to write the output into; it becomes `out` when the block succeeds."""
    out = Path(out)
    check_output(out, overwrite, is_dir, protected)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, aside = temporary_sibling(out), temporary_sibling(out, "old")
    _remove(tmp)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if out.exists() or out.is_symlink():
            out.rename(aside)
        tmp.rename(out)
    except BaseException:
        _remove(tmp)
        if (aside.exists() or aside.is_symlink()) and not out.exists():
            aside.rename(out)
        raise
    fsync_directory(out.parent)
    _remove(aside)


def _fsync_tree(path: Path) -> None:
    if not path.is_dir():
        _fsync_file(path)
        return
    for root, _, files in os.walk(path):
        for name in files:
            _fsync_file(Path(root) / name)
        fsync_directory(root)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
