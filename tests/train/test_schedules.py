"""Learning-rate schedules: warmup in steps or as a ratio, cosine down to min_lr, constant."""

from __future__ import annotations

import json
import math

import pytest

from fucina.train.config import ScheduleSection, config_from_dict
from fucina.train.loop import train
from fucina.train.schedules import build_schedule
from train_helpers import tiny_config


def test_warmup_in_steps_rises_linearly_to_the_peak():
    schedule = build_schedule(ScheduleSection(warmup_steps=500), peak_lr=1e-3, total_steps=30_000)
    assert schedule.warmup_steps == 500
    assert schedule.lr_at(1) == pytest.approx(1e-3 / 500)
    assert schedule.lr_at(250) == pytest.approx(0.5e-3)
    assert schedule.lr_at(500) == pytest.approx(1e-3)


def test_warmup_ratio_is_a_fraction_of_the_run():
    schedule = build_schedule(ScheduleSection(warmup_ratio=0.05), peak_lr=3e-4, total_steps=2000)
    assert schedule.warmup_steps == 100
    assert schedule.lr_at(50) == pytest.approx(1.5e-4)
    assert schedule.lr_at(100) == pytest.approx(3e-4)


def test_cosine_decays_to_min_lr_at_the_last_step_through_the_midpoint():
    schedule = build_schedule(ScheduleSection(warmup_steps=10, min_lr=1e-5), peak_lr=1e-3, total_steps=110)
    assert schedule.lr_at(60) == pytest.approx((1e-3 + 1e-5) / 2)
    assert schedule.lr_at(110) == pytest.approx(1e-5)
    rates = [schedule.lr_at(step) for step in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_constant_schedule_holds_the_peak_after_warmup():
    schedule = build_schedule(ScheduleSection(name="constant", warmup_steps=4), peak_lr=2e-3, total_steps=50)
    assert schedule.lr_at(2) == pytest.approx(1e-3)
    assert {schedule.lr_at(step) for step in range(4, 51)} == {2e-3}


def test_no_warmup_starts_at_the_peak():
    schedule = build_schedule(ScheduleSection(), peak_lr=1e-3, total_steps=100)
    assert schedule.lr_at(1) == pytest.approx(1e-3, rel=1e-3)


def test_warmup_longer_than_the_run_is_clamped():
    schedule = build_schedule(ScheduleSection(warmup_steps=500), peak_lr=1e-3, total_steps=20)
    assert schedule.warmup_steps == 20
    assert schedule.lr_at(20) == pytest.approx(1e-3)


def wsd(shape: str, min_lr: float = 1e-4):
    section = ScheduleSection(name="wsd", warmup_steps=10, decay_ratio=0.2, decay_shape=shape, min_lr=min_lr)
    return build_schedule(section, peak_lr=1e-3, total_steps=100)


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt", "exp"])
def test_wsd_warms_up_holds_the_peak_then_decays_over_the_last_fifth_to_min_lr(shape):
    schedule = wsd(shape)
    assert schedule.decay_steps == 20
    assert schedule.decay_start == 81
    assert schedule.lr_at(5) == pytest.approx(0.5e-3)
    assert {schedule.lr_at(step) for step in range(10, 81)} == {1e-3}
    assert schedule.lr_at(81) < 1e-3
    assert schedule.lr_at(100) == pytest.approx(1e-4)
    rates = [schedule.lr_at(step) for step in range(80, 101)]
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_wsd_decay_shapes_at_the_middle_of_the_decay():
    # Step 90 is halfway through the decay (steps 81..100).
    assert wsd("linear").lr_at(90) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert wsd("cosine").lr_at(90) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert wsd("cosine").lr_at(85) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert wsd("sqrt").lr_at(90) == pytest.approx(1e-4 + 0.9e-3 * (1 - math.sqrt(0.5)))
    assert wsd("exp").lr_at(90) == pytest.approx(1e-3 * 0.1**0.5)  # geometric mean of peak and min_lr


def test_wsd_exp_with_zero_min_lr_decays_geometrically_then_ends_at_zero():
    schedule = wsd("exp", min_lr=0.0)
    assert schedule.lr_at(90) == pytest.approx(1e-3 * 1e-3**0.5)
    assert schedule.lr_at(100) == 0.0


def test_the_loop_gives_the_same_rate_per_optimizer_step_with_and_without_gradient_accumulation(
    tmp_path, tokenizer_dir
):
    """Micro-batches never advance the schedule (Elleci's scheduler counted them): 4 x 2 and 8 x 1 agree."""
    rates = []
    for accum, batch in ((1, 8), (4, 2)):
        data = tiny_config(
            tokenizer_dir,
            schedule={"name": "wsd", "warmup_steps": 2, "decay_ratio": 0.5, "min_lr": 1.0e-4},
            train={"grad_accum": accum, "batch_size": batch},
            log={"every": 1},
        )
        run = tmp_path / f"accum{accum}"
        result = train(config_from_dict(data), run)
        assert result.steps == 8
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rates.append([(r["step"], r["lr"]) for r in records if r["kind"] == "train"])
    assert rates[0] == rates[1]
    expected = [1.5e-3, 3e-3, 3e-3, 3e-3, 2.275e-3, 1.55e-3, 0.825e-3, 1e-4]
    assert [step for step, _ in rates[0]] == list(range(1, 9))
    assert [lr for _, lr in rates[0]] == pytest.approx(expected)
