"""Tokenizer report: characters and bytes per token, for a fucina tokenizer or any tokenizer.json."""

from __future__ import annotations

import pytest

from fucina.errors import TokenizerError
from fucina.evaluate.tokenizer_report import measure_tokenizer, tokenizer_report

TEXTS = ["Perché l’università è là, più giù?", "La nonna prepara il caffè."]


def test_counts_are_exact_for_a_saved_tokenizer_json(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok")
    stats = measure_tokenizer(tmp_path / "tok" / "tokenizer.json", TEXTS)
    tokens = sum(len(tokenizer.encode(t)) for t in TEXTS)
    assert stats.tokens == tokens
    assert stats.characters == sum(len(t) for t in TEXTS)
    assert stats.bytes == sum(len(t.encode("utf-8")) for t in TEXTS) > stats.characters  # accents: 2 bytes
    assert stats.chars_per_token == pytest.approx(stats.characters / tokens)
    assert stats.bytes_per_token == pytest.approx(stats.bytes / tokens)
    assert stats.words == 11 and stats.roundtrip_failures == 0 and stats.unknown_tokens == 0


def test_a_directory_and_a_loaded_tokenizer_give_the_same_report(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok")
    assert measure_tokenizer(tmp_path / "tok", TEXTS) == measure_tokenizer(tokenizer, TEXTS)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer at .*nothing"):
        measure_tokenizer(tmp_path / "nothing", TEXTS)


def test_report_on_the_heldout_texts(tokenizer, shared_data):
    stats = tokenizer_report(tokenizer, shared_data, sources=["wikipedia"], limit=50)
    assert [s.source for s in stats] == ["wikipedia"]
    assert stats[0].documents == 50
    assert 1.5 < stats[0].chars_per_token < 6
