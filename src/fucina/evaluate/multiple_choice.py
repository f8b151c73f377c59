"""Multiple choice by log-likelihood, scored the way lm-evaluation-harness does it.

For each choice the model scores the continuation tokens given the context (`loglikelihood.py`); `acc`
takes the choice with the highest summed log-probability, `acc_norm` the highest log-probability per
character of the continuation string (lm-eval's acc_norm: longer answers are not penalised for their
length). Ties go to the first choice, as `argmax` does. Accuracies get a Wilson 95% interval and the
chance level (mean of 1/#choices); `mcc` (two-choice tasks) a bootstrap interval.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from fucina.errors import DataError
from fucina.evaluate.heldout import resolve_data_dir
from fucina.evaluate.loglikelihood import DEFAULT_BATCH_TOKENS, score_groups
from fucina.evaluate.prompts import Question, build_questions
from fucina.evaluate.report import ScoreRow, bootstrap_interval, matthews_correlation, wilson_interval
from fucina.evaluate.task_config import TaskSpec, load_fewshot_pool, load_items, load_task_spec
from fucina.tokenizer import FucinaTokenizer

logger = logging.getLogger(__name__)


@dataclass
class TaskResult:
    """Per-item scores of one task and the metrics computed from them."""

    name: str
    spec: TaskSpec
    questions: list[Question]
    logprobs: list[list[float]]  # per question, per choice
    context_truncated: int = 0
    continuation_truncated: int = 0
    seed: int = 0
    rows: list[ScoreRow] = field(default_factory=list)

    @property
    def predictions(self) -> np.ndarray:
        return np.array([int(np.argmax(scores)) for scores in self.logprobs], dtype=np.int64)

    @property
    def normalized_predictions(self) -> np.ndarray:
        preds = []
        for question, scores in zip(self.questions, self.logprobs, strict=True):
            lengths = [max(len(c), 1) for c in question.continuations]
            preds.append(int(np.argmax(np.array(scores) / np.array(lengths))))
        return np.array(preds, dtype=np.int64)

    @property
    def answers(self) -> np.ndarray:
        return np.array([q.answer for q in self.questions], dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "file": self.spec.file,
            "source": self.spec.source,
            "items": len(self.questions),
            "shots": max((q.shots for q in self.questions), default=0),
            "seed": self.seed,
            "context_truncated": self.context_truncated,
            "continuation_truncated": self.continuation_truncated,
        }


def _accuracy_row(task: str, correct: np.ndarray, chance: float, metric: str) -> ScoreRow:
    n = len(correct)
    low, high = wilson_interval(int(correct.sum()), n)
    return ScoreRow(task, metric, float(correct.mean()) if n else 0.0, low, high, chance, n)


def compute_metrics(result: TaskResult) -> list[ScoreRow]:
    """acc / acc_norm (Wilson 95%) and mcc (bootstrap 95%), overall and per `group_by` value."""
    answers = result.answers
    chances = np.array([1 / len(q.continuations) for q in result.questions])
    predictions = {"acc": result.predictions, "acc_norm": result.normalized_predictions}
    predicted = predictions["acc"]
    rows = []
    for metric in result.spec.metrics:
        if metric == "mcc":
            if any(len(q.continuations) != 2 for q in result.questions):
                raise DataError(f"task '{result.name}': metric 'mcc' needs exactly two choices per item")
            value = matthews_correlation(predicted, answers)
            low, high = bootstrap_interval(
                lambda idx: matthews_correlation(predicted[idx], answers[idx]), len(answers), seed=result.seed
            )
            rows.append(ScoreRow(result.name, "mcc", value, low, high, 0.0, len(answers)))
        else:
            correct = predictions[metric] == answers
            rows.append(_accuracy_row(result.name, correct, float(chances.mean()), metric))
    if result.spec.group_by:
        groups = np.array([q.group for q in result.questions])
        for group in sorted(set(groups.tolist())):
            members = groups == group
            for metric in (m for m in result.spec.metrics if m in predictions):
                correct = predictions[metric][members] == answers[members]
                rows.append(
                    _accuracy_row(f"{result.name}/{group}", correct, float(chances[members].mean()), metric)
                )
    return rows


def sample_indices(total: int, limit: int | None, seed: int) -> list[int]:
    """All indices, or a seeded sample of `limit` of them kept in file order."""
    if limit is None or limit >= total:
        return list(range(total))
    if limit < 1:
        raise DataError(f"--limit must be at least 1, got {limit}")
    return sorted(np.random.default_rng(seed).choice(total, size=limit, replace=False).tolist())


def evaluate_task(
    model: nn.Module,
    tokenizer: FucinaTokenizer,
    task: str | Path | TaskSpec,
    *,
    data_dir: str | Path | None = None,
    shots: int = 0,
    limit: int | None = None,
    seed: int = 0,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    batch_size: int | None = None,
    bf16: bool | None = None,
    share_context: bool | None = None,
    show_progress: bool = True,
) -> TaskResult:
    """Score a multiple-choice task (a built-in name, a YAML path or a TaskSpec) and compute its metrics.

    Batching, bf16 and context sharing as `score_groups` (defaults: 8192-token batches, bf16 where the
    device has it natively, shared contexts for the fucina Transformer).
    """
    spec = task if isinstance(task, TaskSpec) else load_task_spec(task)
    root = resolve_data_dir(data_dir)
    items = load_items(spec, root)
    items = [items[i] for i in sample_indices(len(items), limit, seed)]
    pool = load_fewshot_pool(spec, root) if shots else []
    questions = build_questions(spec, items, pool, shots=shots, seed=seed)
    scores = score_groups(
        model,
        tokenizer,
        [(q.context, q.continuations) for q in questions],
        batch_tokens=batch_tokens,
        batch_size=batch_size,
        bf16=bf16,
        share_context=share_context,
        show_progress=show_progress,
        desc=spec.name,
    )
    logprobs = [[s.logprob for s in group] for group in scores]
    result = TaskResult(spec.name, spec, questions, logprobs, seed=seed)
    result.context_truncated = sum(group[0].context_truncated for group in scores)
    result.continuation_truncated = sum(s.continuation_truncated for group in scores for s in group)
    if result.continuation_truncated:
        logger.warning(
            "%s: %d continuation(s) longer than the model's context; only their last tokens were scored",
            spec.name,
            result.continuation_truncated,
        )
    result.rows = compute_metrics(result)
    return result
