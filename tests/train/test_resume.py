"""A run killed with SIGKILL and resumed ends bit-identical to a run that was never interrupted."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file

from fucina.train.checkpoint import list_checkpoints, load_checkpoint
from train_helpers import run_cli, sft_config, tiny_config, write_config

STEPS = 10
KILL_AFTER = 7  # the newest checkpoint is then step 6: steps 7.. are trained again on resume
RESUME_SETTINGS = {
    "train": {"max_steps": STEPS},
    "eval": {"every": 5},
    "checkpoint": {"every": 3, "keep_last": 5},
}


def _eval_losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval"]


def _assert_identical_runs(straight: Path, resumed: Path) -> None:
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a), "final weights differ"
    last_a = load_checkpoint(list_checkpoints(straight / "checkpoints")[-1][1])
    last_b = load_checkpoint(list_checkpoints(resumed / "checkpoints")[-1][1])
    state_a, state_b = last_a.trainer_state["optimizer"]["state"], last_b.trainer_state["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for index in state_a:
        for key, value in state_a[index].items():
            assert torch.equal(value, state_b[index][key]), f"optimizer state {index}.{key} differs"
    assert _eval_losses(straight) == _eval_losses(resumed)
    stats = json.loads((resumed / "train_stats.json").read_text())
    assert [e["step"] for e in stats["evals"]] == [5, 10]


def _kill_and_resume(config: Path, run: Path) -> None:
    killed = run_cli("train", str(config), "--out", str(run), "--debug-kill-after-step", str(KILL_AFTER))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [step for step, _ in list_checkpoints(run / "checkpoints")] == [3, 6]
    resumed = run_cli("train", str(config), "--out", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr


def test_killed_pretraining_resumes_bit_identically(tmp_path, tokenizer_dir):
    # Dropout makes the result depend on the restored RNG state as well.
    data = tiny_config(tokenizer_dir, model={"dropout": 0.1}, **RESUME_SETTINGS)
    config = write_config(tmp_path, data)
    straight = run_cli("train", str(config), "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    _kill_and_resume(config, tmp_path / "resumed")
    _assert_identical_runs(tmp_path / "straight", tmp_path / "resumed")


def test_killed_chat_fine_tuning_resumes_bit_identically(tmp_path, pretrained_run):
    data = sft_config(pretrained_run, model={"dropout": 0.1}, **RESUME_SETTINGS)
    config = write_config(tmp_path, data)
    straight = run_cli("train", str(config), "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    _kill_and_resume(config, tmp_path / "resumed")
    _assert_identical_runs(tmp_path / "straight", tmp_path / "resumed")
