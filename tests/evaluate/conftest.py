"""Fixtures of the evaluation tests: a small real tokenizer trained on the built-in Italian prose."""

from __future__ import annotations

from pathlib import Path

import pytest

from fucina.tokenizer import FucinaTokenizer, train_tokenizer

PROSE_DIR = Path(__file__).resolve().parents[2] / "src" / "fucina" / "resources" / "corpus" / "prosa"


@pytest.fixture(scope="session")
def tokenizer() -> FucinaTokenizer:
    texts = [path.read_text(encoding="utf-8") for path in sorted(PROSE_DIR.glob("*.txt"))]
    return train_tokenizer(texts, vocab_size=600, template="chatml", show_progress=False)
