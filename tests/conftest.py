"""Shared test fixtures: where the real Italian data lives, and a calm torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fucina.model.transformer import Transformer
from tiny_models import VARIANTS, tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FUCINA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

# Tests are small; two threads is the machine, and fewer threads keeps runs repeatable.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real corpora of ../shared/data (see its README); tests read slices of them."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def variant_model(request) -> Transformer:
    """One tiny model per attention variant (MHA, GQA, MQA, sliding window; learned and RoPE)."""
    return tiny_model(**VARIANTS[request.param])
