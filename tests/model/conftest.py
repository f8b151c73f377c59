"""Fixtures of the model tests: one tiny model per attention variant."""

from __future__ import annotations

import pytest
from tiny_models import VARIANTS, tiny_model

from fucina.model.transformer import Transformer


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def variant_model(request) -> Transformer:
    """One tiny model per attention variant (MHA, GQA, MQA, sliding window; learned and RoPE)."""
    return tiny_model(**VARIANTS[request.param])
