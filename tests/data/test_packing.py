"""Pretraining packing: every token of every document lands once in one split, readable across shards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fucina.data.packing import (
    PIECE_CHARS,
    TokenShards,
    check_tokenizer,
    encode_documents,
    pack_corpus,
    token_dtype,
    validation_size,
)
from fucina.data.readers import iter_texts
from fucina.errors import DataError, TokenizerError
from fucina.tokenizer import FucinaTokenizer, train_tokenizer

SENTENCES = [
    "La città di Bologna è famosa per la sua cucina e per l'università più antica d'Europa.",
    "Perché non andiamo al mare domani? Il tempo sarà bello, così dicono.",
    "Nel mezzo del cammin di nostra vita mi ritrovai per una selva oscura.",
    "L'acqua del lago era fredda, ma i ragazzi nuotarono lo stesso fino all'isola.",
    "Il treno delle 7:45 per Milano è in ritardo di 20 minuti.",
    "Quest'anno la vendemmia è stata abbondante e il vino sarà ottimo.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(SENTENCES * 20, vocab_size=400, template="chatml", show_progress=False)


def _documents(count: int) -> list[str]:
    """Distinct small documents, some with accents and spelled special tokens (which stay text)."""
    docs = [f"Documento {i}. {SENTENCES[i % len(SENTENCES)]}" for i in range(count)]
    docs[1] = "Un testo che scrive <|endoftext|> e <|im_start|>user a mano."
    return docs


def _documents_of(directory, split: str, tokenizer) -> list[list[int]]:
    shards = TokenShards(directory, split)
    stream = shards.tokens(0, shards.num_tokens)
    docs = np.split(stream, np.flatnonzero(stream == tokenizer.eos_id) + 1)
    assert docs[-1].size == 0, "the stream ends with EOS"
    return [doc[:-1].tolist() for doc in docs[:-1]]


def test_packing_loses_and_duplicates_no_token(tmp_path, tokenizer):
    docs = _documents(2000)
    info = pack_corpus(iter(docs), tokenizer, tmp_path / "data")
    encoded = {doc: tokenizer.encode(doc) for doc in docs}
    position = {doc: i for i, doc in enumerate(docs)}
    decoded_by_split = {}
    for split in ("train", "val"):
        pieces = _documents_of(tmp_path / "data", split, tokenizer)
        texts = [tokenizer.decode(ids) for ids in pieces]
        assert all(ids == encoded[text] for ids, text in zip(pieces, texts))
        assert [position[t] for t in texts] == sorted(position[t] for t in texts), "corpus order kept"
        shards = TokenShards(tmp_path / "data", split)
        assert shards.num_tokens == sum(len(encoded[t]) + 1 for t in texts) == info.splits[split].tokens
        assert shards.num_bytes == sum(len(t.encode("utf-8")) for t in texts)
        assert shards.num_documents == len(texts) == info.splits[split].documents
        decoded_by_split[split] = texts
    train, val = decoded_by_split["train"], decoded_by_split["val"]
    assert sorted(train + val) == sorted(docs), "train + val is the corpus, each document once"
    assert (len(train), len(val)) == (1000, 1000), "min_val_docs=1000 holds on a 2000-document corpus"


@pytest.mark.parametrize(
    ("documents", "val_fraction", "min_val_docs", "expected_val"),
    [
        (2000, 0.01, 1000, 1000),  # enough documents: the floor applies
        (1999, 0.01, 1000, 20),  # fewer than twice the floor: plain 1%
        (200_000, 0.01, 1000, 2000),  # 1% above the floor
        (10, 0.01, 1000, 1),  # small corpora keep one validation document
        (2, 0.5, 0, 1),
        (5, 0.9, 0, 4),  # ...and at least one training document
    ],
)
def test_validation_size_rule(documents, val_fraction, min_val_docs, expected_val):
    assert validation_size(documents, val_fraction, min_val_docs) == expected_val


@pytest.mark.parametrize(("count", "expected_val"), [(10, 1), (300, 3), (2, 1)])
def test_small_corpora_keep_documents_in_both_splits(tmp_path, tokenizer, count, expected_val):
    info = pack_corpus(_documents(count), tokenizer, tmp_path / "data")
    assert (info.train.documents, info.val.documents) == (count - expected_val, expected_val)


def test_one_document_cannot_be_split(tmp_path, tokenizer):
    with pytest.raises(DataError, match="at least 2 documents"):
        pack_corpus(["Solo un documento."], tokenizer, tmp_path / "data")


def test_split_is_decided_by_seed(tmp_path, tokenizer):
    docs = _documents(400)

    def val_texts(seed, name):
        pack_corpus(docs, tokenizer, tmp_path / name, val_fraction=0.05, seed=seed)
        return [tokenizer.decode(ids) for ids in _documents_of(tmp_path / name, "val", tokenizer)]

    first, again, other = val_texts(0, "a"), val_texts(0, "b"), val_texts(1, "c")
    assert first == again
    assert len(first) == len(other) == 20 and set(first) != set(other)


def test_small_vocabulary_packs_as_uint16(tmp_path, tokenizer):
    info = pack_corpus(_documents(50), tokenizer, tmp_path / "data")
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert info.dtype == meta["dtype"] == "uint16"
    assert meta["vocab_size"] == tokenizer.vocab_size
    shard = tmp_path / "data" / meta["splits"]["train"]["shards"][0]
    assert shard.stat().st_size == 2 * meta["splits"]["train"]["tokens"]
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32


def test_windows_cross_shard_boundaries(tmp_path, tokenizer):
    info = pack_corpus(_documents(300), tokenizer, tmp_path / "data", shard_tokens=97)
    assert len(info.train.shards) > 5
    shards = TokenShards(tmp_path / "data", "train")
    reference = np.concatenate(
        [np.fromfile(tmp_path / "data" / name, dtype=np.uint16) for name in info.train.shards]
    )
    assert reference.size == shards.num_tokens
    context = 64  # 64 does not divide 97, so many windows straddle two shards
    crossing = 0
    for index in range(shards.num_windows(context)):
        start = index * context
        window = shards.window(index, context)
        assert window.dtype == np.int64 and window.size == context + 1
        np.testing.assert_array_equal(window, reference[start : start + context + 1])
        crossing += start // 97 != (start + context) // 97
    assert crossing > 10


def test_windows_predict_every_token_once(tmp_path, tokenizer):
    pack_corpus(_documents(100), tokenizer, tmp_path / "data")
    shards = TokenShards(tmp_path / "data", "train")
    context = 32
    count = shards.num_windows(context)
    assert count == (shards.num_tokens - 1) // context
    targets = np.concatenate([shards.window(i, context)[1:] for i in range(count)])
    np.testing.assert_array_equal(targets, shards.tokens(1, 1 + count * context))
    with pytest.raises(IndexError):
        shards.window(count, context)


def test_batch_labels_are_inputs_shifted_by_one(tmp_path, tokenizer):
    pack_corpus(_documents(50), tokenizer, tmp_path / "data")
    shards = TokenShards(tmp_path / "data", "train")
    batch = shards.batch([0, 2], context_length=16)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 16)
    assert batch["input_ids"][0, 1:].tolist() == batch["labels"][0, :-1].tolist()
    assert batch["labels"][1].tolist() == shards.window(2, 16)[1:].tolist()


def test_missing_dataset_directory_is_reported(tmp_path):
    with pytest.raises(DataError, match="packed dataset directory not found"):
        TokenShards(tmp_path / "nessuno", "train")


def test_interrupted_pack_does_not_look_complete(tmp_path, tokenizer):
    pack_corpus(_documents(20), tokenizer, tmp_path / "data")
    (tmp_path / "data" / "meta.json").unlink()  # as if the process died before the last step
    with pytest.raises(DataError, match="packing did not finish"):
        TokenShards(tmp_path / "data", "train")


def test_truncated_shard_is_reported(tmp_path, tokenizer):
    info = pack_corpus(_documents(20), tokenizer, tmp_path / "data")
    shard = tmp_path / "data" / info.train.shards[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated or replaced"):
        TokenShards(tmp_path / "data", "train")


def test_different_tokenizer_is_rejected(tmp_path, tokenizer):
    pack_corpus(_documents(20), tokenizer, tmp_path / "data")
    smaller = train_tokenizer(SENTENCES * 20, vocab_size=300, template="chatml", show_progress=False)
    with pytest.raises(TokenizerError, match="vocab size 400"):
        TokenShards(tmp_path / "data", "train", tokenizer=smaller)
    other_corpus = ["Gatti, cani e uccelli sopra la collina verde."] * 30 + [s.upper() for s in SENTENCES] * 5
    other = train_tokenizer(other_corpus, vocab_size=400, template="chatml", show_progress=False)
    assert other.vocab_size == tokenizer.vocab_size
    with pytest.raises(TokenizerError, match="different tokenizer"):
        check_tokenizer(tmp_path / "data", other)
    check_tokenizer(tmp_path / "data", tokenizer)


def test_bad_input_leaves_the_previous_dataset_intact(tmp_path, tokenizer):
    before = pack_corpus(_documents(30), tokenizer, tmp_path / "data")
    broken = tmp_path / "rotto.jsonl"
    broken.write_text('{"text": "buono"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"rotto\.jsonl:2"):
        pack_corpus(iter_texts([broken]), tokenizer, tmp_path / "data")
    assert TokenShards(tmp_path / "data", "train").num_tokens == before.train.tokens
    assert not list((tmp_path / "data").glob("*.tmp"))


def test_repacking_replaces_old_shards(tmp_path, tokenizer):
    pack_corpus(_documents(300), tokenizer, tmp_path / "data", shard_tokens=100)
    info = pack_corpus(_documents(300), tokenizer, tmp_path / "data")
    files = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert files == sorted(["meta.json", *info.train.shards, *info.val.shards])


VARIED_TEXT = (
    "Riga uno.\n\n  Riga due, con  due spazi\te un tab.\r\nNumeri: 1234567 e 3,14; l'acqua dell’isola è là.   \n"
    "Fine paragrafo!\n\n\n"
)


@pytest.mark.parametrize("pretokenizer", ["italian", "bytelevel"])
def test_long_documents_encoded_in_pieces_give_the_same_ids(pretokenizer):
    tokenizer = train_tokenizer(
        [VARIED_TEXT, *SENTENCES] * 10, vocab_size=400, pretokenizer=pretokenizer, show_progress=False
    )
    docs = [VARIED_TEXT * 40, "corto", SENTENCES[0] * 30]
    pieces_per_doc, ids_per_doc, current, count = [], [], [], 0
    for ids, _, last in encode_documents(tokenizer, docs, piece_chars=50):
        current += ids
        count += 1
        if last:
            ids_per_doc.append(current)
            pieces_per_doc.append(count)
            current, count = [], 0
    assert ids_per_doc == [tokenizer.encode(doc) for doc in docs]
    assert pieces_per_doc[0] > 50 and pieces_per_doc[1] == 1


def test_documents_are_not_cut_when_the_pre_tokenizer_is_unknown(tokenizer):
    custom = FucinaTokenizer(tokenizer.backend, tokenizer.template, pretokenizer="custom")
    pieces = list(encode_documents(custom, [VARIED_TEXT * 40], piece_chars=50))
    assert len(pieces) == 1 and pieces[0][0] == tokenizer.encode(VARIED_TEXT * 40)


def test_a_document_longer_than_a_piece_packs_exactly(tmp_path, tokenizer):
    big = VARIED_TEXT * (PIECE_CHARS // len(VARIED_TEXT) + 50)
    docs = ["Primo documento.", big, "Ultimo documento."]
    pack_corpus(docs, tokenizer, tmp_path / "data", seed=0)
    packed = _documents_of(tmp_path / "data", "train", tokenizer) + _documents_of(
        tmp_path / "data", "val", tokenizer
    )
    assert sorted(map(tuple, packed)) == sorted(tuple(tokenizer.encode(doc)) for doc in docs)
