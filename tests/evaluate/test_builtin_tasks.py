"""Every built-in task loads a real slice of /work/shared/data and scores with a real fucina Transformer."""

from __future__ import annotations

import pytest
import torch

from fucina.evaluate.multiple_choice import evaluate_task
from fucina.evaluate.task_config import builtin_task_names
from fucina.model.config import ModelConfig
from fucina.model.transformer import Transformer

CHANCE = {
    "italic": (0.2, 0.5),
    "exams": (0.2, 0.34),
    "xcopa": (0.5, 0.5),
    "itacola": (0.5, 0.5),
    "fever": (1 / 3, 1 / 3),
}


@pytest.fixture(scope="module")
def model(tokenizer) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, context_length=48, n_layers=2, d_model=32, n_heads=4
    )
    return Transformer(config)


@pytest.mark.parametrize("name", builtin_task_names())
@pytest.mark.parametrize("shots", [0, 2])
def test_builtin_task_scores_a_real_slice(model, tokenizer, shared_data, name, shots):
    result = evaluate_task(
        model, tokenizer, name, data_dir=shared_data, limit=20, shots=shots, seed=1, show_progress=False
    )
    rows = {row.metric: row for row in result.rows if row.task == name}
    assert len(result.questions) == 20
    assert all(q.shots == shots for q in result.questions)
    for metric in ("acc", "acc_norm"):
        assert rows[metric].n == 20
        assert 0.0 <= rows[metric].ci_low <= rows[metric].value <= rows[metric].ci_high <= 1.0
        low, high = CHANCE[name]
        assert low - 1e-9 <= rows[metric].chance <= high + 1e-9
    assert all(len(scores) == len(q.continuations) for q, scores in zip(result.questions, result.logprobs))
    assert all(s < 0 for scores in result.logprobs for s in scores)
