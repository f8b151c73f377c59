"""Corpus readers: every malformed input names its file and line; good input streams in order."""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import lzma

import datasets
import pytest

from fucina.data.readers import ReadStats, iter_texts, read_conversations
from fucina.errors import DataError


def _jsonl(*records) -> bytes:
    """JSONL bytes; str items are written verbatim (to build broken lines), others as JSON."""
    lines = [
        r.encode() if isinstance(r, str) else r if isinstance(r, bytes) else json.dumps(r).encode()
        for r in records
    ]
    return b"\n".join(lines) + b"\n"


GOOD_TEXT = {"text": "Il gatto dorme sul divano."}
GOOD_CHAT = {
    "messages": [
        {"role": "user", "content": "Ciao, come stai?"},
        {"role": "assistant", "content": "Bene, grazie!"},
    ]
}


def _chat(*messages):
    return {"messages": [{"role": r, "content": c} for r, c in messages]}


# (case id, reader, bad record, expected words in the message). The bad record is written at line 4,
# after two good records and a blank line, so the line count must include blank lines.
MALFORMED_RECORDS = [
    ("malformed_json", "texts", '{"text": "ciao"', "malformed JSON"),
    ("not_an_object", "texts", "[1, 2, 3]", "expected a JSON object, got list"),
    ("string_not_object", "chats", '"solo una stringa"', "expected a JSON object, got str"),
    ("missing_fields", "texts", {"id": 7, "title": "x"}, "none of the fields"),
    ("missing_messages", "chats", {"id": 7}, "no 'messages'"),
    ("text_wrong_type", "texts", {"text": 42}, "field 'text' must be a string, got int"),
    ("text_empty", "texts", {"text": "   "}, "field 'text' is empty"),
    ("messages_not_list", "chats", {"messages": "ciao"}, "'messages' must be a list"),
    ("messages_empty", "chats", {"messages": []}, "'messages' is empty"),
    ("message_not_object", "chats", {"messages": ["ciao"]}, "message 1 must be an object"),
    ("message_without_content", "chats", {"messages": [{"role": "user"}]}, "message 1 has no 'content'"),
    (
        "content_wrong_type",
        "chats",
        {"messages": [{"role": "user", "content": ["a"]}]},
        "'content' must be a string, got list",
    ),
    ("unknown_role", "chats", _chat(("user", "Ciao"), ("bot", "Salve")), "unknown role 'bot'"),
    ("unknown_role_in_texts", "texts", _chat(("narratore", "C'era una volta")), "unknown role 'narratore'"),
    (
        "empty_content",
        "chats",
        _chat(("user", "Ciao"), ("assistant", " \n")),
        "message 2 (assistant) has empty content",
    ),
    ("no_assistant_turn", "chats", _chat(("system", "Sei gentile."), ("user", "Ciao")), "no assistant turn"),
    ("prompt_without_response", "chats", {"prompt": "Quanto fa 2+2?"}, "'prompt' without 'response'"),
    (
        "response_wrong_type",
        "texts",
        {"prompt": "Quanto fa 2+2?", "response": None},
        "'response' must be a string, got null",
    ),
    ("invalid_utf8", "texts", b'{"text": "citt\xe0 rotta"}', "invalid UTF-8"),
]


@pytest.mark.parametrize(
    ("reader", "bad", "expected"), [c[1:] for c in MALFORMED_RECORDS], ids=[c[0] for c in MALFORMED_RECORDS]
)
def test_malformed_record_error_names_file_and_line(tmp_path, reader, bad, expected):
    good = GOOD_TEXT if reader == "texts" else GOOD_CHAT
    path = tmp_path / "corpus_bad.jsonl"
    path.write_bytes(_jsonl(good, good, "", bad, good))
    with pytest.raises(DataError) as caught:
        if reader == "texts":
            list(iter_texts([path]))
        else:
            read_conversations(path)
    message = str(caught.value)
    assert "corpus_bad.jsonl:4:" in message
    assert expected in message
    assert caught.value.line == 4


@pytest.mark.parametrize("compression", ["xz", "gz"])
def test_truncated_archive_error_names_file_and_line(tmp_path, compression):
    records = [{"text": f"Documento numero {i}. " * 20} for i in range(3000)]
    data = _jsonl(*records)
    packed = lzma.compress(data) if compression == "xz" else gzip.compress(data)
    path = tmp_path / f"corpus.jsonl.{compression}"
    path.write_bytes(packed[: len(packed) * 2 // 3])
    with pytest.raises(DataError, match="truncated or corrupt") as caught:
        list(iter_texts([path]))
    assert f"corpus.jsonl.{compression}:" in str(caught.value)
    assert 1 < caught.value.line <= len(records)
    assert f":{caught.value.line}:" in str(caught.value)


def test_truncated_archive_raises_even_with_skip_bad(tmp_path):
    packed = lzma.compress(_jsonl(*[GOOD_TEXT] * 2000))
    path = tmp_path / "corpus.jsonl.xz"
    path.write_bytes(packed[:-50])
    with pytest.raises(DataError, match="truncated"):
        list(iter_texts([path], skip_bad=True))


def test_corrupt_compressed_text_file_is_reported(tmp_path):
    path = tmp_path / "novella.txt.gz"
    path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match=r"novella\.txt\.gz:1: compressed data is truncated or corrupt"):
        list(iter_texts([path]))


def test_missing_file_is_reported_by_name(tmp_path):
    with pytest.raises(DataError, match=r"assente\.jsonl: file not found"):
        list(iter_texts([tmp_path / "assente.jsonl"]))
    with pytest.raises(DataError, match=r"assente\.jsonl: file not found"):
        read_conversations(tmp_path / "assente.jsonl")


@pytest.mark.parametrize("name", ["vuoto.jsonl", "vuoto.jsonl.xz", "vuoto.jsonl.gz"])
def test_empty_file_is_an_error(tmp_path, name):
    path = tmp_path / name
    opener = {"xz": lzma.open, "gz": gzip.open}.get(name.rsplit(".", 1)[-1], open)
    with opener(path, "wb") as handle:
        handle.write(b"\n  \n")
    with pytest.raises(DataError, match="empty") as caught:
        list(iter_texts([path]))
    assert name in str(caught.value)


def test_empty_text_file_is_an_error(tmp_path):
    path = tmp_path / "vuoto.txt"
    path.write_text("  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"vuoto\.txt: empty document"):
        list(iter_texts([path]))


def test_invalid_utf8_in_text_file_names_the_line(tmp_path):
    path = tmp_path / "racconto.txt"
    path.write_bytes(b"Prima riga.\nSeconda riga.\nTerza \xff riga.\n")
    with pytest.raises(DataError, match=r"racconto\.txt:3: invalid UTF-8"):
        list(iter_texts([path]))


def test_unsupported_suffix_is_rejected(tmp_path):
    path = tmp_path / "dati.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"dati\.csv: unsupported file type"):
        list(iter_texts([path]))


def test_plain_text_file_in_conversations_is_rejected(tmp_path):
    path = tmp_path / "chat.txt"
    path.write_text("utente: ciao\n", encoding="utf-8")
    with pytest.raises(DataError, match="must be JSONL"):
        read_conversations(path)


def test_skip_bad_counts_skipped_records_and_warns(tmp_path, caplog):
    path = tmp_path / "misto.jsonl"
    path.write_bytes(
        _jsonl(GOOD_CHAT, "{rotto", GOOD_CHAT, _chat(("user", "solo domanda")), {"messages": 3}, GOOD_CHAT)
    )
    stats = ReadStats()
    with caplog.at_level(logging.WARNING, logger="fucina.data.readers"):
        conversations = read_conversations(path, skip_bad=True, stats=stats)
    assert len(conversations) == 3
    assert (stats.records, stats.skipped) == (3, 3)
    assert "misto.jsonl:2: malformed JSON" in stats.first_error
    assert any("skipped 3 bad record" in r.getMessage() for r in caplog.records)


def test_skip_bad_skips_bad_text_records_but_keeps_order(tmp_path):
    path = tmp_path / "testi.jsonl"
    path.write_bytes(_jsonl({"text": "uno"}, {"text": 5}, b'{"text": "\xfe"}', {"text": "due"}, [1]))
    stats = ReadStats()
    assert list(iter_texts([path], skip_bad=True, stats=stats)) == ["uno", "due"]
    assert (stats.records, stats.skipped) == (2, 3)


def test_all_records_bad_with_skip_bad_is_still_an_error(tmp_path):
    path = tmp_path / "tutto_rotto.jsonl"
    path.write_bytes(_jsonl("{", "["))
    with pytest.raises(DataError, match="no documents"):
        list(iter_texts([path], skip_bad=True))


def test_text_file_is_one_document_and_jsonl_fields_give_texts(tmp_path):
    prose = "Primo paragrafo.\n\nSecondo paragrafo, con accenti: perché, città.\n"
    (tmp_path / "racconto.txt.gz").write_bytes(gzip.compress(prose.encode()))
    records = [
        {"text": "testo semplice"},
        _chat(("system", "Sii breve."), ("user", "Ciao"), ("assistant", "Salve")),
        {"prompt": "Domanda?", "response": "Risposta."},
        {"instruction": "Traduci", "input": "cat", "output": "gatto"},
        {"instruction": "Saluta", "output": "Ciao!"},
    ]
    (tmp_path / "misti.jsonl.xz").write_bytes(lzma.compress(_jsonl(*records)))
    texts = list(iter_texts([tmp_path / "racconto.txt.gz", tmp_path / "misti.jsonl.xz"]))
    assert texts == [
        prose,
        "testo semplice",
        "Sii breve.\nCiao\nSalve",
        "Domanda?\nRisposta.",
        "Traduci\n\ncat\ngatto",
        "Saluta\nCiao!",
    ]


def test_directory_input_reads_supported_files_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("seconda", encoding="utf-8")
    (tmp_path / "a.txt").write_text("prima", encoding="utf-8")
    (tmp_path / "note.md").write_text("ignorata", encoding="utf-8")
    assert list(iter_texts([tmp_path])) == ["prima", "seconda"]


def test_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _jsonl(GOOD_TEXT))
    assert list(iter_texts([path])) == [GOOD_TEXT["text"]]


def test_jsonl_streams_records_before_reading_the_rest(tmp_path):
    # The broken line 3 is never reached when the consumer stops after the first record.
    path = tmp_path / "lungo.jsonl"
    path.write_bytes(_jsonl({"text": "primo"}, {"text": "secondo"}, "{rotto"))
    assert next(iter(iter_texts([path]))) == "primo"


def test_prompt_response_pairs_become_user_and_assistant_messages(tmp_path):
    path = tmp_path / "coppie.jsonl"
    path.write_bytes(_jsonl({"prompt": "Capitale d'Italia?", "response": "Roma.", "id": 1}))
    assert read_conversations(path) == [
        [{"role": "user", "content": "Capitale d'Italia?"}, {"role": "assistant", "content": "Roma."}]
    ]


def test_conversation_messages_keep_only_role_and_content(tmp_path):
    record = {
        "messages": [
            {"role": "user", "content": "Ciao", "lang": "it"},
            {"role": "assistant", "content": "Ehi"},
        ]
    }
    path = tmp_path / "chat.jsonl"
    path.write_bytes(_jsonl(record))
    assert read_conversations(path) == [
        [{"role": "user", "content": "Ciao"}, {"role": "assistant", "content": "Ehi"}]
    ]


def test_datasets_objects_are_read_like_jsonl_records():
    text_ds = datasets.Dataset.from_dict({"text": ["uno", "due"], "id": [1, 2]})
    assert list(iter_texts([text_ds])) == ["uno", "due"]
    pairs = datasets.Dataset.from_dict({"instruction": ["Saluta"], "output": ["Ciao!"]})
    assert list(iter_texts([pairs])) == ["Saluta\nCiao!"]
    chats = datasets.Dataset.from_list([GOOD_CHAT, GOOD_CHAT])
    assert read_conversations(chats) == [GOOD_CHAT["messages"]] * 2


def test_bad_dataset_row_names_the_row():
    chats = datasets.Dataset.from_list([GOOD_CHAT, _chat(("user", "Ciao"), ("robot", "Bip"))])
    with pytest.raises(DataError, match=r"<dataset .*>:2: message 2 has unknown role 'robot'"):
        read_conversations(chats)


def test_dataset_dict_asks_for_one_split():
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})})
    with pytest.raises(DataError, match="several splits"):
        list(iter_texts([splits]))


def test_real_chat_file_reads_as_valid_conversations(shared_data):
    conversations = read_conversations(shared_data / "xpersona-it" / "xpersona_it_valid.chat.jsonl")
    assert len(conversations) == 140
    for messages in conversations:
        assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Persona:")
        assert any(m["role"] == "assistant" for m in messages)
        assert all(set(m) == {"role", "content"} and m["content"].strip() for m in messages)


def test_real_xz_corpus_streams_its_first_documents(shared_data):
    path = shared_data / "exams-it" / "exams_it_wikipedia_snippets.jsonl.xz"
    first = list(itertools.islice(iter_texts([path]), 50))
    assert len(first) == 50
    assert all(len(text) >= 200 for text in first)  # the README: segments under 200 chars were dropped
