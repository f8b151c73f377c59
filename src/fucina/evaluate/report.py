"""Scores with their uncertainty, as a printed table and as JSON.

Design choices, and why:
- Accuracies carry a 95% Wilson score interval: unlike the normal approximation it stays inside [0, 1]
  and is honest at the small n of `--limit` runs and at accuracies near 0 or 1.
- Statistics without a closed form (Matthews correlation) get a percentile bootstrap over items with a
  fixed seed, so a report repeats exactly.
- Every row prints the chance level beside the score (for multiple choice the mean of 1/#choices over the
  items), because a small model's score means little without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fucina.fsutil import write_json_atomically

Z_95 = 1.959963984540054


@dataclass
class ScoreRow:
    """One line of a report: a metric of a task with its 95% interval, chance level and sample size."""

    task: str
    metric: str
    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    chance: float | None = None
    n: int | None = None


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float], n: int, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile bootstrap of `statistic(indices)` over resampled item indices 0..n-1."""
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, n, size=n)) for _ in range(resamples)]
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def matthews_correlation(predicted: np.ndarray, actual: np.ndarray, positive: int = 0) -> float:
    """Matthews correlation of a binary prediction (0 when a row or column of the confusion is empty)."""
    p, a = predicted == positive, actual == positive
    tp, tn = float(np.sum(p & a)), float(np.sum(~p & ~a))
    fp, fn = float(np.sum(p & ~a)), float(np.sum(~p & a))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows: Sequence[ScoreRow]) -> str:
    """A plain-text table: task, metric, score [95% CI], chance, n."""
    header = ("task", "metric", "score", "95% CI", "chance", "n")
    lines = [
        (
            row.task,
            row.metric,
            _number(row.value),
            "-" if row.ci_low is None else f"[{row.ci_low:.4f}, {row.ci_high:.4f}]",
            _number(row.chance),
            "-" if row.n is None else str(row.n),
        )
        for row in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    aligned = []
    for cells in [header, *lines]:
        left = [cells[i].ljust(widths[i]) for i in range(2)]
        right = [cells[i].rjust(widths[i]) for i in range(2, len(cells))]
        aligned.append("  ".join(left + right).rstrip())
    aligned.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(aligned)


def rows_to_dicts(rows: Sequence[ScoreRow]) -> list[dict[str, Any]]:
    return [asdict(row) for row in rows]


def write_json(data: dict[str, Any], path: str | Path) -> None:
    """Write `data` as indented UTF-8 JSON, atomically (a crash never leaves half a results file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, data)
