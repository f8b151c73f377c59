"""Intrinsic metrics: loss, perplexity and bits per byte of a model on held-out text or chat.

Design choices, and why:
- Bits per byte is the headline number because it does not depend on the tokenizer: the total negative
  log-likelihood (nats) of the scored tokens / ln 2 / the UTF-8 bytes of the text those tokens encode.
  Two models with different vocabularies compare on it; loss and perplexity are per token and do not.
- Plain documents are scored the way pretraining sees them: each document is tokenized and followed by
  EOS, and the stream starts with an EOS too, so the first token of every document (the very first one
  included) is predicted after an EOS. Every token of the stream except that leading EOS is scored,
  the EOS after each document included (ending a document is part of modelling it); the byte count is
  the UTF-8 bytes of the documents (EOS encodes no text).
- The stream is cut into windows of the model's context length with a stride (default: the context
  length, i.e. no overlap). The first token of each window is context only: it was already scored as
  the last target of the previous window. With a smaller stride a window re-reads `context - stride`
  tokens as context and scores only the `stride` targets no earlier window scored, so every token is
  scored exactly once and, after the first window, with at least `context - stride` tokens before it.
- Chat data (JSONL with "messages") is scored on assistant tokens only, with the mask of the model's own
  chat template (`tokenizer.template.encode`): assistant content and its end marker. Each conversation
  is its own sequence (windows never cross conversations); the bytes are those of the decoded
  supervised tokens (the end markers decode to nothing).
- Windows are sorted by length and right-padded per batch; the sums are order-independent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from fucina.data.readers import iter_conversations, iter_texts
from fucina.errors import ConfigError, DataError, TokenizerError
from fucina.evaluate.heldout import iter_jsonl_records
from fucina.evaluate.runtime import context_length_of, scoring_mode, summed_target_logprobs
from fucina.tokenizer import FucinaTokenizer


@dataclass
class IntrinsicResult:
    """Summed negative log-likelihood of the scored tokens, and what it was measured on."""

    name: str
    documents: int
    tokens: int  # scored tokens
    bytes: int  # UTF-8 bytes of the text the scored tokens encode
    nll_nats: float
    context_length: int
    stride: int

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per scored token, in nats."""
        return self.nll_nats / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats / math.log(2) / max(self.bytes, 1)

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


@dataclass
class _Sequence:
    """Token ids and, per target (token i + 1 is the target of position i), whether it is scored."""

    ids: np.ndarray  # (n,) int64
    scored: np.ndarray  # (n - 1,) bool


def _windows(length: int, context_length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first_new) per window: targets begin..end-1, of which those >= first_new are new."""
    begin, done = 0, 0
    while True:
        end = min(begin + context_length, length - 1)
        yield begin, end, done
        if end >= length - 1:
            return
        done = end
        begin += stride


def _checked_stride(stride: int | None, context_length: int) -> int:
    stride = context_length if stride is None else stride
    if not 1 <= stride <= context_length:
        raise ConfigError(f"stride must be between 1 and the context length {context_length}, got {stride}")
    return stride


def _score_sequences(
    model: nn.Module,
    sequences: Sequence[_Sequence],
    stride: int | None,
    batch_size: int,
    bf16: bool,
    show_progress: bool,
    desc: str,
) -> tuple[float, int, int]:
    """Summed NLL (nats), scored tokens and the stride used, over all windows of all sequences."""
    context_length = context_length_of(model)
    stride = _checked_stride(stride, context_length)
    windows = [
        (index, begin, end, first_new)
        for index, sequence in enumerate(sequences)
        if len(sequence.ids) > 1
        for begin, end, first_new in _windows(len(sequence.ids), context_length, stride)
    ]
    windows.sort(key=lambda w: w[2] - w[1], reverse=True)
    nll, tokens = 0.0, 0
    with scoring_mode(model, bf16) as device:
        for start in tqdm(
            range(0, len(windows), batch_size), desc=desc, unit="batch", disable=not show_progress
        ):
            rows, flags = [], []
            for index, begin, end, first_new in windows[start : start + batch_size]:
                sequence = sequences[index]
                rows.append(sequence.ids[begin : end + 1].tolist())
                new = np.arange(begin, end) >= first_new
                flags.append((sequence.scored[begin:end] & new).tolist())
            sums, counts = summed_target_logprobs(model, rows, flags, pad_id=0, device=device)
            nll -= sum(sums)
            tokens += sum(counts)
    return nll, tokens, stride


def _eos_id(tokenizer: FucinaTokenizer) -> int:
    if tokenizer.eos_id is None:
        raise TokenizerError("the tokenizer has no EOS token; documents cannot be separated")
    return tokenizer.eos_id


def evaluate_texts(
    model: nn.Module,
    tokenizer: FucinaTokenizer,
    texts: Iterable[str],
    *,
    name: str = "texts",
    stride: int | None = None,
    batch_size: int = 32,
    bf16: bool = False,
    show_progress: bool = True,
) -> IntrinsicResult:
    """Loss, perplexity and bits per byte of `model` on plain documents (see the module doc)."""
    eos = _eos_id(tokenizer)
    pieces: list[list[int]] = [[eos]]
    documents = num_bytes = 0
    for text in texts:
        pieces.append(tokenizer.encode(text))
        pieces.append([eos])
        documents += 1
        num_bytes += len(text.encode("utf-8"))
    if documents == 0:
        raise DataError(f"{name}: no documents to score")
    ids = np.fromiter((i for piece in pieces for i in piece), dtype=np.int64)
    stream = _Sequence(ids, np.ones(len(ids) - 1, dtype=bool))
    nll, tokens, stride = _score_sequences(model, [stream], stride, batch_size, bf16, show_progress, name)
    return IntrinsicResult(name, documents, tokens, num_bytes, nll, context_length_of(model), stride)


def _supervised_bytes(tokenizer: FucinaTokenizer, ids: list[int], mask: list[bool]) -> int:
    """UTF-8 bytes of the decoded supervised tokens, decoded run by run (a run is one assistant turn)."""
    total, run = 0, []
    for token, trained in zip([*ids, -1], [*mask, False], strict=True):
        if trained:
            run.append(token)
        elif run:
            total += len(tokenizer.decode(run, skip_special_tokens=True).encode("utf-8"))
            run = []
    return total


def evaluate_conversations(
    model: nn.Module,
    tokenizer: FucinaTokenizer,
    conversations: Iterable[list[dict]],
    *,
    name: str = "chat",
    train_on: str = "all",
    stride: int | None = None,
    batch_size: int = 32,
    bf16: bool = False,
    show_progress: bool = True,
) -> IntrinsicResult:
    """Loss, perplexity and bits per byte on the assistant tokens of chat conversations."""
    sequences, num_bytes = [], 0
    for messages in conversations:
        encoded = tokenizer.template.encode(tokenizer, messages, train_on=train_on)
        ids = np.asarray(encoded.input_ids, dtype=np.int64)
        sequences.append(_Sequence(ids, np.asarray(encoded.assistant_mask[1:], dtype=bool)))
        num_bytes += _supervised_bytes(tokenizer, encoded.input_ids, encoded.assistant_mask)
    if not sequences:
        raise DataError(f"{name}: no conversations to score")
    nll, tokens, stride = _score_sequences(model, sequences, stride, batch_size, bf16, show_progress, name)
    return IntrinsicResult(name, len(sequences), tokens, num_bytes, nll, context_length_of(model), stride)


def is_chat_file(path: str | Path) -> bool:
    """Whether a JSONL file holds conversations (its first record has "messages")."""
    name = Path(path).name.lower()
    if ".jsonl" not in name:
        return False
    for _, record in iter_jsonl_records(path):
        return "messages" in record
    return False


def evaluate_file(
    model: nn.Module,
    tokenizer: FucinaTokenizer,
    path: str | Path,
    *,
    limit: int | None = None,
    **options,
) -> IntrinsicResult:
    """Intrinsic metrics on a .txt/.jsonl file (optionally .xz/.gz): chat files on assistant tokens only.

    `limit` keeps the first N documents (conversations). `options` go to `evaluate_texts` /
    `evaluate_conversations` (stride, batch_size, bf16, show_progress).
    """
    name = options.pop("name", Path(path).name)
    if is_chat_file(path):
        conversations = _first(iter_conversations(path), limit)
        return evaluate_conversations(model, tokenizer, conversations, name=name, **options)
    return evaluate_texts(model, tokenizer, _first(iter_texts(path), limit), name=name, **options)


def _first(items: Iterable, limit: int | None) -> Iterator:
    for count, item in enumerate(items):
        if limit is not None and count >= limit:
            return
        yield item
