"""Writing an output (a directory or one file) without ever destroying what is already there.

Design choices, and why:
- An existing output path is refused unless the caller passes `overwrite=True` (`--overwrite`): never a
  silent overwrite. A path that is, or contains, the model being read is refused even then.
- Everything is written into a temporary sibling (`.NAME.tmp-PID`) and renamed into place only when it
  is complete, so an interrupted export leaves no half-written output behind the final name; with
  `overwrite` the previous output is moved aside first and removed only after the new one is in place.
- A directory is never replaced by a file or the other way round, even with `overwrite`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fucina.errors import FucinaError


class OutputExistsError(FucinaError):
    """The output path exists and overwriting was not asked for (or cannot be done safely)."""


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
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    _remove(tmp)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    aside = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(aside)
    tmp.rename(out)
    _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
