"""The depth-vs-width study: shapes keep the study's ratios, compute is equal, the command runs end to end."""

from __future__ import annotations

import json

import pytest

from fucina.cli.main import main
from fucina.errors import ConfigError
from fucina.study.depth_width import StudySettings, load_or_make_plan, verdict
from fucina.study.shapes import Shape, four_configurations, study_runs

TINY = [
    "--scale", "24", "--sweep-depths", "2,12", "--flops-per-run", "5e7", "--context-length", "16",
    "--batch-size", "4", "--vocab-size", "300", "--corpus", "builtin", "--corpus-chars", "30000",
    "--val-chars", "3000", "--eval-batches", "2", "--no-progress",
]  # fmt: skip


def test_scaled_configurations_keep_the_depth_and_width_ratios():
    for scale in (1, 6, 24):
        configs = four_configurations(scale)
        assert configs["REAL"] == Shape(12, 768 // scale)
        assert configs["DEMO"] == Shape(6, 768 // scale)
        assert configs["DEEP"] == Shape(12, 384 // scale)
        assert configs["BALANCED"] == Shape(6, 384 // scale)
        for shape in configs.values():
            assert shape.d_model % shape.n_heads == 0


def test_sweep_holds_the_non_embedding_parameters_of_deep():
    runs = study_runs(6, (3, 6, 12, 24))
    deep = four_configurations(6)["DEEP"]
    sweep = {
        run.shape.n_layers: run for run in runs if any(label.startswith("SWEEP") for label in run.labels)
    }
    assert sweep[12].shape == deep and "DEEP" in sweep[12].labels  # one run answers to both names
    for depth, run in sweep.items():
        ratio = run.shape.non_embedding_params() / deep.non_embedding_params()
        assert 0.8 < ratio < 1.25, (depth, ratio)


def test_equal_flops_give_fewer_steps_to_bigger_models(tmp_path):
    settings = StudySettings(scale=6, flops_per_run=1e12, context_length=64, batch_size=8)
    plan = load_or_make_plan(tmp_path, settings, vocab_size=1000)
    spent = [run.steps * run.flops_per_token * 8 * 64 for run in plan.runs]
    assert max(spent) / min(spent) < 1.05  # equal compute up to rounding of the step count
    by_name = {run.name: run for run in plan.runs}
    assert by_name["12x128"].steps < by_name["6x64"].steps
    with pytest.raises(ConfigError, match="other settings"):
        load_or_make_plan(tmp_path, StudySettings(scale=6, flops_per_run=2e12), vocab_size=1000)


def test_verdict_compares_the_deepest_and_shallowest_sweep_points():
    def record(depth, width, bpb):
        return {"name": f"{depth}x{width}", "labels": [f"SWEEP-{depth}"], "n_layers": depth, "d_model": width,
                "non_embedding_params": 1_000_000, "val_bpb": bpb}  # fmt: skip

    assert verdict([record(2, 128, 2.5), record(12, 48, 2.3)])["answer"] == "yes"
    assert verdict([record(2, 128, 2.3), record(12, 48, 2.5)])["answer"] == "no"
    assert verdict([record(2, 128, 2.300), record(12, 48, 2.305)])["answer"] == "inconclusive"


def test_study_command_runs_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["study", "depth-width", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    names = {run["name"] for run in results["runs"]}
    assert names == {"12x32", "6x32", "12x16", "6x16", "2x32"}
    for run in results["runs"]:
        assert run["tokens_seen"] == run["steps"] * 4 * 16
        assert 0 < run["val_bpb"] < 20
        assert run["curve"]
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| 12 | 16 |" in table and "val bpb" in table
    assert "depth beats width" in printed
    for plot in ("loss_curves.png", "bpb_vs_depth.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["study", "depth-width", "--out", str(out), *TINY]) == 0
    assert "skipped (finished earlier): 12x32, 6x32, 12x16, 6x16, 2x32" in capsys.readouterr().out
