"""The engine's serving helpers: cancelling a request frees its row, and per-token logprobs on request."""

from __future__ import annotations

import pytest
import torch

from fucina.inference.engine import Engine
from fucina.inference.generate import SamplingConfig, generate
from tiny_models import tiny_model

PROMPT = [3, 14, 15, 92, 65]
OTHER = [2, 71, 82]


def test_cancelling_a_running_request_lets_a_waiting_one_take_its_row_at_the_next_step():
    model = tiny_model(positions="rope")
    greedy = SamplingConfig(max_new_tokens=20, greedy=True)
    engine = Engine(model, max_batch=1)
    first = engine.add(PROMPT, greedy)
    second = engine.add(OTHER, SamplingConfig(max_new_tokens=6, greedy=True))
    assert [e.request_id for e in engine.step()] == [first]  # the second waits for the only row
    assert engine.cancel(first)
    assert engine.running == 0
    tokens = []
    while not engine.idle:
        events = engine.step()
        assert {e.request_id for e in events} == {second}
        tokens += [e.token for e in events if e.token is not None]
    assert tokens == generate(model, [OTHER], SamplingConfig(max_new_tokens=6, greedy=True))[0]
    assert not engine.cancel(first)  # already gone


def test_a_cancelled_waiting_request_never_runs():
    engine = Engine(tiny_model(), max_batch=1)
    engine.add(PROMPT, SamplingConfig(max_new_tokens=2, greedy=True))
    waiting = engine.add(OTHER, SamplingConfig(max_new_tokens=2, greedy=True))
    assert engine.cancel(waiting)
    seen = set()
    while not engine.idle:
        seen |= {e.request_id for e in engine.step()}
    assert waiting not in seen


@torch.inference_mode()
def test_logprobs_are_the_models_log_softmax_at_each_produced_token():
    model = tiny_model(positions="rope")
    engine = Engine(model, max_batch=2)
    engine.add(OTHER, SamplingConfig(max_new_tokens=5, greedy=True))  # a neighbour without logprobs
    asked = engine.add(PROMPT, SamplingConfig(max_new_tokens=5, temperature=1.5, seed=3), logprobs=4)
    events = []
    while not engine.idle:
        events += [e for e in engine.step() if e.request_id == asked]
    tokens = [e.token for e in events]
    reference = model(torch.tensor([PROMPT + tokens]))[0, len(PROMPT) - 1 : -1].log_softmax(-1)  # (5, vocab)
    for position, event in enumerate(events):
        assert event.logprob == pytest.approx(float(reference[position, event.token]), abs=1e-4)
        top = reference[position].topk(4)
        assert [t for t, _ in event.top_logprobs] == top.indices.tolist()
        assert [v for _, v in event.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
