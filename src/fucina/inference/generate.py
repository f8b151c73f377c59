"""Text generation with a KV cache: prefill the prompt once, then one token per step.

Design choices:
- Batches of prompts of different lengths are left-padded; the cache masks the padding and counts each
  row's positions from its first real token, so every row produces what it would produce alone.
- Sampling follows Hugging Face's order: repetition penalty (over prompt and generated tokens) ->
  temperature -> top-k -> top-p -> draw. `greedy` (or temperature 0) takes the argmax instead.
- Randomness comes from one torch.Generator seeded with `seed`, so a seeded run repeats exactly; without
  a seed torch's global generator is used.
- A stop token ends its row and is NOT included in the output; `max_new_tokens` caps the output; a row
  also stops when its sequence fills the model's context (never an error: generation just ends there).
  A prompt longer than the context raises FucinaError.
- Everything runs under torch.inference_mode, the model in eval mode (restored afterwards). The only
  host synchronisation is the "is every row finished?" check: every step on CPU, every 8 steps on a GPU
  so the host can queue kernels ahead of the device (`stream` must sync per token to yield it). Without
  stop tokens there is no check at all: every row runs to its budget, known before the first step.
- On CPU the steps multiply by oneDNN-packed copies of the dense weights (model/packed_linear.py),
  which stream from memory several times faster than torch's default kernel at batch 1.
- `compile=True` runs each one-token step through torch.compile (the prompt is still prefilled
  eagerly). At batch 1 a small model's step is a few hundred tiny kernels whose dispatch costs more than
  their arithmetic; compiled, they fuse into a few dozen. On CPU the compiled step has no library calls
  left at batch 1: a one-row product is written as a sum over the weight (packed_linear.row_times_weight)
  and one-query attention as sums over keys (attention._one_query_attention), which inductor turns into
  its own vectorised loops, streaming the weights at close to memory speed (picodac fp32: 1.2 -> 0.55 ms
  per token against the same step calling oneDNN and SDPA). The step then needs the same shapes every
  time: the new token's slot is a tensor, the cache length is rounded up to a power of two (at least
  128: few shapes, few compilations) and attention reads every slot, the unfilled ones masked.
  Compiling takes tens of seconds once per process and shape (inductor's disk cache shortens later
  runs), so it pays off for long generations, chat sessions and servers; models with a mixer that
  cannot decode at fixed shapes (Mamba) fall back to eager steps.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fucina.errors import ConfigError, FucinaError
from fucina.inference.cpu_kernels import pack_linears, packed_decoding
from fucina.model.cache import KVCache
from fucina.model.transformer import Transformer

log = logging.getLogger(__name__)
_SMALLEST_BUCKET = 128  # compiled decoding rounds cache lengths up to a power of two, at least this
_compiled_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> compiled forward


@dataclass
class SamplingConfig:
    """How to pick each next token (see the module docstring for the order they apply in)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence (CTRL / HF rule)
    stop_token_ids: tuple[int, ...] | list[int] = ()
    seed: int | None = None
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"sampling.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"sampling.repetition_penalty must be > 0, got {self.repetition_penalty}")
        self.stop_token_ids = tuple(self.stop_token_ids)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


def _penalise_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of already seen tokens by `penalty`."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    drop_sorted = (
        sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    )  # the more likely ones already reach top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def choose_next_tokens(
    logits: torch.Tensor,
    sampling: SamplingConfig,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, vocab); `seen` (B, vocab) marks past tokens."""
    logits = logits.float()
    if sampling.repetition_penalty != 1.0 and seen is not None:
        logits = _penalise_repeats(logits, seen, sampling.repetition_penalty)
    if sampling.is_greedy:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.size(-1):
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        logits = _filter_top_p(logits, sampling.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class _Decoding:
    """State of one batched generation: the cache, the per-row budgets and which rows still run."""

    def __init__(
        self, model: Transformer, prompts: list[list[int]], sampling: SamplingConfig, compile: bool = False
    ):
        if not prompts:
            raise FucinaError("generate needs at least one prompt")
        context = model.config.context_length
        for index, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise FucinaError(f"prompt {index} is empty: give at least one token (e.g. BOS)")
            if len(prompt) > context:
                raise FucinaError(
                    f"prompt {index} has {len(prompt)} tokens but the model's context is {context}"
                )
            if min(prompt) < 0 or max(prompt) >= model.config.vocab_size:
                raise FucinaError(
                    f"prompt {index} holds token ids outside the model's vocabulary 0..{model.config.vocab_size - 1}"
                )
        self.model = model
        self.sampling = sampling
        device = model.token_embedding.weight.device
        pack_linears(model)  # on CPU; elsewhere it drops copies left from an earlier CPU generation
        lengths = [len(p) for p in prompts]
        longest = max(lengths)
        pad_lengths = [longest - n for n in lengths]
        # Each row may produce tokens until its own sequence fills the context.
        self.budgets = [min(sampling.max_new_tokens, context - n) for n in lengths]
        self.steps = max(self.budgets)
        self.budget_tensor = torch.tensor(self.budgets, device=device)
        ids = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, pad_lengths[row] :] = torch.tensor(prompt, dtype=torch.long)
        self.prompt_ids = ids.to(device)
        max_length = longest + max(self.steps - 1, 0)
        self.compiled_step = compiled_step(model) if compile else None
        if self.compiled_step is not None:  # few distinct shapes, so few compilations
            limit = context + max(pad_lengths)
            max_length = min(limit, max(_SMALLEST_BUCKET, 1 << (max_length - 1).bit_length()))
        self.cache: KVCache = model.new_cache(len(prompts), max_length=max_length, pad_lengths=pad_lengths)
        self.seen = None
        if sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros((len(prompts), model.config.vocab_size), dtype=torch.bool, device=device)
            for row, prompt in enumerate(prompts):
                self.seen[row, torch.tensor(prompt, device=device)] = True
        self.generator = None
        if sampling.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(sampling.seed)
        # Without stop tokens rows end only when their budget runs out, which the host knows already.
        self.stop_ids = (
            torch.tensor(sampling.stop_token_ids, dtype=torch.long, device=device)
            if sampling.stop_token_ids
            else None
        )
        self.running = self.budget_tensor > 0
        self.produced = 0

    def step(self, previous: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed the prompt (first call) or the previous tokens; return (next tokens (B,), emitted (B,))."""
        if previous is None:
            logits = self.model(self.prompt_ids, self.cache, last_only=True)[:, -1]  # (B, vocab)
        elif self.compiled_step is None:
            logits = self.model(previous.unsqueeze(1), self.cache, last_only=True)[:, -1]
        else:
            slot = torch.tensor(self.cache.length, device=previous.device)
            logits = self.compiled_step(previous.unsqueeze(1), self.cache, last_only=True, slot=slot)[:, -1]
            self.cache.length += 1
        tokens = choose_next_tokens(logits, self.sampling, self.seen, self.generator)
        if self.seen is not None:
            self.seen[torch.arange(tokens.size(0), device=tokens.device), tokens] = True
        emitted = self.running
        if self.stop_ids is not None:
            emitted = emitted & ~torch.isin(tokens, self.stop_ids)  # a stop token is not output
        self.produced += 1
        self.running = emitted & (self.budget_tensor > self.produced)
        return tokens, emitted


def compiled_step(model: Transformer) -> Callable | None:
    """torch.compile of the model's forward for fixed-shape one-token steps (one per model, reused).

    None, with a warning, when a mixer cannot decode at fixed shapes.
    """
    unsupported = sorted(
        {type(b.mixer).__name__ for b in model.blocks if not getattr(b.mixer, "fixed_shape_decoding", False)}
    )
    if unsupported:
        log.warning("compiled decoding does not support %s layers: decoding eagerly", ", ".join(unsupported))
        return None
    if model not in _compiled_steps:
        _compiled_steps[model] = torch.compile(model.forward, dynamic=False)
    return _compiled_steps[model]


def _steps(
    model: Transformer,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    check_every: int = 1,
    compile: bool = False,
) -> Iterator[tuple]:
    """Yield (tokens, emitted) per step until every row has finished (checked every `check_every`)."""
    with torch.inference_mode():
        decoding = _Decoding(model, prompts, sampling, compile)
    tokens = None
    for step in range(decoding.steps):
        # Entered per step: the caller's code between yields runs normally.
        with torch.inference_mode(), packed_decoding():
            tokens, emitted = decoding.step(tokens)
        yield tokens, emitted
        stoppable = decoding.stop_ids is not None  # else every row runs to its budget: no check needed
        if stoppable and (step + 1) % check_every == 0 and not bool(decoding.running.any()):
            return


def generate(
    model: Transformer,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    check_every: int | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """The new tokens for each prompt (stop tokens excluded), generated as one left-padded batch.

    `check_every`: steps between "has every row finished?" checks (default 1 on CPU, 8 on GPU).
    `compile`: run the one-token steps through torch.compile (see the module docstring).
    """
    was_training = model.training
    model.eval()
    if check_every is None:
        # On a GPU, asking after every token would make the host wait for the device each step;
        # checking every few steps lets it queue work ahead (rows that stopped are trimmed below).
        check_every = 1 if model.token_embedding.weight.device.type == "cpu" else 8
    try:
        columns = list(_steps(model, prompts, sampling, check_every, compile))
    finally:
        model.train(was_training)
    outputs: list[list[int]] = [[] for _ in prompts]
    if not columns:
        return outputs
    tokens = torch.stack([t for t, _ in columns], dim=1).tolist()  # (B, steps)
    emitted = torch.stack([e for _, e in columns], dim=1).tolist()
    for row in range(len(prompts)):
        for token, keep in zip(tokens[row], emitted[row]):
            if not keep:
                break
            outputs[row].append(token)
    return outputs


def stream(
    model: Transformer, prompt: list[int], sampling: SamplingConfig, compile: bool = False
) -> Iterator[int]:
    """Yield the new token ids of one prompt as they are produced (stop token excluded)."""
    was_training = model.training
    model.eval()
    try:
        for tokens, emitted in _steps(model, [prompt], sampling, compile=compile):
            if not bool(emitted[0]):
                return
            yield int(tokens[0])
    finally:
        model.train(was_training)
