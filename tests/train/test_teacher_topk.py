"""Offline distillation: the teacher's top-k cache equals the live teacher at k = vocabulary, bounds it
below otherwise, replaces the teacher model entirely, and refuses what it was not built for."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fucina.errors import ConfigError, DataError
from fucina.train.config import config_from_dict
from fucina.train.distill import TOPK_DIR, DistillationObjective
from fucina.train.loop import train
from fucina.train.teacher_topk import META_FILE, TeacherTopK, build_teacher_topk
from tiny_models import tiny_model
from train_helpers import TINY_VOCAB, tiny_config


def _losses(run) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r.get("loss", r.get("val_loss")) for r in records]


def _config(tokenizer_dir, **distill):
    return config_from_dict(
        tiny_config(tokenizer_dir, stage="distill", distill={"alpha": 0.3, "temperature": 2.0, **distill})
    )


class _Examples:
    """A validation-like split over fixed batches (the cache reads splits through `batches`)."""

    def __init__(self, batches):
        self._batches = batches

    def batches(self, max_batches):
        return ((batch, 0.0) for batch in self._batches)


def _batch(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (3, 12), generator=generator)
    labels = torch.randint(0, vocab, (3, 12), generator=generator)
    labels[1, :5] = -100
    return {"input_ids": input_ids, "labels": labels}


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_full_width_cache_equals_the_live_teacher(tmp_path, beta):
    student, teacher = tiny_model(seed=0), tiny_model(seed=1)
    vocab = student.config.vocab_size
    batch = _batch(vocab, 0)
    build_teacher_topk(teacher, [_Examples([batch])], tmp_path / "cache", vocab, 2.0, torch.device("cpu"))
    live = DistillationObjective(teacher, alpha=0.0, temperature=2.0, beta=beta)(student, batch)
    offline = DistillationObjective(None, alpha=0.0, temperature=2.0, beta=beta)
    offline.teacher = TeacherTopK(tmp_path / "cache", 2.0)
    cached = offline(student, batch)
    assert cached.unit_sums["divergence"] == pytest.approx(live.unit_sums["divergence"], rel=1e-5)


def test_a_narrow_cache_bounds_the_forward_kl_from_below(tmp_path):
    """Merging all but k tokens into one bucket can only lose divergence (data processing inequality)."""
    student, teacher = tiny_model(seed=0), tiny_model(seed=1)
    batch = _batch(student.config.vocab_size, 1)
    build_teacher_topk(teacher, [_Examples([batch])], tmp_path / "k8", 8, 1.0, torch.device("cpu"))
    live = DistillationObjective(teacher, alpha=0.0, temperature=1.0)(student, batch).unit_sums["divergence"]
    offline = DistillationObjective(None, alpha=0.0, temperature=1.0)
    offline.teacher = TeacherTopK(tmp_path / "k8", 1.0)
    cached = offline(student, batch).unit_sums["divergence"]
    assert 0 < cached < live
    stored = load_file(next((tmp_path / "k8").glob("topk-*.safetensors")))
    assert stored["ids"].shape == (3, 12, 8) and stored["rest"].shape == (3, 12)
    mass = stored["logprobs"].exp().sum(-1) + stored["rest"].exp()
    assert torch.allclose(mass, torch.ones_like(mass), atol=1e-5)  # k tokens + the rest = the whole


def test_an_example_outside_the_cache_and_a_temperature_change_are_refused(tmp_path):
    teacher = tiny_model(seed=1)
    vocab = teacher.config.vocab_size
    build_teacher_topk(
        teacher, [_Examples([_batch(vocab, 0)])], tmp_path / "cache", 4, 1.0, torch.device("cpu")
    )
    objective = DistillationObjective(None, alpha=0.0, temperature=1.0)
    objective.teacher = TeacherTopK(tmp_path / "cache", 1.0)
    with pytest.raises(DataError, match="missing from the teacher top-k cache"):
        objective(tiny_model(), _batch(vocab, 5))
    with pytest.raises(ConfigError, match="temperature 2.0 differs"):
        TeacherTopK(tmp_path / "cache", 2.0)


def test_offline_training_at_full_width_follows_online_training(tmp_path, tokenizer_dir, pretrained_run):
    train(_config(tokenizer_dir, teacher=str(pretrained_run)), tmp_path / "online")
    train(_config(tokenizer_dir, teacher=str(pretrained_run), top_k=TINY_VOCAB), tmp_path / "offline")
    assert (tmp_path / "offline" / TOPK_DIR / META_FILE).is_file()
    assert _losses(tmp_path / "offline") == pytest.approx(_losses(tmp_path / "online"), rel=1e-4)


def test_a_finished_cache_replaces_the_teacher(tmp_path, tokenizer_dir, pretrained_run):
    """A second student reads the first run's cache with no teacher configured, and trains identically."""
    train(_config(tokenizer_dir, teacher=str(pretrained_run), top_k=16), tmp_path / "first")
    cache = tmp_path / "first" / TOPK_DIR
    meta = json.loads((cache / META_FILE).read_text())
    assert meta["top_k"] == 16 and meta["examples"] > 0
    train(_config(tokenizer_dir, teacher_topk=str(cache), top_k=16), tmp_path / "second")
    first = load_file(tmp_path / "first/final/model.safetensors")
    second = load_file(tmp_path / "second/final/model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(ConfigError, match="distill.teacher_topk needs distill.top_k"):
        _config(tokenizer_dir, teacher_topk=str(cache))


def test_a_teacher_with_a_shorter_context_is_refused(tmp_path, tokenizer_dir, pretrained_run):
    config = tiny_config(
        tokenizer_dir,
        stage="distill",
        model={"context_length": 64},  # the pretrained teacher holds 32
        distill={"teacher": str(pretrained_run)},
    )
    with pytest.raises(
        ConfigError, match="teacher model holds 32 tokens of context, fewer than this run's 64"
    ):
        train(config_from_dict(config), tmp_path / "run")
