"""`fucina eval` end to end on a saved model and a miniature data root laid out like ../shared/data."""

from __future__ import annotations

import argparse
import json
import lzma
from pathlib import Path

import pytest
import torch

from fucina.cli.eval import register
from fucina.errors import ConfigError
from fucina.model.config import ModelConfig
from fucina.model.io import save_model
from fucina.model.transformer import Transformer

NOVELS = ["C'era una volta un re che viveva in un castello.", "Il treno partì all'alba verso Firenze."]
PASSAGES = ["Roma è la capitale d'Italia.", "Il Po è il fiume più lungo d'Italia.", "Napoli è sul mare."]
CHATS = [
    [{"role": "user", "content": "Ciao!"}, {"role": "assistant", "content": "Ciao, come posso aiutarti?"}]
]


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for folder in ("eltec-ita", "exams-it", "xpersona-it", "xcopa-it"):
        (root / folder).mkdir(parents=True)
    novels = [{"id": f"n{i}", "text": t} for i, t in enumerate([*NOVELS, "Un romanzo usato per addestrare."])]
    passages = [{"id": f"w{i}", "text": t} for i, t in enumerate(PASSAGES)]
    with lzma.open(root / "eltec-ita/eltec_ita.jsonl.xz", "wt", encoding="utf-8") as handle:
        handle.write(_jsonl(novels))
    with lzma.open(root / "exams-it/exams_it_wikipedia_snippets.jsonl.xz", "wt", encoding="utf-8") as handle:
        handle.write(_jsonl(passages))
    (root / "xpersona-it/xpersona_it_test.chat.jsonl").write_text(_jsonl([{"messages": m} for m in CHATS]))
    (root / "xcopa-it/xcopa_it_test.mc.jsonl").write_text(
        _jsonl(
            [
                {
                    "question": "Piove.",
                    "choices": ["Apro l'ombrello.", "Mangio."],
                    "answer": 0,
                    "question_type": "effect",
                },
                {
                    "question": "Ho fame.",
                    "choices": ["Ho corso.", "Ho dormito."],
                    "answer": 0,
                    "question_type": "cause",
                },
            ]
        )
    )
    (root / "xcopa-it/xcopa_it_validation.mc.jsonl").write_text(
        _jsonl(
            [
                {
                    "question": "Fa freddo.",
                    "choices": ["Accendo la stufa.", "Nuoto."],
                    "answer": 0,
                    "question_type": "effect",
                }
            ]
        )
    )
    splits = {
        "eltec-ita/eltec_ita.jsonl.xz": {"field": "id", "test": ["n0", "n1"]},
        "exams-it/exams_it_wikipedia_snippets.jsonl.xz": {"field": "id", "test": ["w0", "w1", "w2"]},
        "xpersona-it/xpersona_it_test.chat.jsonl": {"field": "*", "test": "all"},
    }
    (root / "splits.json").write_text(json.dumps(splits))
    return root


@pytest.fixture
def model_dir(tokenizer, tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=tokenizer.vocab_size, context_length=16, n_layers=1, d_model=16, n_heads=2)
    )
    directory = tmp_path / "run" / "best"
    save_model(model, directory)
    tokenizer.save(directory)
    return tmp_path / "run"


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fucina")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


def test_eval_prints_the_table_and_writes_json(model_dir, data_root, tmp_path, capsys):
    text_file = tmp_path / "mine.txt"
    text_file.write_text("Una prova di testo italiano.", encoding="utf-8")
    out = tmp_path / "results.json"
    argv = [
        "--model",
        str(model_dir),
        "--tasks",
        f"bpb,tokenizer,xcopa,{text_file}",
        "--data-dir",
        str(data_root),
    ]
    code = _run([*argv, "--out", str(out), "--no-progress", "--shots", "1"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "task" in printed and "chance" in printed and "bpb/eltec" in printed
    results = json.loads(out.read_text(encoding="utf-8"))
    rows = {(r["task"], r["metric"]): r for r in results["results"]}
    eltec = results["details"]["bpb/eltec"]
    assert eltec["documents"] == 2 and eltec["bytes"] == sum(len(t.encode()) for t in NOVELS)
    assert rows[("bpb/wikipedia", "bits_per_byte")]["n"] == sum(len(t.encode()) for t in PASSAGES)
    assert rows[("bpb/xpersona", "bits_per_byte")]["n"] == len(b"Ciao, come posso aiutarti?")
    assert rows[("bpb/mine.txt", "loss")]["value"] > 0
    assert rows[("xcopa", "acc")]["n"] == 2 and rows[("xcopa", "acc")]["chance"] == 0.5
    assert rows[("tokenizer/eltec", "chars_per_token")]["value"] > 1
    assert results["settings"]["shots"] == 1


def test_tokenizer_report_runs_without_a_model(tokenizer, data_root, tmp_path, capsys):
    tokenizer.save(tmp_path / "tok")
    code = _run(
        [
            "--tokenizer",
            str(tmp_path / "tok" / "tokenizer.json"),
            "--tasks",
            "tokenizer",
            "--data-dir",
            str(data_root),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "tokenizer/wikipedia" in printed and "bytes_per_token" in printed


def test_model_tasks_without_a_model_are_a_clear_error(data_root):
    with pytest.raises(ConfigError, match="--model is required"):
        _run(["--tasks", "xcopa", "--data-dir", str(data_root)])


def test_list_tasks_names_every_builtin(capsys):
    assert _run(["--list-tasks"]) == 0
    printed = capsys.readouterr().out
    for name in ("bpb", "tokenizer", "italic", "exams", "xcopa", "itacola", "fever"):
        assert name in printed
