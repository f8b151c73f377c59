"""The mask viewer and the `fucina data` commands, run as a user would."""

from __future__ import annotations

import json
import re

import pytest

from fucina.cli.main import main
from fucina.data.mask_view import render_mask, token_texts
from fucina.data.packing import TokenShards
from fucina.tokenizer import train_tokenizer

CHAT = [
    {"role": "system", "content": "Rispondi in italiano."},
    {"role": "user", "content": "Che giorno è oggi?"},
    {"role": "assistant", "content": "È lunedì, purtroppo."},
    {"role": "user", "content": "Perché purtroppo?"},
    {"role": "assistant", "content": "Perché si torna al lavoro!"},
]
ANSI = re.compile(r"\033\[[0-9;]*m")


@pytest.fixture(scope="module")
def tokenizer():
    texts = [m["content"] for m in CHAT] * 10 + ["Il gatto dorme sul divano, e la città è tranquilla."] * 10
    return train_tokenizer(texts, vocab_size=320, template="chatml", show_progress=False)


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    tokenizer.save(directory)
    return directory


def test_token_texts_spell_out_exactly_the_rendered_conversation(tokenizer):
    # Unseen characters (emoji, ŝ) are split into byte tokens that are not UTF-8 on their own.
    chat = [*CHAT, {"role": "user", "content": "Ciao 🙂 ŝ"}, {"role": "assistant", "content": "🍕!"}]
    ids = tokenizer.template.encode(tokenizer, chat).input_ids
    texts = token_texts(tokenizer, ids)
    assert len(texts) == len(ids)
    assert "".join(texts) == tokenizer.template.render(chat)
    assert "" in texts, "a token holding part of a character adds no text of its own"


def test_plain_rendering_brackets_exactly_the_assistant_replies(tokenizer):
    view = render_mask(tokenizer, CHAT, color=False)
    body, summary = view.rsplit("\n\n", 1)
    assert re.findall(r"⟦(.*?)⟧", body, flags=re.S) == [
        "È lunedì, purtroppo.<|im_end|>",
        "Perché si torna al lavoro!<|im_end|>",
    ]
    encoded = tokenizer.template.encode(tokenizer, CHAT)
    assert summary.startswith(f"{len(encoded.input_ids)} tokens, {sum(encoded.assistant_mask)} supervised")
    assert "<|im_start|>user\nChe giorno è oggi?<|im_end|>" in body
    assert "\033[" not in view


def test_train_on_last_brackets_only_the_last_reply(tokenizer):
    body = render_mask(tokenizer, CHAT, train_on="last", color=False).rsplit("\n\n", 1)[0]
    assert re.findall(r"⟦(.*?)⟧", body, flags=re.S) == ["Perché si torna al lavoro!<|im_end|>"]


def test_colored_rendering_highlights_the_same_text(tokenizer):
    colored = render_mask(tokenizer, CHAT, color=True)
    plain = render_mask(tokenizer, CHAT, color=False)
    assert "\033[30;42m" in colored
    assert ANSI.sub("", colored) == plain.replace("⟦", "").replace("⟧", "")


def test_show_mask_command_prints_the_chosen_conversation(tmp_path, tokenizer_dir, capsys):
    chats = tmp_path / "chat.jsonl"
    other = [{"role": "user", "content": "Ciao"}, {"role": "assistant", "content": "Ciao a te."}]
    chats.write_text("\n".join(json.dumps({"messages": m}) for m in (other, CHAT)) + "\n", encoding="utf-8")
    args = ["data", "show-mask", "--tokenizer", str(tokenizer_dir), "--input", str(chats), "--index", "1"]
    assert main([*args, "--no-color", "--train-on", "last"]) == 0
    out = capsys.readouterr().out
    assert "⟦Perché si torna al lavoro!<|im_end|>⟧" in out
    assert "⟦È lunedì" not in out and "Ciao a te." not in out
    assert re.search(r"\d+ tokens, \d+ supervised", out)


def test_show_mask_index_out_of_range_is_one_clear_error(tmp_path, tokenizer_dir, capsys):
    chats = tmp_path / "chat.jsonl"
    chats.write_text(json.dumps({"messages": CHAT}) + "\n", encoding="utf-8")
    code = main(
        ["data", "show-mask", "--tokenizer", str(tokenizer_dir), "--input", str(chats), "--index", "3"]
    )
    assert code == 2
    assert "--index 3 is out of range: the file has 1 conversations" in capsys.readouterr().err


def test_pack_command_writes_shards_and_reports_splits(tmp_path, tokenizer_dir, capsys):
    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": f"Documento {i}: il gatto dorme."}) for i in range(30)] + ["{rotto"]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "packed"
    args = ["data", "pack", "--tokenizer", str(tokenizer_dir), "--input", str(corpus), "--out", str(out)]
    assert main(args) == 2
    assert "corpus.jsonl:31: malformed JSON" in capsys.readouterr().err
    assert main([*args, "--skip-bad", "--val-fraction", "0.1", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"train\s+27 documents", printed) and re.search(r"val\s+3 documents", printed)
    assert "skipped 1 bad record" in printed
    assert TokenShards(out, "val").num_documents == 3


@pytest.mark.parametrize("command", [["data"], ["data", "pack"], ["data", "show-mask"]])
def test_data_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: fucina data" in capsys.readouterr().out
