"""The decoding engine: requests join and leave a running batch and each computes what it would alone."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from fucina.inference.engine import Engine
from fucina.inference.generate import SamplingConfig, generate
from tiny_models import VARIANTS, tiny_model

PROMPTS = [[3, 14, 15, 92, 65], [35], [89, 79, 32, 38, 46, 26, 43, 38, 32], [2, 71, 82]]
ROPE_SWIGLU = dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)
ARCHITECTURES = {
    "mha-learned-gpt2": VARIANTS["mha-learned-gpt2"],
    "gqa-rope-llama": VARIANTS["gqa-rope-llama"],
    "sliding-window-rope": VARIANTS["sliding-window-rope"],
    "mla": dict(mixer="mla", **ROPE_SWIGLU),
    "mamba": dict(mixer="mamba", **ROPE_SWIGLU),
    "moe": dict(ffn="moe", moe_num_experts=4, moe_top_k=2, moe_d_ff=48, **ROPE_SWIGLU),
}


@torch.inference_mode()
def greedy_by_recomputation(model, prompt, n):
    """Reference: run the whole sequence through the model for every new token, no cache."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def run(engine: Engine, joining: dict[int, tuple[list[int], SamplingConfig]]) -> tuple[dict, dict]:
    """Step until idle, adding joining[step] before that step; tokens and finish reason per request."""
    tokens: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    step = 0
    while not engine.idle or any(s >= step for s in joining):
        if step in joining:
            tokens[engine.add(*joining[step])] = []
        for event in engine.step():
            if event.token is not None:
                tokens[event.request_id].append(event.token)
            if event.finished is not None:
                reasons[event.request_id] = event.finished
        step += 1
    return tokens, reasons


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_a_request_joining_a_running_batch_produces_what_it_produces_alone(architecture):
    model = tiny_model(**ARCHITECTURES[architecture])
    greedy = SamplingConfig(max_new_tokens=10, greedy=True)
    engine = Engine(model, max_batch=2)
    tokens, _ = run(engine, {0: (PROMPTS[0], greedy), 4: (PROMPTS[2], greedy)})
    assert tokens[0] == greedy_by_recomputation(model, PROMPTS[0], 10)
    assert tokens[1] == greedy_by_recomputation(model, PROMPTS[2], 10)


def test_a_seeded_request_samples_the_same_tokens_alone_or_beside_others():
    model = tiny_model(**VARIANTS["gqa-rope-llama"])
    seeded = SamplingConfig(max_new_tokens=12, temperature=1.2, top_k=30, seed=7)
    alone, _ = run(Engine(model), {0: (PROMPTS[3], seeded)})
    other = SamplingConfig(max_new_tokens=6, temperature=0.9, seed=8)
    together, _ = run(Engine(model, max_batch=2), {0: (PROMPTS[0], other), 2: (PROMPTS[3], seeded)})
    assert together[1] == alone[0]
    assert len(set(alone[0])) > 1  # really sampled, not stuck on one token


def test_freed_rows_are_reused_by_later_requests():
    model = tiny_model(positions="rope")
    engine = Engine(model, max_batch=2)
    budgets = [3, 9, 5, 4]
    joining = {0: (PROMPTS[0], SamplingConfig(max_new_tokens=3, greedy=True))}
    joining[1] = (PROMPTS[1], SamplingConfig(max_new_tokens=9, greedy=True))
    joining[2] = (PROMPTS[2], SamplingConfig(max_new_tokens=5, greedy=True))  # waits for the first row
    joining[3] = (PROMPTS[3], SamplingConfig(max_new_tokens=4, greedy=True))
    tokens, reasons = run(engine, joining)
    for request, (prompt, budget) in enumerate(zip(PROMPTS, budgets)):
        assert tokens[request] == greedy_by_recomputation(model, prompt, budget)
        assert reasons[request] == "length"
    assert engine.idle and len(engine.rows) == 2


def test_requests_end_on_a_stop_token_or_a_full_context():
    model = tiny_model()  # context 48
    free = generate(model, [PROMPTS[0]], SamplingConfig(max_new_tokens=8, greedy=True))[0]
    stop = SamplingConfig(max_new_tokens=8, greedy=True, stop_token_ids=[free[3]])
    tokens, reasons = run(Engine(model, max_batch=2), {0: (PROMPTS[0], stop), 1: ([7] * 45, stop)})
    assert tokens[0] == free[: free.index(free[3])] and reasons[0] == "stop"
    assert len(tokens[1]) <= 3
    assert reasons[1] in ("stop", "context")
    _, reasons = run(Engine(model), {0: ([7] * 45, SamplingConfig(max_new_tokens=8, greedy=True))})
    assert reasons == {0: "context"}


def test_generation_ignores_the_models_training_mode():
    model = tiny_model(positions="rope", dropout=0.5)
    sampling = SamplingConfig(max_new_tokens=8, greedy=True)
    expected = greedy_by_recomputation(model, PROMPTS[0], 8)  # tiny_model is in eval mode
    model.train()
    assert generate(model, [PROMPTS[0]], sampling) == [expected]
    assert model.training


def test_compiled_engine_lets_a_request_join_like_the_eager_one():
    model = tiny_model(**VARIANTS["gqa-rope-llama"])
    greedy = SamplingConfig(max_new_tokens=8, greedy=True)
    joining = {0: (PROMPTS[0], greedy), 3: (PROMPTS[2], greedy)}
    compiled, _ = run(Engine(model, max_batch=2, max_length=32, compile=True), joining)
    eager, _ = run(Engine(model, max_batch=2, max_length=32), joining)
    assert compiled == eager


@pytest.mark.parametrize("architecture", ["gqa-rope-llama", "mla"])
def test_compiled_rows_attend_a_window_that_grows_with_the_sequences(architecture):
    # max_length 200: windows of 64, 128 and then every slot, each one compilation; the tokens stay
    # those of eager decoding (which attends exactly the filled slots) across both switches.
    model = tiny_model(context_length=200, **ARCHITECTURES[architecture])
    joining = {
        0: (PROMPTS[0], SamplingConfig(max_new_tokens=140, greedy=True)),
        5: (PROMPTS[2], SamplingConfig(max_new_tokens=60, greedy=True)),
    }
    engine = Engine(model, max_batch=2, max_length=200, compile=True)
    windows, step = [], engine.forward

    def recording_step(ids, cache, **kwargs):
        windows.append(cache.max_length)
        return step(ids, cache, **kwargs)

    engine.forward = recording_step
    compiled, _ = run(engine, joining)
    eager, _ = run(Engine(model, max_batch=2, max_length=200), joining)
    assert compiled == eager
    assert sorted(set(windows)) == [64, 128, 200]
    assert windows == sorted(windows)


def test_a_compiled_step_does_not_recheck_its_inputs_sizes_on_every_call():
    # Dynamo's guards check them already; the wrapper's own checks cover every weight, every step.
    from torch._inductor.utils import run_and_get_code

    model = tiny_model(**VARIANTS["gqa-rope-llama"])
    greedy = {0: (PROMPTS[0], SamplingConfig(max_new_tokens=3, greedy=True))}
    (compiled, _), sources = run_and_get_code(
        run, Engine(model, max_batch=1, max_length=16, compile=True), greedy
    )
    assert list(compiled.values()) == [greedy_by_recomputation(model, PROMPTS[0], 3)]
    wrapper = "\n".join(sources)
    assert "def call(" in wrapper and "assert_size_stride(" not in wrapper


def test_each_models_compiled_steps_have_their_own_recompile_budget():
    # Dynamo keeps at most `recompile_limit` compiled versions per code object; with a limit of 1 and
    # an error when it is hit, a second model of another shape sharing the class's forward would raise.
    greedy = SamplingConfig(max_new_tokens=3, greedy=True)
    models = [tiny_model(**VARIANTS["gqa-rope-llama"]), tiny_model(**VARIANTS["mha-learned-gpt2"])]
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for model in models:
            compiled, _ = run(
                Engine(model, max_batch=1, max_length=16, compile=True), {0: (PROMPTS[0], greedy)}
            )
            assert list(compiled.values()) == [greedy_by_recomputation(model, PROMPTS[0], 3)]


def test_two_threads_decoding_two_models_each_get_their_own_tokens():
    models = [tiny_model(seed=1, positions="rope"), tiny_model(seed=2, **VARIANTS["mha-learned-gpt2"])]
    sampling = SamplingConfig(max_new_tokens=12, greedy=True)
    alone = [generate(model, PROMPTS, sampling) for model in models]
    results: list[list] = [[], []]

    def decode(index: int) -> None:
        for _ in range(4):
            results[index].append(generate(models[index], PROMPTS, sampling))

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(2):
        assert results[index] == [alone[index]] * 4


def test_decoding_one_model_while_another_trains_and_runs_plainly():
    decoded, trained = tiny_model(seed=1, positions="rope"), tiny_model(seed=2, positions="rope")
    sampling = SamplingConfig(max_new_tokens=12, greedy=True)
    alone = generate(decoded, PROMPTS, sampling)
    generate(trained, PROMPTS, sampling)  # `trained` has packed copies that its training makes stale
    ids = torch.tensor([PROMPTS[2]])
    outputs: list = []

    def decode() -> None:
        for _ in range(6):
            outputs.append(generate(decoded, PROMPTS, sampling))

    thread = threading.Thread(target=decode)
    thread.start()
    trained.train()
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.05)
    for _ in range(6):
        loss = trained(ids[:, :-1], labels=ids[:, 1:]) / (ids.size(1) - 1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # the plain forward reads the updated weights, never a packed copy
            reference = copy.deepcopy(trained).eval()
            trained.eval()
            torch.testing.assert_close(trained(ids), reference(ids), atol=0, rtol=0)
            trained.train()
    thread.join()
    assert outputs == [alone] * 6


def test_a_long_lived_engine_decodes_the_current_weights():
    model = tiny_model(positions="rope", tie_embeddings=False)
    greedy = SamplingConfig(max_new_tokens=6, greedy=True)
    engine = Engine(model)
    run(engine, {0: (PROMPTS[0], greedy)})
    with torch.no_grad():  # what an optimizer step between two requests does
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    tokens, _ = run(engine, {0: (PROMPTS[0], greedy)})
    assert list(tokens.values()) == [greedy_by_recomputation(model, PROMPTS[0], 6)]


def test_eager_steps_decode_only_the_rows_up_to_the_last_busy_one():
    model = tiny_model(positions="rope", n_kv_heads=2)
    batch_sizes: list[int] = []
    model.token_embedding.register_forward_hook(lambda module, args, out: batch_sizes.append(args[0].size(0)))
    sampling = SamplingConfig(max_new_tokens=6, greedy=True)
    alone = generate(model, [[1, 2, 3]], sampling)[0]
    batch_sizes.clear()
    engine = Engine(model, max_batch=8)
    first = engine.add([1, 2, 3], sampling)
    tokens: dict[int, list[int]] = {first: []}
    for step in range(20):
        if step == 2:
            tokens[engine.add([4, 5], sampling)] = []
        for event in engine.step():
            if event.token is not None:
                tokens[event.request_id].append(event.token)
        if engine.idle:
            break
    assert tokens[first] == alone
    assert max(batch_sizes) == 2  # two busy rows of eight: never a forward over all eight
