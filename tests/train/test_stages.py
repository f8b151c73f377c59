"""The stage table: a stage is a row (data builder + objective), and the loop runs whatever row it names."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from fucina.errors import ConfigError
from fucina.train.config import config_from_dict
from fucina.train.loop import train
from fucina.train.objectives import LanguageModelingObjective, ObjectiveOutput
from fucina.train.stages import STAGES, get_stage
from train_helpers import tiny_config


def test_an_unknown_stage_is_refused_naming_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown stage 'rlhf' \(known: pretrain, sft, dpo, distill\)"):
        config_from_dict(tiny_config(None, stage="rlhf"))
    assert get_stage("sft").builtin_corpus == "chat" and get_stage("pretrain").builtin_corpus == "prose"


class CountingObjective(LanguageModelingObjective):
    """The LM loss, also counting its calls and reporting a value for the metrics."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model, batch) -> ObjectiveOutput:
        self.calls += 1
        output = super().__call__(model, batch)
        output.logs["rows"] = float(batch["input_ids"].shape[0])
        return output


def test_a_new_row_trains_with_its_own_objective(tmp_path, tokenizer_dir, monkeypatch):
    objective = CountingObjective()
    row = replace(STAGES["pretrain"], name="counting", objective=lambda config, frozen: objective)
    monkeypatch.setitem(STAGES, "counting", row)
    config = tiny_config(
        tokenizer_dir, stage="counting", train={"max_steps": 2, "grad_accum": 2}, eval={"every": 0}
    )
    train(config_from_dict(config), tmp_path / "run")
    assert objective.calls == 2 * 2 + 2  # every micro-batch of both steps, then 2 validation batches
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["rows"] for r in records if r["kind"] == "train"] == [2 * 8]  # log.every 2: one record
    assert json.loads((tmp_path / "run/best/training.json").read_text())["stage"] == "counting"
