"""Fixtures for the quantization tests: a real tiny tokenizer and small model directories in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
from quantize_helpers import CONFIGS, make_model_dir

from fucina.resources import builtin_prose_files
from fucina.tokenizer import FucinaTokenizer, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> FucinaTokenizer:
    texts = [path.read_text(encoding="utf-8") for path in builtin_prose_files()[:4]]
    return train_tokenizer(texts, 300, template="chatml", show_progress=False)


@pytest.fixture(params=list(CONFIGS))
def model_dir(request, tmp_path, tokenizer) -> Path:
    return make_model_dir(tmp_path / request.param, request.param, tokenizer)
