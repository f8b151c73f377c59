"""The packed ternary file of a BitNet model, written from a model or run directory.

Design choices, and why:
- The format itself (2-bit codes, one scale per matrix, the loader) is compress/ternary.py; this is the
  export beside the HF and GGUF ones, shared by `fucina export --format ternary` and the older
  `fucina model export-ternary`, so both resolve the directory, refuse and overwrite alike.
- Same output rules as the other formats (fucina.fsutil): an existing output is refused unless
  `overwrite`, checked before the model is loaded; the file is staged and renamed into place; the model
  directory being read is never replaced.
- No tokenizer is needed or written: the file holds the model only (load it with load_ternary), so a
  model directory without tokenizer.json exports too, unlike the HF and GGUF formats.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from fucina.compress.ternary import export_ternary
from fucina.fsutil import check_output
from fucina.model.io import load_model
from fucina.model_dir import resolve_model_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TernaryExport:
    """What was written: the file, its size, and the same model's parameters in bf16 for comparison."""

    path: Path
    size: int
    bf16_size: int

    def summary(self) -> str:
        """One line for the CLI: the file, its size and its share of the bf16 model."""
        return (
            f"wrote {self.path}: {self.size:,} bytes ({self.size / self.bf16_size:.0%} of the model's "
            f"{self.bf16_size:,} bytes in bf16)"
        )


def export_ternary_model(
    model: str | Path, out: str | Path, dtype: torch.dtype = torch.bfloat16, overwrite: bool = False
) -> TernaryExport:
    """Write the BitNet model of the model or run directory `model` as the packed file `out`.

    `dtype` is for the tensors that are not ternary (embeddings, head, norms). ConfigError names the
    model's linear kind when it is not a BitNet model; OutputExistsError when `out` exists.
    """
    model_dir = resolve_model_dir(model)
    out = Path(out)
    check_output(out, overwrite, is_dir=False, protected=model_dir)
    loaded = load_model(model_dir)
    size = export_ternary(loaded, out, dtype=dtype, overwrite=overwrite, protected=model_dir)
    bf16_size = sum(p.numel() for p in loaded.parameters()) * 2
    log.info("wrote %s (%d bytes)", out, size)
    return TernaryExport(out, size, bf16_size)
