"""Elleci's whole recipe at once (WSD, sequence curriculum, SWA in the decay, LeRaC, 8-bit AdamW, a
two-phase data mixture), killed with SIGKILL and resumed across a curriculum switch and a phase switch:
the resumed run ends bit-identical to the uninterrupted one."""

from __future__ import annotations

import json
import signal

import torch
from safetensors.torch import load_file

from fucina.train.checkpoint import list_checkpoints, load_checkpoint
from train_helpers import run_cli, tiny_config, write_config

STEPS = 10
KILL_AFTER = 7  # the newest checkpoint is step 6; steps 7.. (after both switches) are trained again
RECIPE = {
    "model": {"dropout": 0.1},  # the RNG state must come back too
    "data": {
        # windows 8 -> 16 -> 32: switches at steps floor(0.3*10)+1 = 4 and floor(0.65*10)+1 = 7
        "curriculum": [[0.0, 8], [0.3, 16], [0.65, 32]],
        "mixture": {
            "sources": [
                {"name": "prose", "train": ["builtin:prose"]},
                {"name": "chat", "train": ["builtin:chat"], "kind": "chat"},
            ],
            # phase 2 from step floor(0.6*10)+1 = 7, the step the resumed run starts with
            "phases": [
                {"start": 0.0, "weights": {"prose": 0.8, "chat": 0.2}},
                {"start": 0.6, "weights": {"prose": 0.3, "chat": 0.7}},
            ],
        },
    },
    "schedule": {"name": "wsd", "warmup_steps": 1, "decay_ratio": 0.2},
    "optim": {"name": "adamw8bit", "lerac": {"enabled": True, "c": 3.0, "steps": 8}},
    "averaging": {"kind": "swa", "publish": "averaged"},  # from the decay phase (steps 9, 10)
    "train": {"max_steps": STEPS, "grad_accum": 2, "batch_size": 2},
    "eval": {"every": 5},
    "checkpoint": {"every": 3, "keep_last": 5},
}


def _records(run, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_full_recipe_resumes_bit_identically_across_curriculum_and_phase_switches(tmp_path, tokenizer_dir):
    config = write_config(tmp_path, tiny_config(tokenizer_dir, **RECIPE))
    straight = run_cli("train", str(config), "--out", str(tmp_path / "straight"), timeout=300)
    assert straight.returncode == 0, straight.stderr
    assert "mixture phase 1 (steps up to 6)" in straight.stderr
    assert "mixture phase 2 (steps up to 10)" in straight.stderr
    killed = run_cli("train", str(config), "--out", str(tmp_path / "resumed"), "--debug-kill-after-step", "7")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == [3, 6]
    resumed = run_cli("train", str(config), "--out", str(tmp_path / "resumed"), timeout=300)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr

    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final weights differ"
    last_a = load_checkpoint(list_checkpoints(tmp_path / "straight" / "checkpoints")[-1][1])
    last_b = load_checkpoint(list_checkpoints(tmp_path / "resumed" / "checkpoints")[-1][1])
    assert all(torch.equal(last_a.model_state[k], last_b.model_state[k]) for k in last_a.model_state)
    state_a, state_b = last_a.trainer_state, last_b.trainer_state
    for part in ("optimizer", "averaging", "rng"):
        assert _same(state_a[part], state_b[part]), f"{part} state differs"
    progress_a, progress_b = (dict(s["progress"], train_seconds=0) for s in (state_a, state_b))
    assert _same(progress_a, progress_b), "progress (data position, mixture sources) differs"
    sources = state_a["progress"]["source_positions"]
    assert set(sources) == {"prose", "chat"}  # the sampler's state is saved with the position
    assert state_a["averaging"]["count"] == 2
    keys = ("step", "val_loss", "raw_val_loss", "averaged_val_loss", "weights", "tokens_seen")
    evals = [
        [{k: r.get(k) for k in keys} for r in _records(tmp_path / run, "eval")]
        for run in ("straight", "resumed")
    ]
    assert evals[0] == evals[1] and [r["step"] for r in evals[0]] == [5, 10]
    # Tokens per step are constant across the switches: 2 x 2 blocks of 32 tokens every step.
    train_a = _records(tmp_path / "straight", "train")
    assert train_a[-1]["tokens_seen"] == STEPS * 2 * 2 * 32


def test_elleci_tiny_config_holds_every_recipe_feature():
    from pathlib import Path

    from fucina.train.config import load_train_config

    config = load_train_config(Path(__file__).parents[2] / "configs" / "elleci-tiny.yaml")
    assert config.model["preset"] == "elleci-tiny"
    assert (config.schedule.name, config.schedule.warmup_ratio, config.schedule.decay_ratio) == (
        "wsd",
        0.05,
        0.2,
    )
    assert config.data.curriculum == [[0.0, 64], [0.35, 128], [0.7, 256]]
    assert config.averaging.kind == "swa" and config.averaging.start is None  # the decay phase
    assert config.optim.lerac.enabled and config.optim.name == "adamw8bit"
    phases = config.data.mixture.phases
    assert [p.start for p in phases] == [0.0, 0.9]
    assert [p.weights for p in phases] == [
        {"prose": 0.55, "wikipedia": 0.35, "chat": 0.10},
        {"prose": 0.20, "wikipedia": 0.25, "chat": 0.55},
    ]


def test_mixture_without_a_tokenizer_source_and_curriculum_on_examples_are_refused(tmp_path, tokenizer_dir):
    import pytest

    from fucina.errors import ConfigError
    from fucina.train.config import config_from_dict
    from fucina.train.loop import train

    mixture = RECIPE["data"]["mixture"]
    with pytest.raises(ConfigError, match="data.mixture: set tokenizer.inputs"):
        config_from_dict({"data": {"mixture": mixture}, "train": {"max_steps": 1}})
    sft = tiny_config(tokenizer_dir, stage="sft", data={"train": ["builtin"], "curriculum": [[0.0, 16]]})
    with pytest.raises(ConfigError, match="data.curriculum and data.mixture apply to packed text; stage sft"):
        train(config_from_dict(sft), tmp_path / "sft")
