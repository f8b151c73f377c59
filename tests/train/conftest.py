"""Fixtures of the training tests: a tokenizer trained once, a tiny pretrained run."""

from __future__ import annotations

from pathlib import Path

import pytest

from fucina.data.readers import iter_texts
from fucina.resources import builtin_chat_file, builtin_prose_files
from fucina.tokenizer import train_tokenizer
from fucina.train.config import config_from_dict
from fucina.train.loop import train
from train_helpers import TINY_VOCAB, tiny_config


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 400-id picodac-template tokenizer trained once on the built-in prose and conversations."""
    directory = tmp_path_factory.mktemp("tokenizer")
    texts = iter_texts([*builtin_prose_files(), builtin_chat_file()])
    train_tokenizer(texts, TINY_VOCAB, template="picodac", show_progress=False).save(directory)
    return directory


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny pretraining run (8 steps), the starting point of the SFT tests."""
    run = tmp_path_factory.mktemp("pretrained") / "run"
    train(config_from_dict(tiny_config(tokenizer_dir)), run)
    return run
