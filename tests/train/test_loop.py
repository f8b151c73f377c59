"""The training loop: loss falls, the run directory is complete, best model and early stopping work."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from fucina.model_dir import load_pretrained
from fucina.tokenizer import FucinaTokenizer
from fucina.train.config import config_from_dict, load_train_config
from fucina.train.loop import train
from train_helpers import run_cli, sft_config, tiny_config, write_config


def _stats(run):
    return json.loads((run / "train_stats.json").read_text(encoding="utf-8"))


def test_loss_falls_on_the_builtin_prose(tmp_path, tokenizer_dir):
    config = tiny_config(tokenizer_dir, train={"max_steps": 40}, eval={"every": 10, "max_batches": None})
    result = train(config_from_dict(config), tmp_path / "run")
    losses = [e["val_loss"] for e in _stats(tmp_path / "run")["evals"]]
    assert len(losses) == 4
    assert losses[0] < math.log(400)  # already better than uniform guessing
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < math.log(400) - 1.0
    assert result.best_val_loss == pytest.approx(min(losses))
    assert 0 < result.last_eval.val_bpb < 8


def test_run_directory_has_the_picodac_layout(tmp_path, tokenizer_dir):
    run = tmp_path / "run"
    config = config_from_dict(tiny_config(tokenizer_dir, log={"tensorboard": True, "plot": True}))
    train(config, run)
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "train_config.yaml",
        "train_stats.json",
        "metrics.jsonl",
        "plots/loss.png",
    ):
        assert (run / name).is_file(), name
    assert (run / "plots/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]
    for model_dir in ("best", "final"):
        model, tokenizer = load_pretrained(run / model_dir)
        assert tokenizer.vocab_size <= model.config.vocab_size
    assert load_train_config(run / "train_config.yaml") == config  # the resolved config reloads as is
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6, 8]
    assert not any("tokens_per_expert" in r for r in records)  # a dense model has no routing to log
    stats = _stats(run)
    assert [e["step"] for e in stats["evals"]] == [4, 8]
    assert stats["finished"] and stats["tokens_per_second"] > 0
    assert {"val_loss", "val_ppl", "val_bpb"} <= stats["evals"][0].keys()


def test_best_model_is_the_lowest_validation_loss_and_early_stopping_ends_the_run(tmp_path, tokenizer_dir):
    # With min_delta so large, no evaluation after the first counts as an improvement.
    config = tiny_config(
        tokenizer_dir,
        train={"max_steps": 20},
        eval={"every": 2, "early_stopping_patience": 2, "min_delta": 100.0},
    )
    result = train(config_from_dict(config), tmp_path / "run")
    assert result.stopped_early and result.steps == 6
    best_info = json.loads((tmp_path / "run/best/training.json").read_text())
    final_info = json.loads((tmp_path / "run/final/training.json").read_text())
    assert (best_info["step"], final_info["step"]) == (2, 6)
    stats = _stats(tmp_path / "run")
    assert stats["best"]["step"] == 2 and stats["stopped_early"]
    assert best_info["val_loss"] == pytest.approx(stats["evals"][0]["val_loss"])
    best = load_file(tmp_path / "run/best/model.safetensors")
    final = load_file(tmp_path / "run/final/model.safetensors")
    assert any(not torch.equal(best[k], final[k]) for k in best)


def test_best_model_tracks_the_minimum_when_the_loss_rises(tmp_path, tokenizer_dir):
    # A learning rate far too high makes the loss climb after the first evaluations.
    config = tiny_config(
        tokenizer_dir, optim={"lr": 1.0, "grad_clip": 0.0}, train={"max_steps": 12}, eval={"every": 2}
    )
    train(config_from_dict(config), tmp_path / "run")
    evals = _stats(tmp_path / "run")["evals"]
    best = min(evals, key=lambda e: e["val_loss"])
    assert best["step"] != evals[-1]["step"], "the loss never rose; pick a higher learning rate"
    info = json.loads((tmp_path / "run/best/training.json").read_text())
    assert info["step"] == best["step"]


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tokenizer_dir):
    one = tiny_config(tokenizer_dir, train={"max_steps": 2, "batch_size": 8}, eval={"every": 0})
    two = tiny_config(
        tokenizer_dir, train={"max_steps": 2, "batch_size": 4, "grad_accum": 2}, eval={"every": 0}
    )
    train(config_from_dict(one), tmp_path / "one")
    train(config_from_dict(two), tmp_path / "two")
    a = load_file(tmp_path / "one/final/model.safetensors")
    b = load_file(tmp_path / "two/final/model.safetensors")
    # AdamW's first steps normalise each gradient element, so float noise in elements whose gradient is
    # near eps moves weights by ~1e-5; a wrong accumulation moves them by about the learning rate (3e-3).
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_epochs_set_the_step_budget(tmp_path, tokenizer_dir):
    config = tiny_config(
        tokenizer_dir, train={"max_steps": None, "epochs": 0.5, "batch_size": 16}, eval={"every": 0}
    )
    result = train(config_from_dict(config), tmp_path / "run")
    train_tokens = json.loads((tmp_path / "run/data/meta.json").read_text())["splits"]["train"]["tokens"]
    windows = (train_tokens - 1) // 32  # windows of 33 tokens, stride 32
    assert result.total_steps == math.ceil(0.5 * windows / 16)


def test_bf16_autocast_trains_with_float32_weights(tmp_path, tokenizer_dir):
    config = tiny_config(tokenizer_dir, train={"precision": "bf16", "max_steps": 4})
    result = train(config_from_dict(config), tmp_path / "run")
    assert math.isfinite(result.last_eval.val_loss)
    weights = load_file(tmp_path / "run/final/model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_chat_fine_tuning_starts_from_the_pretrained_model_and_reuses_its_tokenizer(tmp_path, pretrained_run):
    run = tmp_path / "chat"
    train(config_from_dict(sft_config(pretrained_run, train={"max_steps": 4})), run)
    assert (run / "tokenizer.json").read_text() == (pretrained_run / "tokenizer.json").read_text()
    assert json.loads((run / "best/training.json").read_text())["stage"] == "sft"
    assert json.loads((run / "config.json").read_text()) == json.loads(
        (pretrained_run / "config.json").read_text()
    )
    tokenizer = FucinaTokenizer.load(run)
    assert tokenizer.template.name == "picodac"


def test_dry_run_runs_the_pipeline_and_leaves_nothing_behind(tmp_path, tokenizer_dir):
    config = write_config(tmp_path, tiny_config(None, train={"max_steps": 1000}))
    result = run_cli(
        "train", "--config", str(config), "--dry-run", "--steps", "4", "--set", "train.num_threads=1"
    )
    assert result.returncode == 0, result.stderr
    assert "dry run: trained 4/4 steps" in result.stdout
    assert "validation: loss" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_gradient_checkpointing_trains_to_the_same_weights(tmp_path, tokenizer_dir):
    plain = tiny_config(tokenizer_dir, train={"max_steps": 2}, eval={"every": 0})
    recomputed = tiny_config(
        tokenizer_dir, train={"max_steps": 2, "gradient_checkpointing": True}, eval={"every": 0}
    )
    train(config_from_dict(plain), tmp_path / "plain")
    train(config_from_dict(recomputed), tmp_path / "recomputed")
    a = load_file(tmp_path / "plain/final/model.safetensors")
    b = load_file(tmp_path / "recomputed/final/model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # The switch is a training option: the run's config.json and its model directories' agree.
    run_config = json.loads((tmp_path / "recomputed/config.json").read_text())
    assert run_config == json.loads((tmp_path / "recomputed/best/config.json").read_text())
    assert run_config == json.loads((tmp_path / "plain/config.json").read_text())


def test_moe_tokens_per_expert_are_logged_to_metrics_and_tensorboard(tmp_path, tokenizer_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = {"ffn": "moe", "moe_num_experts": 4, "moe_top_k": 2}
    config = tiny_config(tokenizer_dir, model=model, train={"max_steps": 4}, log={"tensorboard": True})
    train(config_from_dict(config), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    routed = [r["tokens_per_expert"] for r in records if r["kind"] == "train"]
    assert len(routed) == 2  # every training record (log.every 2, 4 steps)
    for layers in routed:
        assert len(layers) == 2  # one entry per MoE layer of the 2-layer model
        for counts in layers.values():
            assert len(counts) == 4 and sum(counts) == 2 * 8 * 32  # top-2 of each of the batch's tokens
    events = EventAccumulator(str(tmp_path / "run/tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    layer = next(iter(routed[0]))
    shares = [events.Scalars(f"routing/{layer}/expert_{e}")[-1].value for e in range(4)]
    assert sum(shares) == pytest.approx(1.0)
    assert f"routing/{layer}/max_load" in tags
