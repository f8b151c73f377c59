"""`fucina generate` and `fucina chat` on a trained run: chat template, raw mode, history that fits."""

from __future__ import annotations

import io

import pytest

from fucina.cli.main import main
from fucina.inference.chat import chat_prompt
from fucina.tokenizer import FucinaTokenizer
from fucina.train.config import config_from_dict
from fucina.train.loop import train
from train_helpers import sft_config


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, pretrained_run):
    run = tmp_path_factory.mktemp("chat") / "run"
    train(config_from_dict(sft_config(pretrained_run, train={"max_steps": 4})), run)
    return run


def test_generate_answers_a_user_message_of_a_chat_run(chat_run, capsys):
    assert (
        main(["generate", "--model", str(chat_run), "Ciao, come stai?", "--greedy", "--max-new-tokens", "8"])
        == 0
    )
    answer = capsys.readouterr().out
    assert "Ciao, come stai?" not in answer  # only the reply is printed


def test_generate_raw_continues_the_text(chat_run, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                str(chat_run),
                "La pizza",
                "--raw",
                "--seed",
                "1",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("La pizza")


def test_seeded_sampling_repeats(chat_run, capsys):
    args = ["generate", "--model", str(chat_run), "Ciao", "--seed", "3", "--max-new-tokens", "10"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


def test_chat_reads_lines_resets_and_exits(chat_run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Ciao!\nCome stai?\n/reset\nGrazie\n/exit\n"))
    assert main(["chat", "--model", str(chat_run), "--greedy", "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("> ") >= 4
    assert "(conversation cleared)" in captured.err


def test_chat_history_drops_the_oldest_turns_to_fit_the_context(pretrained_run):
    tokenizer = FucinaTokenizer.load(pretrained_run)
    system = {"role": "system", "content": "Rispondi in italiano."}
    history = []
    for i in range(12):
        history += [
            {"role": "user", "content": f"Domanda numero {i} sulla cucina italiana?"},
            {"role": "assistant", "content": f"Risposta numero {i}: la pasta e la pizza."},
        ]
    history.append({"role": "user", "content": "Ultima domanda?"})
    ids = chat_prompt(tokenizer, [system, *history], context_length=64, max_new_tokens=16)
    assert len(ids) <= 64 - 16
    text = tokenizer.decode(ids)
    assert text.startswith("Rispondi in italiano.")  # the system message stays
    assert "Ultima domanda?" in text and "numero 0" not in text  # newest kept, oldest dropped
