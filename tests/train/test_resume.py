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


RECIPE = {
    "schedule": {
        "name": "wsd",
        "warmup_steps": 2,
        "decay_ratio": 0.4,
        "decay_shape": "sqrt",
        "min_lr": 1.0e-4,
    },
    "optim": {"name": "adamw8bit", "lerac": {"enabled": True, "c": 3.0, "steps": 8}},
    "averaging": {"kind": "swa", "start": 0.3, "publish": "averaged"},
    "train": {"max_steps": STEPS, "grad_accum": 2, "batch_size": 4},
}


def _same(a, b) -> bool:
    """Deep equality of nested state (tensors compared exactly)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_killed_run_with_wsd_lerac_adamw8bit_and_swa_resumes_bit_identically(tmp_path, tokenizer_dir):
    """Every recipe feature on at once; the kill falls after averaging started (step 4) and mid-LeRaC."""
    data = tiny_config(tokenizer_dir, model={"dropout": 0.1}, **{**RESUME_SETTINGS, **RECIPE})
    config = write_config(tmp_path, data)
    straight = run_cli("train", str(config), "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    _kill_and_resume(config, tmp_path / "resumed")
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a), "final (averaged) weights differ"
    last_a = load_checkpoint(list_checkpoints(tmp_path / "straight" / "checkpoints")[-1][1]).trainer_state
    last_b = load_checkpoint(list_checkpoints(tmp_path / "resumed" / "checkpoints")[-1][1]).trainer_state
    assert last_a["averaging"]["count"] == last_b["averaging"]["count"] == STEPS - 3
    for name, tensor in last_a["averaging"]["average"].items():
        assert torch.equal(tensor, last_b["averaging"]["average"][name]), f"average {name} differs"
    assert _same(last_a["optimizer"], last_b["optimizer"]), "optimizer state differs"
    straight_raw = load_checkpoint(list_checkpoints(tmp_path / "straight" / "checkpoints")[-1][1]).model_state
    resumed_raw = load_checkpoint(list_checkpoints(tmp_path / "resumed" / "checkpoints")[-1][1]).model_state
    assert all(torch.equal(straight_raw[name], resumed_raw[name]) for name in straight_raw), (
        "raw weights differ"
    )
    # final/ holds the average (publish: averaged), not the raw weights of the last step.
    name = (
        "blocks.0.attn.qkv.weight"
        if "blocks.0.attn.qkv.weight" in a
        else next(iter(last_a["averaging"]["average"]))
    )
    assert torch.equal(a[name], last_a["averaging"]["average"][name])
    assert not torch.equal(a[name], straight_raw[name])
    assert _eval_losses(tmp_path / "straight") == _eval_losses(tmp_path / "resumed")
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["weights"] for r in evals] == ["averaged", "averaged"]
    assert all("raw_val_loss" in r and "averaged_val_loss" in r for r in evals)
