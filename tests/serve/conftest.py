"""Fixtures for the server tests: the tiny model directory and a shared server (helpers in serving.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serving import MODEL_NAME, start_server, train_model_dir


@pytest.fixture(scope="session")
def served_model_dir(tmp_path_factory) -> Path:
    """A model directory whose greedy reply to QUESTION is ANSWER."""
    return train_model_dir(tmp_path_factory.mktemp("serve") / MODEL_NAME)


@pytest.fixture(scope="session")
def server_url(served_model_dir) -> Iterator[str]:
    """One shared server of the tiny model: 16 rows, no API key."""
    with start_server(served_model_dir, max_batch=16, max_queue=64) as url:
        yield url
