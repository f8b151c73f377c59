"""Distillation: alpha = 1 is plain training, a teacher equal to the student adds 0, TRL's GKD parity,
accumulation invariance, a foreign tokenizer refused, resume."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_resume import RESUME_SETTINGS, _assert_identical_runs, _kill_and_resume

from fucina.errors import ConfigError, TokenizerError
from fucina.model.loss import IGNORE_INDEX
from fucina.tokenizer import train_tokenizer
from fucina.train.config import config_from_dict
from fucina.train.distill import DistillationObjective, generalized_jsd
from fucina.train.loop import train
from tiny_models import tiny_model
from train_helpers import TINY_VOCAB, run_cli, tiny_config, write_config


def _batch(vocab: int, rows: int = 4, length: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids; labels supervised on a different number of positions per row."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (rows, length), generator=generator)
    labels = torch.randint(0, vocab, (rows, length), generator=generator)
    for row in range(rows):
        labels[row, : 2 + 2 * row] = IGNORE_INDEX  # prompt-like unsupervised prefixes
    return {"input_ids": input_ids, "labels": labels}


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_a_teacher_equal_to_the_student_adds_nothing(beta):
    student = tiny_model()
    batch = _batch(student.config.vocab_size)
    output = DistillationObjective(copy.deepcopy(student), alpha=0.0, temperature=2.0, beta=beta)(
        student, batch
    )
    assert output.unit_sums["divergence"] == pytest.approx(0.0, abs=1e-5)
    assert float(output.loss_sum.detach()) == pytest.approx(0.0, abs=1e-5)
    assert output.count == int((batch["labels"] != IGNORE_INDEX).sum())


def test_the_loss_only_sees_supervised_tokens():
    student, teacher = tiny_model(seed=0), tiny_model(seed=1)
    objective = DistillationObjective(teacher, alpha=0.3, temperature=2.0, beta=0.5)
    batch = _batch(student.config.vocab_size)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][:, -1] = (changed["input_ids"][:, -1] + 1) % student.config.vocab_size
    changed["labels"][:, -1] = IGNORE_INDEX  # the last position is now unsupervised and its input changed
    batch["labels"][:, -1] = IGNORE_INDEX
    assert torch.allclose(objective(student, batch).loss_sum, objective(student, changed).loss_sum, atol=1e-6)


def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch():
    student, teacher = tiny_model(seed=0), tiny_model(seed=1)
    objective = DistillationObjective(teacher, alpha=0.4, temperature=2.0, beta=0.0)
    batch = _batch(student.config.vocab_size)  # rows supervise 8, 6, 4 and 2 tokens

    def gradient(micro_batches):
        student.zero_grad()
        total = sum(objective.supervised_count(b) for b in micro_batches)
        for micro in micro_batches:
            (objective(student, micro).loss_sum / total).backward()
        return [p.grad.clone() for p in student.parameters() if p.grad is not None]

    whole = gradient([batch])
    halves = gradient([{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, halves, strict=True))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_matches_trl_gkd(beta, temperature):
    pytest.importorskip("trl")
    from trl.experimental.gkd import GKDTrainer

    generator = torch.Generator().manual_seed(3)
    student = torch.randn(2, 7, 50, generator=generator) * 3
    teacher = torch.randn(2, 7, 50, generator=generator) * 3
    labels = torch.randint(0, 50, (2, 7), generator=generator)
    labels[0, :3] = IGNORE_INDEX
    expected = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=temperature)
    supervised = labels != IGNORE_INDEX
    ours = (
        generalized_jsd(student[supervised], teacher[supervised], beta, temperature).sum() / supervised.sum()
    )
    assert float(ours) == pytest.approx(float(expected), abs=1e-5)
    assert float(expected) > 1e-3


# --- training runs --------------------------------------------------------------------------------------


def _losses(run) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r.get("loss", r.get("val_loss")) for r in records]


def _distill_config(tokenizer_dir, teacher, **changes):
    return tiny_config(tokenizer_dir, stage="distill", distill={"teacher": str(teacher), **changes})


def test_alpha_one_is_plain_training(tmp_path, tokenizer_dir, pretrained_run):
    train(config_from_dict(tiny_config(tokenizer_dir)), tmp_path / "plain")
    train(config_from_dict(_distill_config(tokenizer_dir, pretrained_run, alpha=1.0)), tmp_path / "distill")
    plain = load_file(tmp_path / "plain/final/model.safetensors")
    distilled = load_file(tmp_path / "distill/final/model.safetensors")
    assert plain.keys() == distilled.keys()
    # The fused LM-head loss and the distillation's CE round differently; Adam carries that ~1e-5 along.
    assert all(torch.allclose(plain[k], distilled[k], atol=2e-4) for k in plain)
    assert _losses(tmp_path / "plain") == pytest.approx(_losses(tmp_path / "distill"), abs=1e-5)


def test_distillation_on_chat_data_logs_both_terms_per_token(tmp_path, tokenizer_dir, pretrained_run):
    config = _distill_config(tokenizer_dir, pretrained_run, data="chat", alpha=0.0, divergence="reverse_kl")
    config = {
        **config,
        "data": {"train": ["builtin:chat"], "val_fraction": 0.1},
        "train": {**config["train"], "max_steps": 2},
        "log": {**config["log"], "every": 1},
    }
    train(config_from_dict(config), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if r["kind"] == "train")
    evaluation = next(r for r in records if r["kind"] == "eval")
    assert step["divergence"] > 0 and step["ce"] > 0
    assert step["loss"] == pytest.approx(step["divergence"], rel=1e-6)  # alpha 0, T 1: the loss is D alone
    assert evaluation["val_loss"] == pytest.approx(evaluation["divergence"], rel=1e-6)


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, tokenizer_dir, pretrained_run):
    teacher = tmp_path / "teacher"
    shutil.copytree(pretrained_run / "final", teacher)
    other = train_tokenizer(
        ["ciao mondo, come va?"] * 20, TINY_VOCAB, template="picodac", show_progress=False
    )
    other.save(teacher)
    with pytest.raises(TokenizerError, match="different tokenizer"):
        train(config_from_dict(_distill_config(tokenizer_dir, teacher, alpha=0.5)), tmp_path / "run")


def test_distill_config_is_validated_by_key():
    with pytest.raises(ConfigError, match="stage distill needs distill.teacher"):
        config_from_dict(tiny_config(None, stage="distill"))
    with pytest.raises(ConfigError, match="distill.alpha must be in"):
        config_from_dict(tiny_config(None, distill={"alpha": 1.5}))
    with pytest.raises(ConfigError, match="distill.temperature must be > 0"):
        config_from_dict(tiny_config(None, distill={"temperature": 0}))


def test_killed_distillation_resumes_bit_identically(tmp_path, tokenizer_dir, pretrained_run):
    data = _distill_config(tokenizer_dir, pretrained_run, alpha=0.5, temperature=2.0, divergence="jsd")
    data = {**data, **RESUME_SETTINGS, "model": {**data["model"], "dropout": 0.1}}
    config = write_config(tmp_path, data)
    straight = run_cli("train", str(config), "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    _kill_and_resume(config, tmp_path / "resumed")
    _assert_identical_runs(tmp_path / "straight", tmp_path / "resumed")
