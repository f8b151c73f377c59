"""How to pick each next token from the model's logits.

Design choices:
- Hugging Face's order: repetition penalty (over prompt and generated tokens) -> temperature -> top-k ->
  top-p -> draw. `greedy` (or temperature 0) takes the argmax instead.
- Randomness comes from a torch.Generator the caller seeds (the engine keeps one per request, seeded
  with its `seed`), so a seeded request repeats exactly; without one torch's global generator is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fucina.errors import ConfigError


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
