"""Chat fine-tuning data: conversations -> (input_ids, shifted labels) examples, padded batches, a sampler.

Design choices, and why:
- The chat template decides which tokens are trained on (`ChatTemplate.encode` gives the assistant mask,
  built from segments, never by searching strings). Here the mask only turns into labels, already
  shifted: labels[t] = ids[t + 1] when token t + 1 is trained on, else -100 (the batch convention).
- Long conversations are cut at context_length from the right (the beginning is kept: system prompt and
  first turns). An example left with no supervised label would add nothing but a 0/0 to the loss, so it
  is dropped and counted in `dropped`; every kept example has at least one label.
- Batches are padded dynamically, to the longest example in the batch (right padding, labels -100 on
  padding), never to context_length: with `LengthGroupedSampler`, which sorts random "megabatches" of
  50 batches by length as Hugging Face's trainer does, little compute goes to padding.
- Ids are stored as int32 arrays (a large chat corpus as Python lists would take ~10x the memory).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from fucina.chat_template import TRAIN_ON_CHOICES
from fucina.errors import ConfigError, DataError

if TYPE_CHECKING:
    from fucina.tokenizer import FucinaTokenizer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
MEGABATCH_BATCHES = 50


def shifted_labels(input_ids: Sequence[int], assistant_mask: Sequence[bool]) -> tuple[list[int], list[int]]:
    """(inputs, labels) of one encoded conversation: inputs = ids[:-1], labels[t] = ids[t+1] or -100."""
    inputs = list(input_ids[:-1])
    labels = [token if trained else IGNORE_INDEX for token, trained in zip(input_ids[1:], assistant_mask[1:])]
    return inputs, labels


class SFTDataset(Dataset):
    """Encoded conversations, truncated to context_length, each with at least one supervised label."""

    def __init__(
        self,
        conversations: Sequence[Sequence[Mapping]],
        tokenizer: FucinaTokenizer,
        context_length: int,
        train_on: str = "all",
    ):
        if context_length < 1:
            raise ConfigError(f"context_length must be >= 1, got {context_length}")
        if train_on not in TRAIN_ON_CHOICES:
            raise ConfigError(f"train_on must be one of {', '.join(TRAIN_ON_CHOICES)}, got {train_on!r}")
        self.context_length = context_length
        self.train_on = train_on
        self.dropped = 0
        self.truncated = 0
        self.source_indices: list[int] = []  # position of each kept example in `conversations`
        self._inputs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        for index, messages in enumerate(conversations):
            try:
                encoded = tokenizer.template.encode(tokenizer, messages, train_on)
            except DataError as err:
                raise DataError(f"conversation {index}: {err}") from err
            inputs, labels = shifted_labels(encoded.input_ids, encoded.assistant_mask)
            if len(inputs) > context_length:
                self.truncated += 1
                inputs, labels = inputs[:context_length], labels[:context_length]
            if all(label == IGNORE_INDEX for label in labels):
                self.dropped += 1
                continue
            self.source_indices.append(index)
            self._inputs.append(np.asarray(inputs, dtype=np.int32))
            self._labels.append(np.asarray(labels, dtype=np.int32))
        self.lengths: list[int] = [len(ids) for ids in self._inputs]
        if self.dropped:
            logger.warning(
                "dropped %d of %d conversations with no assistant token within context_length=%d",
                self.dropped,
                len(conversations),
                context_length,
            )
        if self.truncated:
            logger.info("truncated %d conversations to context_length=%d", self.truncated, context_length)
        if not self._inputs:
            raise DataError(
                f"no usable conversation: all {len(conversations)} lack an assistant token within "
                f"context_length={context_length}"
            )

    def __len__(self) -> int:
        return len(self._inputs)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"input_ids": self._inputs[index].tolist(), "labels": self._labels[index].tolist()}

    @property
    def supervised_tokens(self) -> int:
        """How many labels are trained on, over the whole dataset."""
        return int(sum((labels != IGNORE_INDEX).sum() for labels in self._labels))


def collate_batch(examples: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one: input_ids with pad_id, labels with -100."""
    if not examples:
        raise ValueError("collate_batch needs at least one example")
    longest = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        if len(example["labels"]) != length:
            raise ValueError(f"example {row}: {length} input ids but {len(example['labels'])} labels")
        input_ids[row, :length] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        labels[row, :length] = torch.as_tensor(example["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels}


class LengthGroupedSampler(Sampler[int]):
    """Random order in which consecutive batch_size indices have similar lengths (set_epoch reshuffles).

    As in Hugging Face's trainer: shuffle all indices, cut them into megabatches of 50 batches, sort each
    megabatch by length (longest first), and move the longest example to the very front so that running
    out of memory shows on the first step, not hours later.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        if not self.lengths:
            return iter(())
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = max(min(len(self.lengths) // (4 * self.batch_size), MEGABATCH_BATCHES), 1) * self.batch_size
        megabatches = [
            sorted(order[start : start + size], key=lambda i: self.lengths[i], reverse=True)
            for start in range(0, len(order), size)
        ]
        longest = max(range(len(megabatches)), key=lambda m: self.lengths[megabatches[m][0]])
        megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
        return iter([index for megabatch in megabatches for index in megabatch])
