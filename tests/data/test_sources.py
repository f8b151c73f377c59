"""`data.exclude`: documents a split list holds out are never read for training, tokenizer or validation."""

from __future__ import annotations

import json
import lzma

import pytest

from fucina.data.loaders import read_records, read_texts
from fucina.data.readers import ReadStats
from fucina.errors import ConfigError, DataError
from fucina.train.config import config_from_dict
from train_helpers import tiny_config


def _corpus(tmp_path):
    """data/prose.jsonl.xz (4 docs, 2 held out), data/chat.jsonl (3 chats, 1 held out), data/splits.json."""
    data = tmp_path / "data"
    data.mkdir()
    with lzma.open(data / "prose.jsonl.xz", "wt", encoding="utf-8") as handle:
        for i in range(4):
            handle.write(json.dumps({"id": f"doc/{i}", "text": f"Documento numero {i}."}) + "\n")
    chats = [
        {
            "id": f"c{i}",
            "messages": [{"role": "user", "content": f"D{i}"}, {"role": "assistant", "content": f"R{i}"}],
        }
        for i in range(3)
    ]
    (data / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    splits = {
        "_about": "held out",
        "prose.jsonl.xz": {"field": "id", "test": ["doc/1", "doc/3"]},
        "chat.jsonl": {"field": "id", "test": ["c2"]},
    }
    (data / "splits.json").write_text(json.dumps(splits), encoding="utf-8")
    return data


def _config(data, **section):
    return config_from_dict(tiny_config(None, data={"exclude": [str(data / "splits.json")], **section}))


def test_held_out_documents_are_left_out_of_pretraining_text(tmp_path):
    data = _corpus(tmp_path)
    config = _config(data, train=[str(data / "prose.jsonl.xz")])
    assert list(read_texts(config.data.train, "prose", config)) == [
        "Documento numero 0.",
        "Documento numero 2.",
    ]


def test_held_out_conversations_are_left_out_of_fine_tuning(tmp_path):
    data = _corpus(tmp_path)
    config = _config(data, train=[str(data / "chat.jsonl")])
    conversations = list(read_records(config.data.train, "chat", config, "conversation", ReadStats()))
    assert [c[1]["content"] for c in conversations] == ["R0", "R1"]


def test_a_whole_file_can_be_held_out(tmp_path):
    data = _corpus(tmp_path)
    (data / "splits.json").write_text(json.dumps({"chat.jsonl": {"test": "all"}}), encoding="utf-8")
    config = _config(data, train=[str(data / "chat.jsonl"), str(data / "prose.jsonl.xz")])
    assert len(list(read_texts(config.data.train, "prose", config))) == 4  # only the prose


def test_a_directory_holding_a_held_out_file_is_refused(tmp_path):
    data = _corpus(tmp_path)
    config = _config(data, train=[str(data)])
    with pytest.raises(ConfigError, match="held-out file"):
        list(read_texts(config.data.train, "prose", config))


def test_a_missing_split_list_is_named(tmp_path):
    data = _corpus(tmp_path)
    config = config_from_dict(
        tiny_config(
            None, data={"train": [str(data / "chat.jsonl")], "exclude": [str(tmp_path / "nope.json")]}
        )
    )
    with pytest.raises(DataError, match="nope.json"):
        list(read_texts(config.data.train, "prose", config))


def test_bad_lines_of_a_filtered_file_are_named_or_skipped(tmp_path):
    data = _corpus(tmp_path)
    with open(data / "chat.jsonl", "a", encoding="utf-8") as handle:
        handle.write("{broken\n")
    config = _config(data, train=[str(data / "chat.jsonl")])
    with pytest.raises(DataError, match=r"chat.jsonl:4: malformed JSON"):
        list(read_texts(config.data.train, "prose", config))
    config = _config(data, train=[str(data / "chat.jsonl")], skip_bad=True)
    assert len(list(read_texts(config.data.train, "prose", config))) == 2
