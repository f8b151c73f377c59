"""Knowledge distillation: a student trained on a frozen teacher's soft targets plus the labels.

Design choices:
- loss = alpha * CE(labels) + (1 - alpha) * T^2 * D(teacher || student), summed over the SUPERVISED
  tokens only (labels != -100) and divided by the loop by the supervised tokens of the whole optimizer
  step, so gradient accumulation changes nothing. T^2 keeps the soft term's gradient scale independent
  of the temperature (Hinton et al.).
- D is GKD's generalised Jensen-Shannon divergence (`generalized_jsd`, written as TRL's GKDTrainer
  writes it, which the tests compare with): beta = 0 is the forward KL(teacher || student), beta = 1 the
  reverse KL(student || teacher), values between mix them through the mixture beta*teacher +
  (1-beta)*student.
- The teacher runs under no_grad; the loop loads it frozen, in bf16 where the device supports it.
  The loop has checked that both share one tokenizer; D compares the logits both models have (the
  narrower width), so embedding tables padded to different sizes still compare.
- alpha = 1 is plain training and skips the teacher's forward.
- Offline mode (`top_k`): `prepare` runs the teacher once over the data into a top-k cache
  (train/teacher_topk.py), then drops the model; the divergence compares the k + 1 buckets.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from fucina.errors import ConfigError
from fucina.train.objectives import IGNORE_INDEX, Batch, Model, ObjectiveOutput
from fucina.train.teacher_topk import (
    META_FILE,
    TeacherTopK,
    bucket_logprobs,
    build_teacher_topk,
    stored_bucket_logprobs,
)

TOPK_DIR = "teacher_topk"  # the run's own cache, unless distill.teacher_topk names one

DIVERGENCES = {
    "forward_kl": 0.0,
    "reverse_kl": 1.0,
}  # GKD beta of the two named ends; "jsd" reads distill.beta


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """Per-position generalised JSD between softened teacher and student distributions, (N,).

    student_logits, teacher_logits: (N, V). beta = 0: KL(teacher || student); beta = 1: KL(student || teacher).
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        divergence = F.kl_div(student, teacher, reduction="none", log_target=True)
    elif beta == 1:
        divergence = F.kl_div(teacher, student, reduction="none", log_target=True)
    else:
        mixture = torch.logsumexp(
            torch.stack([student + math.log(1 - beta), teacher + math.log(beta)]), dim=0
        )  # log(beta * p_teacher + (1 - beta) * p_student), (N, V)
        divergence = beta * F.kl_div(mixture, teacher, reduction="none", log_target=True) + (
            1 - beta
        ) * F.kl_div(mixture, student, reduction="none", log_target=True)
    return divergence.sum(dim=-1)


class DistillationObjective:
    """alpha * CE + (1 - alpha) * T^2 * D(teacher || student) on supervised tokens; see the module doc."""

    def __init__(
        self,
        teacher: Model | None,
        alpha: float = 0.5,
        temperature: float = 1.0,
        beta: float = 0.0,
        top_k: int | None = None,
        topk_dir: str | None = None,
    ):
        self.teacher: Model | TeacherTopK | None = teacher
        self.alpha, self.temperature, self.beta = alpha, temperature, beta
        self.top_k, self.topk_dir = top_k, topk_dir

    def prepare(self, data, run_dir: Path, device: torch.device) -> None:
        """Offline mode: build (or reuse) the teacher's top-k cache, then read targets from it alone."""
        if self.top_k is None or self.alpha == 1:
            return
        path = Path(self.topk_dir) if self.topk_dir else Path(run_dir) / TOPK_DIR
        if not (path / META_FILE).is_file():
            if not isinstance(self.teacher, torch.nn.Module):
                raise ConfigError(
                    f"distill.teacher_topk: {path} is not a finished cache and no teacher is set"
                )
            build_teacher_topk(
                self.teacher, [data.train, data.val], path, self.top_k, self.temperature, device
            )
        self.teacher = TeacherTopK(path, self.temperature)

    def supervised_count(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(self, model: Model, batch: Batch) -> ObjectiveOutput:
        input_ids, labels = batch["input_ids"], batch["labels"]
        supervised = labels != IGNORE_INDEX  # (B, T)
        student = model(input_ids)[supervised].float()  # (N, V)
        targets = labels[supervised]
        ce = F.cross_entropy(student, targets, reduction="sum")
        loss_sum = self.alpha * ce
        logs = {"ce": float(ce.detach())}
        if self.alpha < 1:
            if isinstance(self.teacher, TeacherTopK):
                ids, logprobs, rest = (t.to(student.device)[supervised] for t in self.teacher.lookup(batch))
                pair = bucket_logprobs(student, ids, self.temperature), stored_bucket_logprobs(logprobs, rest)
                divergence = generalized_jsd(*pair, self.beta, 1.0).sum()  # already at the temperature
            else:
                with torch.no_grad():
                    teacher = self.teacher(input_ids)[supervised].float()  # (N, V_teacher)
                width = min(student.shape[-1], teacher.shape[-1])
                divergence = generalized_jsd(
                    student[:, :width], teacher[:, :width], self.beta, self.temperature
                ).sum()
            loss_sum = loss_sum + (1 - self.alpha) * self.temperature**2 * divergence
            logs["divergence"] = float(divergence.detach())
        return ObjectiveOutput(loss_sum, int(supervised.sum()), unit_sums=logs)
