"""docs/results.md from the reference runs: training budget, held-out bpb, benchmarks vs chance, samples.

Reads, for each run directory under the reference root (as `scripts/reference_models.sh` lays them out):
`train_stats.json` (steps, tokens seen, wall time; written by the training loop), `train_config.yaml`
(the config it ran), `machine.json` (where it ran), `eval.json` (`fucina eval --out`) and
`generations.txt` (verbatim samples), and an optional `NOTES.md` at the root (how the runs went, e.g.
whether the machine was shared), copied under "Notes". Missing pieces are reported as missing, never
invented.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fucina.fsutil import write_atomically

SHOWN_METRICS = ("bits_per_byte", "acc", "acc_norm", "mcc")


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _training_row(name: str, run: Path) -> str:
    stats = _read_json(run / "train_stats.json") or {}
    machine = _read_json(run / "machine.json") or {}
    best = stats.get("best") or {}
    seconds = stats.get("train_seconds")
    rate = stats.get("tokens_per_second")
    return (
        f"| {name} | {stats.get('step', '-')} | {stats.get('tokens_seen', 0):,} | "
        f"{'-' if seconds is None else f'{seconds / 60:.1f} min'} | {'-' if rate is None else f'{rate:,.0f}'} | "
        f"{_fmt(best.get('val_bpb'))} | {machine.get('device', 'not recorded')} |"
    )


def _eval_rows(name: str, evaluation: dict[str, Any]) -> list[str]:
    rows = []
    for row in evaluation.get("results", []):
        per_group = "/" in row["task"] and not row["task"].startswith("bpb/")
        if row["metric"] not in SHOWN_METRICS or per_group:
            continue
        interval = "-" if row.get("ci_low") is None else f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
        rows.append(
            f"| {name} | {row['task']} | {row['metric']} | {_fmt(row['value'])} | {interval} | "
            f"{_fmt(row.get('chance'))} | {row.get('n', '-')} |"
        )
    return rows


def results_page(reference_dir: str | Path) -> str:
    """The markdown of docs/results.md for every run directory under `reference_dir`."""
    root = Path(reference_dir)
    runs = sorted(p for p in root.iterdir() if p.is_dir() and (p / "train_stats.json").is_file())
    lines = [
        "# Reference models: results",
        "",
        "Produced by `scripts/reference_models.sh` (configs in `configs/reference-*.yaml`). Held-out data:",
        "the documents of `shared/data/splits.json`, never trained on. Weights are not committed.",
        "",
        "## Training",
        "",
        "| run | steps | tokens seen | train time | tokens/s | best val bpb (loop's split) | ran on |",
        "|---|---:|---:|---:|---:|---:|---|",
        *(_training_row(run.name, run) for run in runs),
        "",
        "## Held-out bits per byte and benchmarks (score with 95% CI beside chance)",
        "",
        "| run | task | metric | score | 95% CI | chance | n |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for run in runs:
        evaluation = _read_json(run / "eval.json")
        lines += (
            _eval_rows(run.name, evaluation) if evaluation else [f"| {run.name} | not evaluated | | | | | |"]
        )
    notes = root / "NOTES.md"
    if notes.is_file():
        lines += ["", "## Notes", "", notes.read_text(encoding="utf-8").strip()]
    lines += ["", "## Generations (verbatim)", ""]
    for run in runs:
        samples = run / "generations.txt"
        lines += [
            f"### {run.name}",
            "",
            "```",
            samples.read_text(encoding="utf-8").strip() if samples.is_file() else "(no generations recorded)",
            "```",
            "",
        ]
    return "\n".join(lines)


def write_results_page(reference_dir: str | Path, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, results_page(reference_dir))
    return out
