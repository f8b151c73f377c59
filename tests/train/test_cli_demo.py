"""`fucina demo`: both stages through the same loop, three answers, bits per byte; a re-run resumes."""

from __future__ import annotations

import json

from fucina.cli.demo import PROMPTS, recipe_path
from fucina.cli.main import main
from fucina.train.config import load_train_config

TINY = [
    "train.max_steps=2",
    "train.batch_size=4",
    "eval.max_batches=1",
    "log.progress=false",
    "train.num_threads=1",
]


def _demo(out, capsys) -> str:
    args = ["demo", "--out", str(out)]
    for override in TINY:
        args += ["--set-pretrain", override, "--set-sft", override]
    assert main(args) == 0
    return capsys.readouterr().out


def test_demo_trains_both_stages_and_answers_three_questions(tmp_path, capsys):
    out = _demo(tmp_path / "demo", capsys)
    for question in PROMPTS:
        assert f"> {question}" in out
    assert "validation bits per byte: pretraining" in out
    stages = {
        name: json.loads((tmp_path / "demo" / name / "best" / "training.json").read_text())["stage"]
        for name in ("pretrain", "chat")
    }
    assert stages == {"pretrain": "pretrain", "chat": "sft"}
    tokenizer_config = json.loads((tmp_path / "demo/chat/tokenizer_config.json").read_text())
    assert tokenizer_config["fucina_template"] == "picodac"
    # Running it again resumes the finished runs (no training) and gives the same greedy answers.
    again = _demo(tmp_path / "demo", capsys)
    answers = out[out.index("[3/3]") : out.index("validation bits")]
    assert answers == again[again.index("[3/3]") : again.index("validation bits")]


def test_demo_recipes_are_picodac_sized_with_a_1920_token_tokenizer():
    pretrain = load_train_config(recipe_path("demo-pretrain.yaml"))
    sft = load_train_config(recipe_path("demo-sft.yaml"))
    assert pretrain.model["preset"] == "picodac" and pretrain.tokenizer.vocab_size == 1920
    assert pretrain.tokenizer.template == "picodac"
    assert (pretrain.stage, sft.stage) == ("pretrain", "sft")
