"""Continuation log-likelihoods on a real (tiny, random) fucina Transformer: the shared-context KV-cache
path and the plain one-row-per-choice path agree with a direct forward of each row."""

from __future__ import annotations

import pytest
import torch

from fucina.evaluate.loglikelihood import encode_requests, score_groups, token_batches
from fucina.model.config import ModelConfig
from fucina.model.transformer import Transformer

GROUPS = [
    ("Domanda: qual è la capitale d'Italia?\nRisposta:", [" Roma", " Milano", " Napoli", " Torino"]),
    ("Il caffè", [" è buono", " costa poco al bar sotto casa"]),
    ("Frase: " + "la nonna prepara le tagliatelle al ragù per tutti " * 4 + "\nCorretta?", [" Sì", " No"]),
    ("Quale stagione viene dopo l'estate?", [" l'autunno", " la primavera", " l'inverno"]),
    ("X", [" a"]),
]


def _model(vocab_size: int, **shape) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, context_length=24, n_layers=2, d_model=32, n_heads=4, **shape)
    return Transformer(config).eval()


def _direct(model: Transformer, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one forward of exactly that row."""
    row = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(row[:, :-1]).double(), dim=-1)[0]
    positions = range(len(context) - 1, len(row[0]) - 1)
    return float(sum(logprobs[p, row[0, p + 1]] for p in positions))


@pytest.mark.parametrize(
    "shape",
    [
        dict(positions="learned"),
        dict(positions="rope", n_kv_heads=2, norm="rmsnorm", mlp="swiglu"),
        dict(positions="rope", sliding_window=6),
    ],
    ids=["learned", "rope-gqa", "sliding-window"],
)
def test_shared_context_and_plain_paths_give_the_direct_scores(tokenizer, shape):
    model = _model(tokenizer.vocab_size, **shape)
    options = dict(bf16=False, show_progress=False)
    shared = score_groups(model, tokenizer, GROUPS, batch_size=3, share_context=True, **options)
    plain = score_groups(model, tokenizer, GROUPS, batch_size=4, share_context=False, **options)
    for (context, continuations), shared_scores, plain_scores in zip(GROUPS, shared, plain, strict=True):
        pairs = encode_requests(tokenizer, [(context, c) for c in continuations])
        longest = max(len(ids) for _, ids in pairs)
        kept_context = pairs[0][0][-(model.config.context_length + 1 - longest) :]
        for (_, ids), a, b in zip(pairs, shared_scores, plain_scores, strict=True):
            expected = _direct(model, kept_context, ids)
            assert a.logprob == pytest.approx(expected, rel=1e-4, abs=1e-4)
            assert b.logprob == pytest.approx(expected, rel=1e-4, abs=1e-4)
            assert a.tokens == b.tokens == len(ids)
    assert shared[2][0].context_truncated and not shared[1][0].context_truncated


def test_the_real_transformer_takes_the_shared_context_path_by_default(tokenizer):
    model = _model(tokenizer.vocab_size)
    default = score_groups(model, tokenizer, GROUPS[:2], bf16=False, show_progress=False)
    shared = score_groups(model, tokenizer, GROUPS[:2], bf16=False, share_context=True, show_progress=False)
    assert [[s.logprob for s in g] for g in default] == [[s.logprob for s in g] for g in shared]


def test_a_model_without_plain_kv_caches_falls_back_to_the_plain_path(tokenizer):
    model = _model(tokenizer.vocab_size, mixer="mamba")
    options = dict(bf16=False, show_progress=False)
    asked = score_groups(model, tokenizer, GROUPS[:2], share_context=True, **options)
    plain = score_groups(model, tokenizer, GROUPS[:2], share_context=False, **options)
    assert [[s.logprob for s in g] for g in asked] == [[s.logprob for s in g] for g in plain]


@pytest.mark.parametrize("share_context", [True, False], ids=["shared", "plain"])
def test_token_budget_batches_give_the_same_scores_as_one_row_at_a_time(tokenizer, share_context):
    model = _model(tokenizer.vocab_size, positions="rope")
    options = dict(bf16=False, share_context=share_context, show_progress=False)
    one = score_groups(model, tokenizer, GROUPS, batch_size=1, **options)
    budget = score_groups(model, tokenizer, GROUPS, batch_tokens=40, **options)  # 1-3 rows per batch
    large = score_groups(model, tokenizer, GROUPS, batch_tokens=100_000, **options)  # everything at once
    for a, b, c in zip(one, budget, large, strict=True):
        for x, y, z in zip(a, b, c, strict=True):
            assert y.logprob == pytest.approx(x.logprob, abs=1e-4)
            assert z.logprob == pytest.approx(x.logprob, abs=1e-4)


def test_token_batches_respect_the_budget_and_the_row_cap():
    lengths = [30, 20, 20, 10, 10, 10, 5]
    runs = token_batches(lengths, batch_tokens=40, batch_size=3)
    assert [list(run) for run in runs] == [[0], [1, 2], [3, 4, 5], [6]]
    assert [list(run) for run in token_batches([200, 1], batch_tokens=40, batch_size=None)] == [[0], [1]]


def test_bf16_scores_stay_close_to_fp32(tokenizer):
    model = _model(tokenizer.vocab_size)
    fp32 = score_groups(model, tokenizer, GROUPS, bf16=False, show_progress=False)
    bf16 = score_groups(model, tokenizer, GROUPS, bf16=True, show_progress=False)
    for a, b in zip(fp32, bf16, strict=True):
        for x, y in zip(a, b, strict=True):
            assert y.logprob == pytest.approx(x.logprob, rel=0.02, abs=0.05 * x.tokens)
            assert y.logprob != x.logprob  # bf16 really ran
