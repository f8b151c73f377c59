"""Text generation: prefill each prompt once, then one token per step, on the decoding engine.

Design choices:
- `generate` and `stream` are thin loops over `Engine` (engine.py), so there is one decoding path: a
  batch of prompts of different lengths is one engine run with a row per prompt, each row at its own
  length, so every row produces what it would produce alone.
- Sampling (sampling.py) follows Hugging Face's order; a seeded request repeats exactly. Each prompt
  of a batch draws from its own generator seeded with `seed`.
- A stop token ends its row and is NOT included in the output; `max_new_tokens` caps the output; a row
  also stops when its sequence fills the model's context (never an error: generation just ends there).
  A prompt longer than the context raises FucinaError.
- Decoding runs the model's decoding view (cpu_kernels.py) under torch.inference_mode; the model
  itself, its parameters and its training mode are left untouched.
- `compile=True` runs each one-token step through torch.compile (engine.py). The cache length is then
  rounded up to a power of two (at least 128): few shapes, few compilations.
"""

from __future__ import annotations

from collections.abc import Iterator

from fucina.errors import FucinaError
from fucina.inference.engine import Engine, check_prompt
from fucina.inference.sampling import SamplingConfig, choose_next_tokens
from fucina.model.transformer import Transformer

__all__ = ["SamplingConfig", "choose_next_tokens", "generate", "stream"]

_SMALLEST_BUCKET = 128  # compiled decoding rounds cache lengths up to a power of two, at least this


def _engine_for(
    model: Transformer, prompts: list[list[int]], sampling: SamplingConfig, compile: bool
) -> Engine:
    """An engine with a row per prompt and a cache just long enough for the longest run."""
    if not prompts:
        raise FucinaError("generate needs at least one prompt")
    context = model.config.context_length
    needed = 1
    for index, prompt in enumerate(prompts):
        check_prompt(model, prompt, context, f"prompt {index}")
        budget = max(min(sampling.max_new_tokens, context - len(prompt)), 1)
        needed = max(needed, len(prompt) + budget - 1)  # the last token is never fed back
    if compile:  # few distinct shapes, so few compilations
        needed = min(context, max(_SMALLEST_BUCKET, 1 << (needed - 1).bit_length()))
    return Engine(model, max_batch=len(prompts), max_length=needed, compile=compile)


def generate(
    model: Transformer,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    check_every: int | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """The new tokens for each prompt (stop tokens excluded), the prompts decoded side by side.

    `check_every` is kept for callers of the earlier batch generator and has no effect: the engine
    learns every step's tokens on the host. `compile`: run the one-token steps through torch.compile.
    """
    engine = _engine_for(model, prompts, sampling, compile)
    index = {engine.add(prompt, sampling): row for row, prompt in enumerate(prompts)}
    outputs: list[list[int]] = [[] for _ in prompts]
    while not engine.idle:
        for event in engine.step():
            if event.token is not None:
                outputs[index[event.request_id]].append(event.token)
    return outputs


def stream(
    model: Transformer, prompt: list[int], sampling: SamplingConfig, compile: bool = False
) -> Iterator[int]:
    """Yield the new token ids of one prompt as they are produced (stop token excluded)."""
    engine = _engine_for(model, [prompt], sampling, compile)
    engine.add(prompt, sampling)
    while not engine.idle:
        for event in engine.step():
            if event.token is not None:
                yield event.token
