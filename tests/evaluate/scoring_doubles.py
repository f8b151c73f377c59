"""Stand-ins for the MODEL only (the scorers under test are real): tiny modules with the Transformer
call signature `model(input_ids) -> logits (B, T, V)` and a `.config` with context_length, vocab_size."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DoubleConfig:
    vocab_size: int
    context_length: int


class UniformModel(nn.Module):
    """Equal logits for every token: each target costs exactly ln(vocab_size) nats."""

    def __init__(self, vocab_size: int, context_length: int):
        super().__init__()
        self.config = DoubleConfig(vocab_size, context_length)
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        assert input_ids.shape[1] <= self.config.context_length
        return torch.zeros(*input_ids.shape, self.config.vocab_size) + self.anchor


class BigramModel(nn.Module):
    """Logits depend only on the current token (a random table): scores need no earlier context."""

    def __init__(self, vocab_size: int, context_length: int, seed: int = 0):
        super().__init__()
        self.config = DoubleConfig(vocab_size, context_length)
        generator = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab_size, vocab_size, generator=generator))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        assert input_ids.shape[1] <= self.config.context_length
        return self.table[input_ids]  # (B, T, V)

    def logprob(self, ids: list[int]) -> float:
        """Summed log-probability of ids[1:] given the previous token, computed directly."""
        logprobs = torch.log_softmax(self.table.detach().double(), dim=-1)
        return float(sum(logprobs[a, b] for a, b in zip(ids[:-1], ids[1:], strict=True)))


class PreferringModel(nn.Module):
    """Puts a large logit on a fixed set of token ids at every position, whatever the input."""

    def __init__(self, vocab_size: int, context_length: int, preferred: Iterable[int], boost: float = 20.0):
        super().__init__()
        self.config = DoubleConfig(vocab_size, context_length)
        bias = torch.zeros(vocab_size)
        bias[list(preferred)] = boost
        self.bias = nn.Parameter(bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        assert input_ids.shape[1] <= self.config.context_length
        return self.bias.expand(*input_ids.shape, -1)
