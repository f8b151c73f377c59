"""Study and reference corpora never contain a held-out document."""

from __future__ import annotations

import json

from fucina.evaluate.heldout import heldout_texts, training_texts
from fucina.study.corpus import chunk_text, write_study_corpus


def test_training_texts_leave_out_every_heldout_wikipedia_passage(shared_data):
    held_out = set(heldout_texts(shared_data, "wikipedia"))
    training = list(training_texts(shared_data, "wikipedia"))
    assert len(held_out) == 1000
    assert len(training) == 14_729 - 1000
    assert not held_out.intersection(training)


def test_chunks_cut_at_paragraphs_and_keep_every_paragraph():
    text = "\n".join(f"Paragrafo numero {i} di una storia italiana." for i in range(50))
    chunks = list(chunk_text(text, 200))
    assert all(len(chunk) < 200 + 60 for chunk in chunks)
    assert "\n".join(chunks) == text


def test_builtin_study_corpus_keeps_validation_apart(tmp_path):
    files = write_study_corpus(tmp_path, corpus="builtin", train_chars=20_000, val_chars=2_000)
    train = [json.loads(line)["text"] for line in files.train.read_text(encoding="utf-8").splitlines()]
    val = [json.loads(line)["text"] for line in files.val.read_text(encoding="utf-8").splitlines()]
    assert files.source == "builtin" and 20_000 <= files.train_chars < 25_000
    assert not set(train).intersection(val)
