"""Learning-rate schedules: warmup in steps or as a ratio, cosine down to min_lr, constant."""

from __future__ import annotations

import pytest

from fucina.train.config import ScheduleSection
from fucina.train.schedules import build_schedule


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
