"""Weight averaging: EMA and SWA equal a manual average of the same weights; the schedule is untouched;
the loop evaluates both weights and publishes the requested ones."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fucina.errors import ConfigError
from fucina.train.averaging import WeightAverage, averaging_start_step
from fucina.train.checkpoint import list_checkpoints, load_checkpoint
from fucina.train.config import AveragingSection, ScheduleSection, config_from_dict
from fucina.train.loop import train
from fucina.train.schedules import build_schedule
from train_helpers import tiny_config


def _train_and_snapshot(
    average: WeightAverage, model: nn.Module, steps: int
) -> list[dict[str, torch.Tensor]]:
    """Random 'optimizer steps' on `model`; the weights after each step, folded into `average`."""
    snapshots = []
    generator = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator))
        average.update(step)
        snapshots.append({name: p.detach().clone() for name, p in model.named_parameters()})
    return snapshots


def test_swa_is_the_uniform_mean_of_the_weights_from_the_start_step():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    average = WeightAverage(model, AveragingSection(kind="swa"), start_step=4)
    snapshots = _train_and_snapshot(average, model, steps=10)
    assert average.count == 7
    for name in average.average:
        manual = torch.stack([s[name] for s in snapshots[3:]]).mean(0)
        torch.testing.assert_close(average.average[name], manual)


def test_swa_every_n_steps_averages_only_those_steps():
    model = nn.Linear(3, 2)
    average = WeightAverage(model, AveragingSection(kind="swa", every=3), start_step=2)
    snapshots = _train_and_snapshot(average, model, steps=10)
    manual = torch.stack([snapshots[step - 1]["weight"] for step in (2, 5, 8)]).mean(0)
    torch.testing.assert_close(average.average["weight"], manual)


def test_ema_follows_the_recursive_definition():
    model = nn.Linear(3, 2)
    average = WeightAverage(model, AveragingSection(kind="ema", ema_decay=0.9), start_step=1)
    snapshots = _train_and_snapshot(average, model, steps=6)
    manual = snapshots[0]["weight"].clone()
    for snapshot in snapshots[1:]:
        manual = 0.9 * manual + 0.1 * snapshot["weight"]
    torch.testing.assert_close(average.average["weight"], manual)


def test_swapped_in_holds_the_average_then_restores_the_raw_weights():
    model = nn.Linear(3, 2)
    average = WeightAverage(model, AveragingSection(kind="swa"), start_step=1)
    snapshots = _train_and_snapshot(average, model, steps=3)
    with average.swapped_in():
        torch.testing.assert_close(model.weight, average.average["weight"])
    assert torch.equal(model.weight, snapshots[-1]["weight"])


def test_swa_starts_at_the_wsd_decay_by_default_and_at_a_given_fraction_otherwise():
    schedule = build_schedule(ScheduleSection(name="wsd", decay_ratio=0.2), peak_lr=1e-3, total_steps=100)
    assert averaging_start_step(AveragingSection(kind="swa"), 100, schedule.decay_start) == 81
    assert averaging_start_step(AveragingSection(kind="swa", start=0.5), 100, schedule.decay_start) == 51
    assert averaging_start_step(AveragingSection(kind="ema"), 100, schedule.decay_start) == 1


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("publish", ["raw", "averaged"])
def test_swa_follows_the_decay_and_publishes_the_requested_weights(tmp_path, tokenizer_dir, publish):
    wsd = {"name": "wsd", "warmup_steps": 2, "decay_ratio": 0.5, "min_lr": 1.0e-4}
    base = tiny_config(tokenizer_dir, schedule=wsd, log={"every": 1})
    averaged = tiny_config(
        tokenizer_dir, schedule=wsd, log={"every": 1}, averaging={"kind": "swa", "publish": publish}
    )
    plain_run, swa_run = tmp_path / "plain", tmp_path / publish
    train(config_from_dict(base), plain_run)
    train(config_from_dict(averaged), swa_run)
    # The schedule is the same with and without SWA: the decay still runs (Elleci's SWA replaced it).
    rates = [[r["lr"] for r in _records(run) if r["kind"] == "train"] for run in (plain_run, swa_run)]
    assert rates[0] == rates[1] and rates[0][-1] == pytest.approx(1.0e-4)
    # Averaging starts with the decay (step 5 of 8), so the step-4 evaluation has only raw weights.
    evals = [r for r in _records(swa_run) if r["kind"] == "eval"]
    assert "averaged_val_loss" not in evals[0] and evals[0]["weights"] == "raw"
    assert "averaged_val_loss" in evals[1] and "raw_val_loss" in evals[1]
    assert evals[1]["weights"] == publish
    expected = evals[1][f"{publish}_val_loss"]
    assert evals[1]["val_loss"] == expected
    info = json.loads((swa_run / "final" / "training.json").read_text())
    assert info["weights"] == publish
    final = load_file(swa_run / "final" / "model.safetensors")
    last = load_checkpoint(list_checkpoints(swa_run / "checkpoints")[-1][1])
    state, raw = last.trainer_state, last.model_state
    name = next(iter(state["averaging"]["average"]))
    held = state["averaging"]["average"][name] if publish == "averaged" else raw[name]
    assert torch.equal(final[name], held)
    assert not torch.equal(state["averaging"]["average"][name], raw[name])


def test_publish_best_picks_the_weights_with_the_lower_validation_loss(tmp_path, tokenizer_dir):
    data = tiny_config(tokenizer_dir, averaging={"kind": "ema", "ema_decay": 0.5, "publish": "best"})
    train(config_from_dict(data), tmp_path / "run")
    evals = [r for r in _records(tmp_path / "run") if r["kind"] == "eval"]
    assert len(evals) == 2
    for record in evals:
        better = "averaged" if record["averaged_val_loss"] < record["raw_val_loss"] else "raw"
        assert record["weights"] == better
        assert record["val_loss"] == min(record["averaged_val_loss"], record["raw_val_loss"])


@pytest.mark.parametrize(
    ("averaging", "message"),
    [
        ({"publish": "averaged"}, "averaging.kind is none"),
        ({"kind": "ema", "ema_decay": 1.0}, "averaging.ema_decay"),
        ({"kind": "swa", "start": 1.0}, "averaging.start"),
    ],
)
def test_bad_averaging_settings_are_refused_by_name(averaging, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"train": {"max_steps": 10}, "averaging": averaging})
