"""docs/results.md is built from what the reference runs wrote, and says what is missing."""

from __future__ import annotations

import json

from fucina.study.reference import results_page


def _run(root, name, stats=None, evaluation=None, generations=None, machine=None):
    run = root / name
    run.mkdir()
    (run / "train_stats.json").write_text(json.dumps(stats or {}))
    if evaluation is not None:
        (run / "eval.json").write_text(json.dumps(evaluation))
    if generations is not None:
        (run / "generations.txt").write_text(generations)
    if machine is not None:
        (run / "machine.json").write_text(json.dumps(machine))


def test_results_page_reports_training_evaluation_and_samples_of_each_run(tmp_path):
    stats = {
        "step": 1800,
        "tokens_seen": 14745600,
        "train_seconds": 3170.6,
        "tokens_per_second": 4650.7,
        "best": {"val_bpb": 2.15496},
    }
    evaluation = {
        "results": [
            {
                "task": "italic",
                "metric": "acc",
                "value": 0.2731,
                "ci_low": 0.26,
                "ci_high": 0.286,
                "chance": 0.25,
                "n": 10000,
            },
            {
                "task": "italic/art",
                "metric": "acc",
                "value": 0.5,
                "chance": 0.25,
                "n": 10,
            },  # per group: left out
            {"task": "bpb/eltec", "metric": "bits_per_byte", "value": 2.3011, "n": 8},
            {"task": "italic", "metric": "loglik_sum", "value": -1.0},  # not a shown metric
        ]
    }
    _run(
        tmp_path,
        "picodac-it-pretrain",
        stats,
        evaluation,
        "--- raw\nC'era una volta un re",
        {"device": "CPU"},
    )
    _run(tmp_path, "llama-30m-pretrain", {"step": 10})
    (tmp_path / "NOTES.md").write_text("The machine was shared with other jobs.")
    page = results_page(tmp_path)
    assert "| picodac-it-pretrain | 1800 | 14,745,600 | 52.8 min | 4,651 | 2.1550 | CPU |" in page
    assert "| picodac-it-pretrain | italic | acc | 0.2731 | [0.260, 0.286] | 0.2500 | 10000 |" in page
    assert "| picodac-it-pretrain | bpb/eltec | bits_per_byte | 2.3011 | - | - | 8 |" in page
    assert "italic/art" not in page and "loglik_sum" not in page
    assert "C'era una volta un re" in page
    assert "| llama-30m-pretrain | not evaluated |" in page
    assert "(no generations recorded)" in page and "not recorded" in page
    assert "## Notes\n\nThe machine was shared with other jobs." in page
