"""Generation: cached greedy decoding equals recomputation, stops where it should, repeats when seeded."""

from __future__ import annotations

import pytest
import torch

from fucina.errors import ConfigError, FucinaError
from fucina.inference.generate import SamplingConfig, choose_next_tokens, generate, stream
from tiny_models import tiny_model

PROMPTS = [[3, 14, 15, 92, 65], [35], [89, 79, 32, 38, 46, 26, 43, 38, 32], [2, 71, 82]]


@torch.inference_mode()
def greedy_by_recomputation(model, prompt, n):
    """Reference: run the whole sequence through the model for every new token, no cache."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_generation_equals_recomputing_the_sequence(variant_model):
    out = generate(variant_model, [PROMPTS[0]], SamplingConfig(max_new_tokens=12, greedy=True))
    assert out == [greedy_by_recomputation(variant_model, PROMPTS[0], 12)]


def test_batched_prompts_of_different_lengths_equal_their_own_generation(variant_model):
    sampling = SamplingConfig(max_new_tokens=10, greedy=True)
    batched = generate(variant_model, PROMPTS, sampling)
    assert batched == [generate(variant_model, [p], sampling)[0] for p in PROMPTS]


def test_generation_stops_at_a_stop_token_and_leaves_it_out():
    model = tiny_model()
    free = generate(model, [PROMPTS[0]], SamplingConfig(max_new_tokens=8, greedy=True))[0]
    stop = free[3]
    first = free.index(stop)
    out = generate(model, [PROMPTS[0]], SamplingConfig(max_new_tokens=8, greedy=True, stop_token_ids=[stop]))
    assert out == [free[:first]]


def test_rows_stop_independently_in_a_batch():
    model = tiny_model(positions="rope")
    sampling = SamplingConfig(max_new_tokens=8, greedy=True)
    free = generate(model, PROMPTS[:2], sampling)
    stop = free[0][2]
    out = generate(model, PROMPTS[:2], SamplingConfig(max_new_tokens=8, greedy=True, stop_token_ids=[stop]))
    for row in range(2):
        expected = free[row][: free[row].index(stop)] if stop in free[row] else free[row]
        assert out[row] == expected


def test_checking_for_finished_rows_less_often_gives_the_same_output():
    model = tiny_model(positions="rope")
    free = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12, greedy=True))
    sampling = SamplingConfig(max_new_tokens=12, greedy=True, stop_token_ids=[free[0][1], free[2][4]])
    assert generate(model, PROMPTS, sampling, check_every=8) == generate(
        model, PROMPTS, sampling, check_every=1
    )


def test_max_new_tokens_is_respected():
    model = tiny_model()
    assert [len(o) for o in generate(model, PROMPTS, SamplingConfig(max_new_tokens=5))] == [5] * 4
    assert generate(model, PROMPTS, SamplingConfig(max_new_tokens=0)) == [[], [], [], []]


def test_generation_ends_where_the_context_is_full():
    model = tiny_model()  # context 48
    out = generate(model, [[1] * 45, [2] * 10], SamplingConfig(max_new_tokens=20, greedy=True))
    assert [len(o) for o in out] == [3, 20]
    assert generate(model, [[1] * 48], SamplingConfig(max_new_tokens=5)) == [[]]


def test_prompt_longer_than_the_context_is_a_clear_error():
    with pytest.raises(FucinaError, match="prompt 1 has 49 tokens but the model's context is 48"):
        generate(tiny_model(), [[1], [1] * 49], SamplingConfig())
    with pytest.raises(FucinaError, match="prompt 0 is empty"):
        generate(tiny_model(), [[]], SamplingConfig())
    with pytest.raises(FucinaError, match=r"prompt 0 holds token ids outside the model's vocabulary 0\.\.96"):
        generate(tiny_model(), [[5, 97]], SamplingConfig())


def test_seeded_sampling_repeats_exactly():
    model = tiny_model(positions="rope", n_kv_heads=2)
    sampling = SamplingConfig(max_new_tokens=20, temperature=1.3, top_k=40, top_p=0.95, seed=1234)
    first = generate(model, PROMPTS, sampling)
    assert generate(model, PROMPTS, sampling) == first
    other = generate(model, PROMPTS, SamplingConfig(max_new_tokens=20, temperature=1.3, seed=99))
    assert other != first


def test_near_zero_temperature_samples_the_greedy_tokens():
    model = tiny_model(positions="rope", n_kv_heads=2)
    greedy = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, greedy=True))
    assert generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=1e-4, seed=3)) == greedy
    assert generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0.0)) == greedy


def test_stream_yields_the_same_tokens_as_generate():
    model = tiny_model()
    sampling = SamplingConfig(max_new_tokens=9, temperature=0.8, seed=7)
    assert list(stream(model, PROMPTS[2], sampling)) == generate(model, [PROMPTS[2]], sampling)[0]


def test_stream_stops_before_the_stop_token():
    model = tiny_model()
    free = list(stream(model, PROMPTS[0], SamplingConfig(max_new_tokens=6, greedy=True)))
    stopped = list(
        stream(model, PROMPTS[0], SamplingConfig(max_new_tokens=6, greedy=True, stop_token_ids=[free[2]]))
    )
    assert stopped == free[: free.index(free[2])]


def test_training_mode_is_restored_after_generation():
    model = tiny_model().train()
    generate(model, [PROMPTS[0]], SamplingConfig(max_new_tokens=2))
    assert model.training


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    greedy = logits.argmax(-1)
    assert torch.equal(choose_next_tokens(logits, SamplingConfig(top_k=1), generator=generator), greedy)
    assert torch.equal(choose_next_tokens(logits, SamplingConfig(top_p=1e-6), generator=generator), greedy)


def test_top_k_never_samples_outside_the_k_best():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1))
    allowed = logits.topk(3, dim=-1).indices
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        tokens = choose_next_tokens(logits, SamplingConfig(top_k=3, temperature=5.0), generator=generator)
        assert all(tokens[row] in allowed[row] for row in range(2))


def test_repetition_penalty_demotes_seen_tokens():
    seen = torch.tensor([[True, False]])
    sampling = SamplingConfig(greedy=True, repetition_penalty=4.0)
    assert choose_next_tokens(torch.tensor([[2.0, 1.0]]), sampling, seen).item() == 1  # 2/4 < 1
    assert choose_next_tokens(torch.tensor([[-1.0, -1.5]]), sampling, seen).item() == 1  # -1*4 < -1.5
    assert choose_next_tokens(torch.tensor([[2.0, 1.0]]), SamplingConfig(greedy=True), seen).item() == 0


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_k=-2),
        dict(max_new_tokens=-1),
        dict(repetition_penalty=0),
    ],
)
def test_bad_sampling_values_are_rejected(bad):
    with pytest.raises(ConfigError, match="sampling."):
        SamplingConfig(**bad)


@pytest.mark.parametrize("variant", ["gqa-rope-llama", "sliding-window-some-layers-learned"])
def test_compiled_steps_generate_what_eager_steps_generate(variant):
    # torch.compile'd fixed-shape steps (a cache bucket longer than needed, masked) against eager ones.
    from tiny_models import VARIANTS

    model = tiny_model(**VARIANTS[variant])
    sampling = SamplingConfig(max_new_tokens=12, greedy=True)
    prompts = PROMPTS[:2]  # two lengths: rows of different lengths too
    assert generate(model, prompts, sampling, compile=True) == generate(model, prompts, sampling)
