"""Tests of the Italian byte-level BPE: round trips, special tokens, saving/loading, HF parity, CLI."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fucina.chat_template import CHAT_TEMPLATE_NAMES, get_chat_template
from fucina.cli.main import main as fucina_main
from fucina.errors import ConfigError, TokenizerError
from fucina.tokenizer import (
    PRETOKENIZER_NAMES,
    FucinaTokenizer,
    bpe_merges,
    pretokenize,
    train_tokenizer,
)

ITALIAN_SENTENCES = [
    "Com'è andata l'altra sera dall'avvocato? Bene, grazie: siamo tornati a casa alle 23.",
    "L'acqua dell'Arno è più fredda di quella del Tevere, perché scende dall'Appennino.",
    "Quest'anno un'amica di mia sorella è partita per l'università di Bologna.",
    "C'è chi dice che la città più bella d'Italia sia Venezia; c'era una volta un re.",
    "Nell'estate del 1890 il medico partì da Napoli con 3 valigie e 250 lire.",
    "«Perché non vieni anche tu?» chiese Giovanni. «Un po' di riposo ti farà bene.»",
    "È già tardi: la nonna prepara il caffè e le tagliatelle al ragù per tutti.",
    "Sull’isola d’Elba l’estate è lunga, e l’aria profuma di mare e di macchia.",
    "Però non so più dov'è finito il libro che mi avevi prestato l'anno scorso.",
    "Il treno per Milano parte alle 7.45 dal binario 12: è in ritardo di 15 minuti.",
    "Gli studenti dell'istituto tecnico hanno vinto il concorso nazionale di matematica.",
    "Dopo la pioggia, il sole è tornato a splendere sulle colline della Toscana.",
]
CORPUS = [" ".join(ITALIAN_SENTENCES[i:] + ITALIAN_SENTENCES[:i]) for i in range(len(ITALIAN_SENTENCES))] * 4
VOCAB_SIZE = 450

ROUND_TRIP_TEXTS = [
    "Com'è andata l'altra sera dall'avvocato?",
    "L’università è là, più giù: perché no? Così sia.",
    "ÀÈÉÌÒÙ àèéìòù — «virgolette» e ‘apici’",
    "Nel 1890, il 25% di 3.141,59 € era niente.",
    "riga uno\nriga due\n\n\tcon tab\r\nfine\n",
    "spazi    multipli   e  finali   ",
    "emoji 🎉🇮🇹👩‍👩‍👧 e caratteri rari: ∑ ø 中文",
    "e\u0300 accento combinato, perche\u0301",
    "",
]


@pytest.fixture(scope="module")
def tokenizers_by_template() -> dict[str, FucinaTokenizer]:
    return {
        name: train_tokenizer(CORPUS, VOCAB_SIZE, name, show_progress=False) for name in CHAT_TEMPLATE_NAMES
    }


@pytest.fixture(scope="module")
def tokenizers_by_pretokenizer() -> dict[str, FucinaTokenizer]:
    return {
        name: train_tokenizer(CORPUS, VOCAB_SIZE, "chatml", pretokenizer=name, show_progress=False)
        for name in PRETOKENIZER_NAMES
    }


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, tokenizers_by_template) -> Path:
    directory = tmp_path_factory.mktemp("tok") / "microdac"
    tokenizers_by_template["microdac"].save(directory)
    return directory


@pytest.mark.parametrize("pretokenizer", PRETOKENIZER_NAMES)
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_of_encode_gives_back_the_exact_text(tokenizers_by_pretokenizer, pretokenizer, text):
    tok = tokenizers_by_pretokenizer[pretokenizer]
    assert tok.decode(tok.encode(text)) == text


def test_training_learns_merges_up_to_the_requested_vocab_size(tokenizers_by_template):
    for tok in tokenizers_by_template.values():
        assert tok.vocab_size == VOCAB_SIZE
        assert len(tok.encode(ITALIAN_SENTENCES[0])) < len(ITALIAN_SENTENCES[0].encode("utf-8")) / 2


@pytest.mark.parametrize("name", CHAT_TEMPLATE_NAMES)
def test_special_tokens_take_the_first_ids_in_template_order(tokenizers_by_template, name):
    tok = tokenizers_by_template[name]
    template = get_chat_template(name)
    assert [tok.token_to_id(token) for token in template.special_tokens] == list(
        range(len(template.special_tokens))
    )
    assert tok.special_ids == frozenset(range(len(template.special_tokens)))
    assert tok.eos_id == template.special_tokens.index(template.eos_token)
    assert tok.pad_id == template.special_tokens.index(template.pad_token)
    for token, attribute in ((template.bos_token, tok.bos_id), (template.unk_token, tok.unk_id)):
        assert attribute == (None if token is None else template.special_tokens.index(token))


@pytest.mark.parametrize("name", CHAT_TEMPLATE_NAMES)
def test_no_merge_builds_a_special_token(tokenizers_by_template, name):
    tok = tokenizers_by_template[name]
    specials = set(tok.template.special_tokens)
    merges = bpe_merges(tok.backend)
    assert merges, "training produced no merges"
    assert not {left + right for left, right in merges} & specials
    ordinary = [tok.id_to_token(i) for i in range(tok.vocab_size) if i not in tok.special_ids]
    assert not set(ordinary) & specials


@pytest.mark.parametrize("name", CHAT_TEMPLATE_NAMES)
def test_spelled_special_tokens_in_text_are_encoded_as_ordinary_text(tokenizers_by_template, name):
    tok = tokenizers_by_template[name]
    text = "ecco " + " ".join(tok.template.special_tokens) + "".join(tok.template.special_tokens)
    ids = tok.encode(text)
    assert not set(ids) & tok.special_ids
    assert tok.decode(ids) == text


def test_decode_keeps_or_skips_special_tokens_on_request(tokenizers_by_template):
    tok = tokenizers_by_template["chatml"]
    ids = [tok.token_to_id("<|im_start|>"), *tok.encode("ciao"), tok.token_to_id("<|im_end|>")]
    assert tok.decode(ids) == "ciao"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>ciao<|im_end|>"


def test_huggingface_loads_tokenizer_json_with_identical_ids(saved_dir, tokenizers_by_template):
    tok = tokenizers_by_template["microdac"]
    hf = PreTrainedTokenizerFast(tokenizer_file=str(saved_dir / "tokenizer.json"))
    for text in ROUND_TRIP_TEXTS + ITALIAN_SENTENCES:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.encode(text) == tok.encode(text)  # no post-processor adds tokens behind our back
        assert hf.decode(tok.encode(text)) == text


def test_auto_tokenizer_loads_the_saved_directory_offline(saved_dir, tokenizers_by_template):
    tok = tokenizers_by_template["microdac"]
    hf = AutoTokenizer.from_pretrained(saved_dir, local_files_only=True)
    assert hf.encode(ITALIAN_SENTENCES[0], add_special_tokens=False) == tok.encode(ITALIAN_SENTENCES[0])
    assert (hf.bos_token, hf.eos_token, hf.pad_token, hf.unk_token) == (
        "<|bos|>",
        "<|eos|>",
        "<|pad|>",
        "<|unk|>",
    )
    assert hf.chat_template == tok.template.jinja
    assert hf.convert_tokens_to_ids("<|assistant|>") == tok.token_to_id("<|assistant|>")


def test_tokenizer_config_records_template_pretokenizer_and_special_tokens(saved_dir):
    config = json.loads((saved_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["fucina_template"] == "microdac"
    assert config["fucina_pretokenizer"] == "italian"
    assert config["chat_template"] == get_chat_template("microdac").jinja
    assert config["eos_token"] == "<|eos|>"


def test_load_of_a_directory_or_its_file_gives_the_same_tokenizer(saved_dir, tokenizers_by_template):
    original = tokenizers_by_template["microdac"]
    for path in (saved_dir, saved_dir / "tokenizer.json"):
        loaded = FucinaTokenizer.load(path)
        assert loaded.template.name == "microdac"
        assert loaded.pretokenizer == "italian"
        assert loaded.vocab_size == original.vocab_size
        text = "Dov'è <|assistant|> l'acqua?"
        assert loaded.encode(text) == original.encode(text)
        assert not set(loaded.encode(text)) & loaded.special_ids


def test_load_without_config_infers_the_template_from_special_ids(tmp_path, saved_dir):
    shutil.copy(saved_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    assert FucinaTokenizer.load(tmp_path).template.name == "microdac"


def test_load_of_missing_or_corrupt_tokenizer_raises_naming_the_path(tmp_path):
    with pytest.raises(TokenizerError, match="nowhere"):
        FucinaTokenizer.load(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        FucinaTokenizer.load(tmp_path)


def test_load_rejects_a_corrupt_config(tmp_path, saved_dir):
    shutil.copy(saved_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2", encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        FucinaTokenizer.load(tmp_path)


def test_italian_pretokenizer_keeps_elisions_with_the_left_word():
    assert pretokenize("dell'acqua", "italian") == ["dell'", "acqua"]
    assert pretokenize("l’altra", "italian") == ["l’", "altra"]
    assert pretokenize("Com'è andata l'altra sera", "italian") == [
        "Com'",
        "è",
        " andata",
        " l'",
        "altra",
        " sera",
    ]
    assert pretokenize("Quest'anno un'amica c'era", "italian") == [
        "Quest'",
        "anno",
        " un'",
        "amica",
        " c'",
        "era",
    ]
    assert pretokenize("un po' di più", "italian") == ["un", " po'", " di", " più"]


def test_italian_pretokenizer_treats_accented_vowels_as_letters_and_keeps_digit_runs():
    assert pretokenize("È così perché là", "italian") == ["È", " così", " perché", " là"]
    assert pretokenize("perche\u0301 no", "italian") == ["perche\u0301", " no"]
    assert pretokenize("nel 1890", "italian") == ["nel", " 1890"]


def test_italian_pretokenizer_pieces_never_cross_a_llama_cpp_bloom_boundary():
    # bloom keeps ` ?[^(\\s|.,!?…)]+` runs; the text between them must be exactly our stop/space pieces.
    text = "Ciao,  come stai?\n\n «Bene», disse; nel 2024 c'erano 3,5 l''acqua  .\n . fine"
    assert pretokenize(text, "italian") == [
        "Ciao", ", ", " come", " stai", "?\n\n", " «", "Bene", "»", ",", " disse", ";", " nel", " 2024",
        " c'", "erano", " 3", ",", "5", " l'", "'", "acqua", "  .\n .", " fine",
    ]  # fmt: skip


def test_bytelevel_pretokenizer_is_plain_gpt2_and_splits_the_apostrophe():
    assert pretokenize("dell'acqua", "bytelevel") == ["dell", "'", "acqua"]
    assert pretokenize("nel 1890", "bytelevel") == ["nel", " 1890"]


def test_no_italian_token_crosses_an_elision(tokenizers_by_pretokenizer):
    tok = tokenizers_by_pretokenizer["italian"]
    pieces = [piece for _, piece in tok.pieces("dell'acqua nell'estate")]
    assert "".join(pieces) == "dell'acqua nell'estate"
    boundaries = {len("dell'"), len("dell'acqua nell'")}
    position = 0
    for piece in pieces:
        assert not any(position < boundary < position + len(piece) for boundary in boundaries)
        position += len(piece)


def test_pieces_are_readable_text_not_byte_symbols(tokenizers_by_template):
    tok = tokenizers_by_template["chatml"]
    pieces = tok.pieces(" città più")
    assert "".join(piece for _, piece in pieces) == " città più"
    assert all("Ġ" not in piece and "Ã" not in piece for _, piece in pieces)
    # a character the tiny vocabulary never saw is split into bytes, shown as such
    assert [piece for _, piece in tok.pieces("🎉")] == ["<0xF0>", "<0x9F>", "<0x8E>", "<0x89>"]


def test_train_rejects_bad_settings():
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer(CORPUS, 200, "chatml", show_progress=False)
    with pytest.raises(ConfigError, match="pre-tokenizer"):
        train_tokenizer(CORPUS, 400, "chatml", pretokenizer="sentencepiece", show_progress=False)
    with pytest.raises(ConfigError, match="chat template"):
        train_tokenizer(CORPUS, 400, "alpaca", show_progress=False)


def test_train_rejects_non_string_texts():
    with pytest.raises(TokenizerError, match="#1"):
        train_tokenizer(["testo", 42], 400, "chatml", show_progress=False)


def test_cli_trains_from_files_and_shows_readable_pieces(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("\n".join(CORPUS[:20]), encoding="utf-8")
    records = [json.dumps({"text": text}, ensure_ascii=False) for text in CORPUS[20:]]
    (tmp_path / "b.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", "--input", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    argv += ["--vocab-size", "400", "--template", "picodac", "--out", str(out)]
    assert fucina_main(argv) == 0
    printed = capsys.readouterr().out
    assert "vocab size 400" in printed and str(out) in printed
    assert FucinaTokenizer.load(out).template.name == "picodac"

    assert fucina_main(argv) == 2  # refuses to overwrite without --force
    assert "already exists" in capsys.readouterr().err

    assert fucina_main(["tokenizer", "show", str(out), "Com'è andata l'altra sera dall'avvocato?"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    tok = FucinaTokenizer.load(out)
    expected = tok.pieces("Com'è andata l'altra sera dall'avvocato?")
    assert lines[-1].startswith(f"{len(expected)} tokens")
    shown = [line.strip().split("  ", 1) for line in lines[:-1]]
    assert [(int(i), ast.literal_eval(piece)) for i, piece in shown] == expected
