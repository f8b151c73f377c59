"""Confidence intervals and the printed table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fucina.evaluate.report import ScoreRow, format_table, matthews_correlation, wilson_interval, write_json


def test_wilson_interval_matches_the_textbook_value():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0


def test_wilson_interval_narrows_with_more_items():
    small = wilson_interval(25, 100)
    large = wilson_interval(2500, 10000)
    assert large[1] - large[0] < (small[1] - small[0]) / 5


def test_matthews_correlation_of_perfect_inverse_and_constant_predictions():
    actual = np.array([0, 0, 1, 1, 0, 1])
    assert matthews_correlation(actual, actual) == pytest.approx(1.0)
    assert matthews_correlation(1 - actual, actual) == pytest.approx(-1.0)
    assert matthews_correlation(np.zeros(6, dtype=int), actual) == 0.0


def test_table_shows_score_interval_chance_and_n(tmp_path):
    rows = [
        ScoreRow("italic", "acc", 0.2612, 0.2526, 0.2700, 0.2561, 10000),
        ScoreRow("bpb/eltec", "loss", 3.5),
    ]
    table = format_table(rows).splitlines()
    assert table[0].split() == ["task", "metric", "score", "95%", "CI", "chance", "n"]
    assert table[2].split() == ["italic", "acc", "0.2612", "[0.2526,", "0.2700]", "0.2561", "10000"]
    assert table[3].split() == ["bpb/eltec", "loss", "3.5000", "-", "-", "-"]
    write_json({"rows": [rows[0].__dict__]}, tmp_path / "out" / "r.json")
    assert json.loads((tmp_path / "out" / "r.json").read_text())["rows"][0]["n"] == 10000
