"""Direct preference optimisation: the DPO objective and its loss variants (sigmoid, IPO, hinge, RPO).

Design choices:
- A batch holds B chosen rows then B rejected rows (data/preferences.py), so the policy scores both
  sides in ONE forward; the frozen reference does the same under no_grad. Each side's score is the sum
  of its answer tokens' log-probabilities (the prompt is labelled -100, so it never counts).
- The unit of the loss is the pair: `supervised_count` is B, and the loop divides the step's summed
  loss by the pairs of the whole step, so gradient accumulation changes nothing.
- `dpo_losses` is a free function of the four sequence log-probabilities, written as TRL writes it
  (TRL's DPOTrainer is the peer the tests compare with): with h = (pi_c - pi_r) - (ref_c - ref_r),
  sigmoid = -(1-eps) log s(beta h) - eps log s(-beta h); hinge = relu(1 - beta h); IPO, as TRL and the
  IPO authors do, compares per-token MEANS of the log-ratios (so beta means the same for long and short
  answers): ipo = (h_mean - 1/(2 beta))^2. The label smoothing eps is conservative DPO's (cDPO); TRL
  1.16's sigmoid has none, so parity holds at eps = 0. At the first step the policy is the reference,
  h = 0 and the sigmoid loss is ln 2.
- RPO adds `rpo_alpha` times the chosen answer's mean negative log-likelihood per token (per pair, so
  it sums over pairs like the DPO term).
- `precompute_reference`: for memory, the reference scores every training and validation pair once
  (`prepare`, before the first step), the scores are stored with the run in
  `reference_logps.safetensors` (a resumed run reads them back, so resume stays exact) and the
  reference model is released; batches then carry the scores.
- Logged values are `unit_sums` over the micro-batch's pairs (the loop reports their mean per pair): rewards
  beta (pi - ref) of each side, their margin, the accuracy (chosen reward above rejected) and a KL
  proxy, the mean of (pi - ref) over both sides.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fucina.fsutil import atomic_path
from fucina.train.objectives import IGNORE_INDEX, Batch, Model, ObjectiveOutput, token_logprobs

if TYPE_CHECKING:
    from fucina.data.loaders import StageData

log = logging.getLogger(__name__)

REFERENCE_LOGPS_FILE = "reference_logps.safetensors"

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair DPO loss (B,) from summed sequence log-probabilities (each (B,)).

    chosen_tokens, rejected_tokens: scored tokens per answer (B,), needed by `ipo` only.
    """
    chosen_ratio, rejected_ratio = policy_chosen - reference_chosen, policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the scored tokens of each answer")
        mean_h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (mean_h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    raise ValueError(f"unknown DPO loss {loss_type!r} (known: {', '.join(DPO_LOSSES)})")


class DPOObjective:
    """The DPO loss of a policy against a frozen reference model; see the module docstring."""

    def __init__(
        self,
        reference: Model,
        loss_type: str = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        rpo_alpha: float | None = None,
        precompute_reference: bool = False,
    ):
        self.reference, self.loss_type, self.beta = reference, loss_type, beta
        self.label_smoothing, self.rpo_alpha = label_smoothing, rpo_alpha
        self.precompute_reference = precompute_reference

    def prepare(self, data: StageData, run_dir: Path, device: torch.device) -> None:
        """With precompute_reference: attach the reference's scores of every pair, then drop the model."""
        if not self.precompute_reference:
            return
        splits = {"train": data.train, "val": data.val}
        path = Path(run_dir) / REFERENCE_LOGPS_FILE
        if path.is_file():
            stored = load_file(path)
        else:
            stored = {name: self._score(split, device) for name, split in splits.items()}
            with atomic_path(path) as tmp:
                save_file(stored, str(tmp))
            log.info(
                "reference log-probabilities of %s pairs stored in %s",
                sum(len(v) for v in stored.values()),
                path,
            )
        for name, split in splits.items():
            split.dataset.reference_logps = stored[name].numpy()
        self.reference = None

    @torch.no_grad()
    def _score(self, split, device: torch.device) -> torch.Tensor:
        """(N, 2) float32: the reference's summed log-probability of each pair's chosen and rejected side."""
        dataset = split.dataset
        scores = torch.zeros(len(dataset), 2)
        for start in range(0, len(dataset), split.batch_size):
            indices = list(range(start, min(start + split.batch_size, len(dataset))))
            batch = split.collate([dataset[i] for i in indices], split.pad_id)
            logps = token_logprobs(self.reference(batch["input_ids"].to(device)), batch["labels"].to(device))
            both = logps.sum(dim=-1).cpu()  # (2B,)
            scores[indices] = torch.stack([both[: len(indices)], both[len(indices) :]], dim=-1)
        return scores

    def supervised_count(self, batch: Batch) -> int:
        return batch["input_ids"].shape[0] // 2

    def __call__(self, model: Model, batch: Batch) -> ObjectiveOutput:
        input_ids, labels = batch["input_ids"], batch["labels"]  # (2B, T): chosen rows, then rejected
        pairs = input_ids.shape[0] // 2
        token_lp = token_logprobs(model(input_ids), labels)  # (2B, T)
        policy = token_lp.sum(dim=-1)
        if "reference_logps" in batch:
            reference = batch["reference_logps"].float()
        else:
            with torch.no_grad():
                reference = token_logprobs(self.reference(input_ids), labels).sum(dim=-1)
        scored = (labels != IGNORE_INDEX).sum(dim=-1)  # (2B,)
        losses = dpo_losses(
            policy[:pairs],
            policy[pairs:],
            reference[:pairs],
            reference[pairs:],
            self.loss_type,
            self.beta,
            self.label_smoothing,
            scored[:pairs],
            scored[pairs:],
        )
        if self.rpo_alpha is not None:
            losses = losses + self.rpo_alpha * (-policy[:pairs] / scored[:pairs].clamp(min=1))
        with torch.no_grad():
            ratio = (policy - reference).detach()
            chosen_reward, rejected_reward = self.beta * ratio[:pairs], self.beta * ratio[pairs:]
            logs = {
                "rewards/chosen": float(chosen_reward.sum()),
                "rewards/rejected": float(rejected_reward.sum()),
                "rewards/margin": float((chosen_reward - rejected_reward).sum()),
                "rewards/accuracy": float((chosen_reward > rejected_reward).float().sum()),
                "kl_proxy": float((ratio[:pairs] + ratio[pairs:]).sum() / 2),
            }
        return ObjectiveOutput(losses.sum(), pairs, unit_sums=logs)
