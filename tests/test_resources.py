"""The built-in corpus is present, large enough to train on, and well formed."""

from __future__ import annotations

import json

import pytest

from fucina.resources import builtin_chat_file, builtin_prose_files

MIN_PROSE_BYTES = 100_000
MIN_PROSE_FILES = 20
MIN_CONVERSATIONS = 300
ROLES = {"system", "user", "assistant"}


def test_builtin_prose_is_large_enough_to_train_a_tokenizer():
    files = builtin_prose_files()
    total_bytes = sum(len(path.read_bytes()) for path in files)
    assert len(files) >= MIN_PROSE_FILES
    assert total_bytes >= MIN_PROSE_BYTES


def test_builtin_prose_files_are_sorted_nonempty_utf8_documents():
    files = builtin_prose_files()
    assert files == sorted(files)
    for path in files:
        assert path.suffix == ".txt"
        text = path.read_bytes().decode("utf-8")  # raises on any invalid byte
        assert text.strip(), f"{path.name} is empty"
        assert "\r" not in text, f"{path.name} has Windows line endings"


def test_builtin_prose_is_italian_with_accents_and_elisions():
    text = "\n".join(path.read_text(encoding="utf-8") for path in builtin_prose_files())
    for marker in ("è", "perché", "città", "più", "l'", "c'è", "un'", "La capitale d'Italia è Roma."):
        assert marker in text, f"built-in prose never contains {marker!r}"


def test_builtin_conversations_are_valid_chats():
    path = builtin_chat_file()
    if not path.is_file():
        pytest.skip(f"built-in conversations not written yet: {path} is missing")
    conversations = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        messages = record.get("messages")
        assert isinstance(messages, list) and messages, f"line {number}: no 'messages' list"
        for message in messages:
            assert message.get("role") in ROLES, f"line {number}: bad role {message.get('role')!r}"
            content = message.get("content")
            assert isinstance(content, str) and content.strip(), f"line {number}: empty content"
        roles = {message["role"] for message in messages}
        assert {"user", "assistant"} <= roles, f"line {number}: needs a user and an assistant turn"
        conversations.append(record)
    assert len(conversations) >= MIN_CONVERSATIONS
