"""The data of one training stage: tokenizer, training batches in a reproducible order, validation.

Design choices:
- The order of training examples is a pure function of (seed, epoch): pretraining windows follow
  `numpy.random.default_rng([seed, epoch]).permutation`, SFT batches follow the length-grouped sampler
  with `set_epoch(epoch)`. The position in the data is just `(epoch, index)`, which the checkpoint stores,
  so a resumed run sees exactly the batches an uninterrupted one would (no sampler state to pickle).
- Pretraining draws batches from an endless stream of windows: when an epoch's permutation runs out
  the batch continues with the next epoch's, so every batch has the same shape and no window is skipped.
- Sources: `builtin` (the built-in prose for pretraining, the built-in conversations for SFT),
  `builtin:prose`, `builtin:chat`, files or directories (.txt/.jsonl, optionally .xz/.gz) and `hf:NAME`.
- `data.exclude` names held-out split lists (shared/data/splits.json): their records are skipped by
  every read of the run, tokenizer training included (see exclusions.py).
- Pretraining text is packed once into `<run>/data/` (memory-mapped shards + meta.json, written
  atomically by `pack_corpus`); a resumed run reuses it after checking it was made by this tokenizer.
- Bits per byte: pretraining uses the UTF-8 bytes per token of the validation split (from meta.json);
  SFT counts the bytes of the supervised tokens themselves (assistant text; special tokens count 0).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from fucina.data.packing import META_FILE, TokenShards, check_tokenizer, pack_corpus
from fucina.data.readers import ReadStats, iter_conversations, iter_texts
from fucina.data.sources import check_sources, iter_filtered, load_exclusions
from fucina.errors import DataError, TokenizerError
from fucina.tokenizer import FucinaTokenizer, train_tokenizer
from fucina.train.config import BUILTIN_SOURCE, TrainConfig, is_path_source
from fucina.train.objectives import IGNORE_INDEX

log = logging.getLogger(__name__)

PACKED_DIR = "data"
PACKED_VAL_DIR = "data-val"
Batch = dict[str, torch.Tensor]


@dataclass
class DataPosition:
    """Where the next training example comes from: the epoch and the index in that epoch's order."""

    epoch: int = 0
    index: int = 0


def expand_sources(sources: list[str], stage: str) -> list[str | Path]:
    """Config sources as reader inputs: `builtin` names become the packaged corpus files."""
    expanded: list[str | Path] = []
    for source in sources:
        if source == BUILTIN_SOURCE:
            source = f"{BUILTIN_SOURCE}:{'prose' if stage == 'pretrain' else 'chat'}"
        if source == f"{BUILTIN_SOURCE}:prose":
            from fucina.resources import builtin_prose_files

            expanded.extend(builtin_prose_files())
        elif source == f"{BUILTIN_SOURCE}:chat":
            from fucina.resources import builtin_chat_file

            expanded.append(builtin_chat_file())
        elif source.startswith(f"{BUILTIN_SOURCE}:"):
            raise DataError(f"unknown built-in corpus {source!r}; use builtin, builtin:prose or builtin:chat")
        else:
            expanded.append(source)
    return expanded


def read_records(
    sources: list[str], stage: str, config: TrainConfig, kind: str, stats: ReadStats
) -> Iterator:
    """Texts (kind "text") or conversations of `sources`, minus the held-out records of data.exclude."""
    reader = iter_texts if kind == "text" else iter_conversations
    inputs = expand_sources(sources, stage)
    if not config.data.exclude:
        yield from reader(inputs, skip_bad=config.data.skip_bad, stats=stats)
        return
    exclusions = load_exclusions(config.data.exclude)
    check_sources(inputs, exclusions)
    for source in inputs:
        held_out = exclusions.get(Path(source).resolve()) if isinstance(source, str | Path) else None
        if held_out is None or (isinstance(source, str) and not is_path_source(source)):
            yield from reader([source], skip_bad=config.data.skip_bad, stats=stats)
        else:
            yield from iter_filtered(Path(source), held_out, kind, config.data.skip_bad, stats)


def read_texts(sources: list[str], stage: str, config: TrainConfig) -> Iterator[str]:
    """Documents of `sources`, at most data.max_documents of them; bad records per data.skip_bad."""
    return islice(read_records(sources, stage, config, "text", ReadStats()), config.data.max_documents)


def prepare_tokenizer(
    config: TrainConfig, run_dir: Path, inherited: FucinaTokenizer | None
) -> FucinaTokenizer:
    """The run's tokenizer (saved in the run directory): reused, loaded, inherited or trained."""
    if (run_dir / "tokenizer.json").is_file():
        tokenizer = FucinaTokenizer.load(run_dir)
        if inherited is not None and inherited.backend.to_str() != tokenizer.backend.to_str():
            raise TokenizerError(
                f"{run_dir / 'tokenizer.json'} differs from the tokenizer of {config.init_from}; "
                "use a new run directory"
            )
        return tokenizer
    section = config.tokenizer
    if inherited is not None:
        tokenizer = inherited
    elif section.path is not None:
        tokenizer = FucinaTokenizer.load(section.path)
    else:
        sources = section.inputs or config.data.train
        log.info("training a %d-token %s tokenizer on %s", section.vocab_size, section.template, sources)
        tokenizer = train_tokenizer(
            read_texts(sources, config.stage, config),
            vocab_size=section.vocab_size,
            template=section.template,
            pretokenizer=section.pretokenizer,
            min_frequency=section.min_frequency,
            show_progress=False,
        )
    tokenizer.save(run_dir)
    return tokenizer


# --- pretraining -------------------------------------------------------------------------------------


class PretrainBatches:
    """Training batches of packed windows, in a (seed, epoch)-determined order."""

    def __init__(self, shards: TokenShards, context_length: int, batch_size: int, seed: int):
        self.shards, self.context_length, self.batch_size, self.seed = (
            shards,
            context_length,
            batch_size,
            seed,
        )
        self.num_windows = shards.num_windows(context_length)
        if self.num_windows == 0:
            raise DataError(
                f"too little training text: {shards.num_tokens} tokens cannot fill one window of "
                f"{context_length + 1}",
                shards.directory,
            )
        self._order: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_windows))
        return self._order[1]

    @property
    def batches_per_epoch(self) -> float:
        return self.num_windows / self.batch_size

    def epochs_done(self, position: DataPosition) -> float:
        return position.epoch + position.index / self.num_windows

    def next_batch(self, position: DataPosition) -> tuple[Batch, DataPosition]:
        indices: list[int] = []
        epoch, index = position.epoch, position.index
        while len(indices) < self.batch_size:
            order = self.epoch_order(epoch)
            take = order[index : index + self.batch_size - len(indices)]
            indices.extend(int(i) for i in take)
            index += len(take)
            if index >= self.num_windows:
                epoch, index = epoch + 1, 0
        return self.shards.batch(indices, self.context_length), DataPosition(epoch, index)


class PretrainValidation:
    """Validation windows in file order; bytes per token from the split's meta data."""

    def __init__(self, splits: list[TokenShards], context_length: int, batch_size: int):
        self.splits, self.context_length, self.batch_size = splits, context_length, batch_size
        tokens = sum(s.num_tokens for s in splits)
        self.bytes_per_token = sum(s.num_bytes for s in splits) / max(tokens, 1)
        if sum(s.num_windows(context_length) for s in splits) == 0:
            raise DataError(
                f"validation split too small: {tokens} tokens cannot fill one window of {context_length + 1} "
                "(raise data.val_fraction or give more text)"
            )

    def batches(self, max_batches: int | None) -> Iterator[tuple[Batch, float]]:
        produced = 0
        for shards in self.splits:
            count = shards.num_windows(self.context_length)
            for start in range(0, count, self.batch_size):
                if max_batches is not None and produced >= max_batches:
                    return
                batch = shards.batch(range(start, min(start + self.batch_size, count)), self.context_length)
                produced += 1
                yield batch, batch["labels"].numel() * self.bytes_per_token


def _packed(
    texts: Iterator[str],
    tokenizer: FucinaTokenizer,
    directory: Path,
    config: TrainConfig,
    val_fraction: float,
    min_val_docs: int,
) -> Path:
    if (directory / META_FILE).is_file():
        check_tokenizer(directory, tokenizer)
        log.info("reusing the packed data in %s", directory)
        return directory
    pack_corpus(
        texts,
        tokenizer,
        directory,
        val_fraction=val_fraction,
        min_val_docs=min_val_docs,
        seed=config.train.seed,
    )
    return directory


# --- chat fine-tuning ----------------------------------------------------------------------------------


def _split_conversations(conversations: list, config: TrainConfig) -> tuple[list, list]:
    """Held-out conversations chosen by a seeded permutation (same rule as pack_corpus's documents)."""
    n = len(conversations)
    if n < 2:
        raise DataError(f"need at least 2 conversations (one to train on, one to validate), got {n}")
    k = round(config.data.val_fraction * n)
    if n >= 2 * config.data.min_val_docs:
        k = max(k, config.data.min_val_docs)
    k = min(max(k, 1), n - 1)
    held_out = set(np.random.default_rng([config.train.seed, 1]).permutation(n)[:k].tolist())
    train = [c for i, c in enumerate(conversations) if i not in held_out]
    val = [c for i, c in enumerate(conversations) if i in held_out]
    return train, val


def _supervised_bytes(tokenizer: FucinaTokenizer, labels: list[int]) -> int:
    return sum(
        len(tokenizer.token_bytes(t)) for t in labels if t != IGNORE_INDEX and t not in tokenizer.special_ids
    )


class SFTBatches:
    """Training batches of conversations, length-grouped, in a (seed, epoch)-determined order."""

    def __init__(self, dataset, batch_size: int, seed: int, pad_id: int):
        from fucina.data.sft import LengthGroupedSampler

        self.dataset, self.batch_size, self.pad_id = dataset, batch_size, pad_id
        if len(dataset) == 0:
            raise DataError("no training conversation has a supervised token (all too long or empty?)")
        self.sampler = LengthGroupedSampler(dataset.lengths, batch_size, seed)
        self._order: tuple[int, list[list[int]]] | None = None

    def epoch_order(self, epoch: int) -> list[list[int]]:
        if self._order is None or self._order[0] != epoch:
            self.sampler.set_epoch(epoch)
            indices = [int(i) for i in self.sampler]
            batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
            self._order = (epoch, batches)
        return self._order[1]

    @property
    def batches_per_epoch(self) -> float:
        return float(len(self.epoch_order(0)))

    def epochs_done(self, position: DataPosition) -> float:
        return position.epoch + position.index / len(self.epoch_order(position.epoch))

    def next_batch(self, position: DataPosition) -> tuple[Batch, DataPosition]:
        from fucina.data.sft import collate_batch

        batches = self.epoch_order(position.epoch)
        indices = batches[position.index]
        index = position.index + 1
        next_position = (
            DataPosition(position.epoch + 1, 0)
            if index >= len(batches)
            else DataPosition(position.epoch, index)
        )
        return collate_batch([self.dataset[i] for i in indices], self.pad_id), next_position


class SFTValidation:
    """Validation conversations, shortest first (less padding); bytes = supervised text."""

    def __init__(self, dataset, tokenizer: FucinaTokenizer, batch_size: int, pad_id: int):
        self.dataset, self.batch_size, self.pad_id = dataset, batch_size, pad_id
        if len(dataset) == 0:
            raise DataError("no validation conversation has a supervised token")
        self.order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))
        self.bytes = [_supervised_bytes(tokenizer, dataset[i]["labels"]) for i in range(len(dataset))]

    def batches(self, max_batches: int | None) -> Iterator[tuple[Batch, float]]:
        from fucina.data.sft import collate_batch

        for number, start in enumerate(range(0, len(self.order), self.batch_size)):
            if max_batches is not None and number >= max_batches:
                return
            indices = self.order[start : start + self.batch_size]
            yield (
                collate_batch([self.dataset[i] for i in indices], self.pad_id),
                float(sum(self.bytes[i] for i in indices)),
            )


# --- assembly ------------------------------------------------------------------------------------------


@dataclass
class StageData:
    """What the loop consumes: reproducible training batches and validation batches with byte counts."""

    train: PretrainBatches | SFTBatches
    val: PretrainValidation | SFTValidation
    summary: str


def prepare_stage_data(
    config: TrainConfig, run_dir: Path, tokenizer: FucinaTokenizer, context_length: int
) -> StageData:
    """Read, tokenize and split the stage's data (packing pretraining text into <run>/data once)."""
    eval_batch = config.eval.batch_size or config.train.batch_size
    if config.stage == "pretrain":
        train_dir = _packed(
            read_texts(config.data.train, "pretrain", config),
            tokenizer,
            run_dir / PACKED_DIR,
            config,
            config.data.val_fraction,
            config.data.min_val_docs,
        )
        train = TokenShards(train_dir, "train", tokenizer)
        if config.data.val:
            val_dir = _packed(
                read_texts(config.data.val, "pretrain", config),
                tokenizer,
                run_dir / PACKED_VAL_DIR,
                config,
                0.0,
                0,
            )
            val_splits = [TokenShards(val_dir, "train", tokenizer), TokenShards(val_dir, "val", tokenizer)]
        else:
            val_splits = [TokenShards(train_dir, "val", tokenizer)]
        batches = PretrainBatches(train, context_length, config.train.batch_size, config.train.seed)
        val = PretrainValidation(val_splits, context_length, eval_batch)
        summary = (
            f"{train.num_tokens:,} training tokens ({batches.num_windows:,} windows of {context_length}), "
            f"{sum(s.num_tokens for s in val_splits):,} validation tokens"
        )
        return StageData(batches, val, summary)

    from fucina.data.sft import SFTDataset

    if tokenizer.pad_id is None:
        raise TokenizerError(f"the {tokenizer.template.name!r} tokenizer has no pad token, needed for SFT")
    stats = ReadStats()
    conversations = list(
        islice(
            read_records(config.data.train, "sft", config, "conversation", stats), config.data.max_documents
        )
    )
    if config.data.val:
        train_convs = conversations
        val_convs = list(read_records(config.data.val, "sft", config, "conversation", stats))
    else:
        train_convs, val_convs = _split_conversations(conversations, config)
    train_set = SFTDataset(train_convs, tokenizer, context_length, train_on=config.data.train_on)
    val_set = SFTDataset(val_convs, tokenizer, context_length, train_on=config.data.train_on)
    for name, dataset in (("training", train_set), ("validation", val_set)):
        if dataset.dropped:
            log.warning(
                "%d %s conversation(s) dropped: no assistant token left within %d tokens",
                dataset.dropped,
                name,
                context_length,
            )
    batches = SFTBatches(train_set, config.train.batch_size, config.train.seed, tokenizer.pad_id)
    val = SFTValidation(val_set, tokenizer, eval_batch, tokenizer.pad_id)
    summary = (
        f"{len(train_set):,} training conversations ({sum(train_set.lengths):,} tokens), "
        f"{len(val_set):,} validation conversations"
    )
    return StageData(batches, val, summary)


def epochs_to_steps(epochs: float, batches_per_epoch: float, grad_accum: int) -> int:
    """Optimizer steps that cover `epochs` passes over the training data (at least 1)."""
    return max(1, math.ceil(epochs * batches_per_epoch / grad_accum))
