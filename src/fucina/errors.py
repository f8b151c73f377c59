"""Exception types that name their cause.

Every error a user can provoke with bad input derives from `FucinaError`; the CLI prints it as one
line and exits non-zero (traceback only with `--debug`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class FucinaError(Exception):
    """Base class for errors caused by the user's input, files or environment."""


class ConfigError(FucinaError):
    """A configuration file or override is malformed, has unknown keys or bad values."""


class DataError(FucinaError):
    """Input data is malformed; names the file and, when known, the 1-based line."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.path = str(path) if path is not None else None
        self.line = line
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(f"{where}{message}")


class TokenizerError(FucinaError):
    """A tokenizer is missing, unreadable or does not match what it is used with."""


class CheckpointError(FucinaError):
    """A checkpoint or saved model is missing, truncated, corrupt or incompatible."""
