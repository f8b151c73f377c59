"""Training objectives. Today: the causal-LM loss shared by pretraining and chat fine-tuning.

Design choices:
- Batches follow the INTERFACES convention: `labels` are ALREADY SHIFTED (labels[b, t] is the token
  that must follow input_ids[b, t]) and hold -100 where nothing is trained (user/system turns, chat
  headers, padding). So one masked cross-entropy serves both stages; SFT trains on assistant tokens
  only because the data pipeline put -100 everywhere else, and the loss never looks at those positions.
- The objective returns the SUM of token losses and the number of supervised tokens. The loop divides
  by the supervised-token count of the whole optimizer step, so gradient accumulation over micro-batches
  of different lengths gives exactly the token-mean loss of the step (not a mean of means).
- The cross-entropy is computed in float32 even under bf16/fp16 autocast (log-softmax over the
  vocabulary is where low precision hurts).
- The training loop asks the model for this loss directly (`model(input_ids, labels=labels)`), which
  fuses the LM head with the cross-entropy (fucina/model/loss.py); `lm_loss_sum` is the same loss for
  logits obtained some other way, and the reference the fused path is tested against.
- Later objectives (distillation, DPO) plug in here with the same (sum, count) shape.
"""

from __future__ import annotations

import torch

from fucina.model.loss import IGNORE_INDEX, cross_entropy_sum

__all__ = ["IGNORE_INDEX", "lm_loss", "lm_loss_sum"]


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy (nats) over supervised positions, and their count.

    logits: (B, T, V); labels: (B, T) already shifted, IGNORE_INDEX where not trained.
    """
    return cross_entropy_sum(logits, labels), int((labels != IGNORE_INDEX).sum())


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per supervised token; 0 (never NaN) when nothing is supervised."""
    total, count = lm_loss_sum(logits, labels)
    return total / max(count, 1)
