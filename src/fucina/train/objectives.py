"""Training objectives: what the loop minimises for a batch. Today the causal-LM loss (pretraining, SFT).

Design choices:
- Batches follow the INTERFACES convention: `labels` are ALREADY SHIFTED (labels[b, t] is the token
  that must follow input_ids[b, t]) and hold -100 where nothing is trained (user/system turns, chat
  headers, padding). So one masked cross-entropy serves both stages; SFT trains on assistant tokens
  only because the data pipeline put -100 everywhere else, and the loss never looks at those positions.
- An objective is called with the model and a micro-batch and returns an `ObjectiveOutput`: the SUM of
  its per-unit losses and how many units it supervised (tokens for the LM loss), plus anything worth
  logging. The loop divides by the count of the WHOLE optimizer step, so gradient accumulation over
  micro-batches of different lengths gives exactly the token-mean loss of the step (not a mean of means).
  Values an objective wants reported per unit (DPO's rewards and accuracy per pair, distillation's CE
  and divergence per token) go in `unit_sums` as sums; the loop divides them by the step's (or the
  validation set's) count, for the same reason.
- That count is the objective's too (`supervised_count`), read from the batch before any forward: the
  loop sums it over a step's micro-batches in one place, the place where ranks will add theirs.
- The LM objective asks the model for the loss directly (`model(input_ids, labels=labels)`), which fuses
  the LM head with the cross-entropy (fucina/model/loss.py): the fast path. `lm_loss_sum` is the same
  loss for logits obtained some other way, and the reference the fused path is tested against.
- `sequence_logprobs` sums each sequence's log-probabilities over its supervised tokens (float32), the
  quantity preference objectives (DPO) compare between a policy and a reference model.
- Cross-entropies and log-softmaxes are computed in float32 even under bf16/fp16 autocast (a
  normalisation over the vocabulary is where low precision hurts).
- Other objectives (DPO in dpo.py, distillation in distill.py) implement the same `Objective` protocol
  and get a row in stages.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fucina.model.loss import IGNORE_INDEX, cross_entropy_sum

__all__ = [
    "IGNORE_INDEX",
    "LanguageModelingObjective",
    "Objective",
    "ObjectiveOutput",
    "lm_loss",
    "lm_loss_sum",
    "sequence_logprobs",
    "token_logprobs",
]

Batch = dict[str, torch.Tensor]
Model = Callable[..., torch.Tensor]  # the model, or its compiled forward


@dataclass
class ObjectiveOutput:
    """One micro-batch's result: summed loss (float32 scalar), supervised units, extra values to log."""

    loss_sum: torch.Tensor
    count: int
    logs: dict[str, float] = field(default_factory=dict)  # summed over the step's micro-batches as they are
    unit_sums: dict[str, float] = field(default_factory=dict)  # sums over units; logged as means per unit


class Objective(Protocol):
    """What a training stage minimises; see the module docstring."""

    def supervised_count(self, batch: Batch) -> int:
        """Units of `batch` the loss is summed over (the step's normaliser is their sum)."""
        ...

    def __call__(self, model: Model, batch: Batch) -> ObjectiveOutput:
        """The summed loss of `batch` (already on the model's device) under `model`."""
        ...


class LanguageModelingObjective:
    """Next-token cross-entropy over supervised positions, through the model's fused LM-head loss."""

    def supervised_count(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(self, model: Model, batch: Batch) -> ObjectiveOutput:
        labels = batch["labels"]
        loss_sum = model(batch["input_ids"], labels=labels)  # fused LM head + cross-entropy
        return ObjectiveOutput(loss_sum, int((labels != IGNORE_INDEX).sum()))


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy (nats) over supervised positions, and their count.

    logits: (B, T, V); labels: (B, T) already shifted, IGNORE_INDEX where not trained.
    """
    return cross_entropy_sum(logits, labels), int((labels != IGNORE_INDEX).sum())


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per supervised token; 0 (never NaN) when nothing is supervised."""
    total, count = lm_loss_sum(logits, labels)
    return total / max(count, 1)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[b, t]) in float32, (B, T); exactly 0 where labels is IGNORE_INDEX.

    logits: (B, T, V); labels: (B, T) already shifted.
    """
    logits = logits.float()
    supervised = labels != IGNORE_INDEX
    targets = labels.masked_fill(~supervised, 0).unsqueeze(-1)  # (B, T, 1), any valid id where masked
    picked = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, T)
    return picked.masked_fill(~supervised, 0.0)


def sequence_logprobs(model: Model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sequence's summed log-probability of its supervised tokens under `model`, float32, (B,)."""
    return token_logprobs(model(input_ids), labels).sum(dim=-1)
