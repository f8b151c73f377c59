"""The data of one training stage: tokenizer, training batches in a reproducible order, validation.

Design choices:
- The order of training examples is a pure function of (seed, epoch): pretraining windows follow
  `numpy.random.default_rng([seed, epoch]).permutation`, SFT batches follow the length-grouped sampler
  with `set_epoch(epoch)`. The position in the data is just `(epoch, index)`, which the checkpoint stores,
  so a resumed run sees exactly the batches an uninterrupted one would (no sampler state to pickle).
- Rank-aware: a step's GLOBAL batch is `batch_size x grad_accum x world_size` rows taken in that one
  order, and rank r keeps its contiguous slice (its `grad_accum` micro-batches of `batch_size`). So the
  documents and their order do not depend on how many processes train, the union of the ranks' rows is
  the batch one process would take with the same global size, every rank advances the same position,
  and each rank reads (from the memory-mapped shards, or collates) only its own rows. Validation
  batches are dealt round-robin to the ranks, whose sums add up to the single-process ones.
- Pretraining draws batches from an endless stream of windows: when an epoch's permutation runs out
  the batch continues with the next epoch's, so every batch has the same shape and no window is skipped.
- Sources: `builtin` (the built-in prose for pretraining, the built-in conversations for SFT),
  `builtin:prose`, `builtin:chat`, files or directories (.txt/.jsonl, optionally .xz/.gz) and `hf:NAME`.
- `data.exclude` names held-out split lists (shared/data/splits.json): their records are skipped by
  every read of the run, tokenizer training included (see sources.py).
- Pretraining text is packed once into `<run>/data/` (memory-mapped shards + meta.json, written
  atomically by `pack_corpus`); a resumed run reuses it after checking it was made by this tokenizer.
- Bits per byte: pretraining uses the UTF-8 bytes per token of the validation split (from meta.json);
  SFT counts the bytes of the supervised tokens themselves (assistant text; special tokens count 0).
- Each stage's data builder (`build_pretrain_data`, `build_sft_data`, `build_preference_data`,
  `build_distill_data`) is named by the stage table (train/stages.py); nothing here branches on the
  stage's name. Preference pairs reuse the SFT batching with their own collate (chosen rows, then
  rejected rows); distillation reads text or conversations as `distill.data` says.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fucina.data.curriculum import Curriculum, build_curriculum, split_blocks
from fucina.data.packing import META_FILE, TokenShards, check_tokenizer, pack_corpus
from fucina.data.readers import ReadStats, iter_conversations, iter_texts
from fucina.data.sources import BUILTIN_SOURCE, check_sources, is_path_source, iter_filtered, load_exclusions
from fucina.errors import DataError, TokenizerError
from fucina.model.loss import IGNORE_INDEX
from fucina.tokenizer import TOKENIZER_FILE, FucinaTokenizer, train_tokenizer

if TYPE_CHECKING:  # the data only reads the config's sections; the config never imports the data
    from fucina.train.config import TrainConfig

log = logging.getLogger(__name__)

PACKED_DIR = "data"
PACKED_VAL_DIR = "data-val"
Batch = dict[str, torch.Tensor]
Collate = Callable[[Sequence[Mapping[str, Sequence[int]]], int], Batch]  # (examples, pad id) -> batch


@dataclass
class DataPosition:
    """Where the next training example comes from: the epoch and the index in that epoch's order.

    A data mixture (data/mixture.py) keeps each source's own (epoch, index) in `sources`; `index` then
    counts the blocks drawn so far.
    """

    epoch: int = 0
    index: int = 0
    sources: dict[str, tuple[int, int]] = field(default_factory=dict)


def expand_sources(sources: list[str], builtin: str) -> list[str | Path]:
    """Config sources as reader inputs: `builtin` names become the packaged corpus files.

    `builtin`: which built-in corpus a bare `builtin` source means ("prose" or "chat").
    """
    expanded: list[str | Path] = []
    for source in sources:
        if source == BUILTIN_SOURCE:
            source = f"{BUILTIN_SOURCE}:{builtin}"
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
    sources: list[str], builtin: str, config: TrainConfig, kind: str, stats: ReadStats
) -> Iterator:
    """Texts (kind "text") or conversations of `sources`, minus the held-out records of data.exclude.

    `builtin`: which built-in corpus a bare `builtin` source means ("prose" or "chat").
    """
    reader = iter_texts if kind == "text" else iter_conversations
    inputs = expand_sources(sources, builtin)
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


def read_texts(sources: list[str], builtin: str, config: TrainConfig) -> Iterator[str]:
    """Documents of `sources`, at most data.max_documents of them; bad records per data.skip_bad."""
    return islice(read_records(sources, builtin, config, "text", ReadStats()), config.data.max_documents)


def prepare_tokenizer(
    config: TrainConfig, run_dir: Path, inherited: FucinaTokenizer | None, builtin: str
) -> FucinaTokenizer:
    """The run's tokenizer (saved in the run directory): reused, loaded, inherited or trained.

    `builtin`: the built-in corpus a bare `builtin` source means for this stage ("prose" or "chat").
    """
    if (run_dir / TOKENIZER_FILE).is_file():
        tokenizer = FucinaTokenizer.load(run_dir)
        if inherited is not None and inherited.backend.to_str() != tokenizer.backend.to_str():
            raise TokenizerError(
                f"{run_dir / TOKENIZER_FILE} differs from the tokenizer of {config.init_from}; "
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
            read_texts(sources, builtin, config),
            vocab_size=section.vocab_size,
            template=section.template,
            pretokenizer=section.pretokenizer,
            min_frequency=section.min_frequency,
            show_progress=False,
        )
    tokenizer.save(run_dir)
    return tokenizer


# --- sharding ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataShard:
    """This process's place among the processes of a run: rank in [0, world_size)."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise DataError(f"rank {self.rank} is not in [0, world_size {self.world_size})")

    def slice_of(self, items: list, per_rank: int) -> list:
        """This rank's contiguous share of a step's global list of `per_rank * world_size` items."""
        return items[self.rank * per_rank : (self.rank + 1) * per_rank]

    def owns(self, number: int) -> bool:
        """Round-robin ownership of the `number`-th item of a sequence (validation batches)."""
        return number % self.world_size == self.rank


# --- pretraining -------------------------------------------------------------------------------------


class PretrainBatches:
    """Training steps of packed windows, in a (seed, epoch)-determined order, sharded by rank."""

    def __init__(
        self,
        shards: TokenShards,
        context_length: int,
        batch_size: int,
        seed: int,
        grad_accum: int = 1,
        shard: DataShard = DataShard(),
    ):
        self.shards, self.context_length, self.batch_size, self.seed = (
            shards,
            context_length,
            batch_size,
            seed,
        )
        self.grad_accum, self.shard = grad_accum, shard
        self.num_windows = shards.num_windows(context_length)
        if self.num_windows == 0:
            raise DataError(
                f"too little training text: {shards.num_tokens} tokens cannot fill one window of "
                f"{context_length + 1}",
                shards.directory,
            )
        self._order: tuple[int, np.ndarray] | None = None
        self.curriculum: Curriculum | None = None  # set by `plan` (data.curriculum)

    def plan(self, total_steps: int, curriculum: Sequence[Sequence[float]]) -> None:
        """Fix the run length and the window curriculum (data/curriculum.py), if any."""
        if curriculum:
            self.curriculum = build_curriculum(curriculum, self.context_length, total_steps)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_windows))
        return self._order[1]

    @property
    def batches_per_epoch(self) -> float:
        return self.num_windows / self.batch_size

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches of `batch_size` rows that one optimizer step consumes over all ranks."""
        return self.grad_accum * self.shard.world_size

    def epochs_done(self, position: DataPosition) -> float:
        return position.epoch + position.index / self.num_windows

    def step_windows(self, position: DataPosition) -> tuple[list[int], DataPosition]:
        """The window indices of the global batch of the step starting at `position`, and the next one."""
        indices: list[int] = []
        wanted = self.batch_size * self.micro_batches_per_step
        epoch, index = position.epoch, position.index
        while len(indices) < wanted:
            order = self.epoch_order(epoch)
            take = order[index : index + wanted - len(indices)]
            indices.extend(int(i) for i in take)
            index += len(take)
            if index >= self.num_windows:
                epoch, index = epoch + 1, 0
        return indices, DataPosition(epoch, index)

    def next_step(self, position: DataPosition, step: int = 1) -> tuple[list[Batch], DataPosition]:
        """This rank's `grad_accum` micro-batches of the step starting at `position`, and the next position.

        `step` (1-based) picks the curriculum's window: each window of the full length is then cut into
        full/window rows, so the tokens per step do not change (data/curriculum.py).
        """
        indices, after = self.step_windows(position)
        mine = self.shard.slice_of(indices, self.batch_size * self.grad_accum)
        size = self.batch_size
        window = self.curriculum.window_at(step) if self.curriculum is not None else self.context_length
        if window == self.context_length:
            micro = [
                self.shards.batch(mine[i : i + size], self.context_length) for i in range(0, len(mine), size)
            ]
        else:
            micro = [
                split_blocks([self.shards.window(j, self.context_length) for j in mine[i : i + size]], window)
                for i in range(0, len(mine), size)
            ]
        return micro, after


class PretrainValidation:
    """Validation windows in file order; bytes per token from the split's meta data."""

    def __init__(
        self,
        splits: list[TokenShards],
        context_length: int,
        batch_size: int,
        shard: DataShard = DataShard(),
    ):
        self.splits, self.context_length, self.batch_size, self.shard = (
            splits,
            context_length,
            batch_size,
            shard,
        )
        tokens = sum(s.num_tokens for s in splits)
        self.bytes_per_token = sum(s.num_bytes for s in splits) / max(tokens, 1)
        if sum(s.num_windows(context_length) for s in splits) == 0:
            raise DataError(
                f"validation split too small: {tokens} tokens cannot fill one window of {context_length + 1} "
                "(raise data.val_fraction or give more text)"
            )

    def batches(self, max_batches: int | None) -> Iterator[tuple[Batch, float]]:
        """This rank's share of the first `max_batches` validation batches, with their byte counts."""
        produced = 0
        for shards in self.splits:
            count = shards.num_windows(self.context_length)
            for start in range(0, count, self.batch_size):
                if max_batches is not None and produced >= max_batches:
                    return
                produced += 1
                if not self.shard.owns(produced - 1):
                    continue
                batch = shards.batch(range(start, min(start + self.batch_size, count)), self.context_length)
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
    """Training steps of conversations, length-grouped, in a (seed, epoch)-determined order, by rank.

    The unit of the order is a sampler batch of `batch_size` conversations (grouped by length, so the
    last of an epoch may be smaller); a step takes `grad_accum x world_size` consecutive ones.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        seed: int,
        pad_id: int,
        grad_accum: int = 1,
        shard: DataShard = DataShard(),
        collate: Collate | None = None,
    ):
        from fucina.data.sft import LengthGroupedSampler, collate_batch

        self.dataset, self.batch_size, self.pad_id = dataset, batch_size, pad_id
        self.collate = collate or collate_batch
        self.grad_accum, self.shard = grad_accum, shard
        if len(dataset) == 0:
            raise DataError("no training conversation has a supervised token (all too long or empty?)")
        # Grouped by the GLOBAL batch (every rank's rows of one step), so a step holds the same
        # conversations whatever the number of processes and however a resumed run splits it.
        self.sampler = LengthGroupedSampler(dataset.lengths, batch_size * grad_accum * shard.world_size, seed)
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

    @property
    def micro_batches_per_step(self) -> int:
        """Sampler batches that one optimizer step consumes over all ranks."""
        return self.grad_accum * self.shard.world_size

    def epochs_done(self, position: DataPosition) -> float:
        return position.epoch + position.index / len(self.epoch_order(position.epoch))

    def step_groups(self, position: DataPosition) -> tuple[list[list[int]], DataPosition]:
        """The conversation indices of each micro-batch of the global step at `position`, and the next one."""
        groups: list[list[int]] = []
        epoch, index = position.epoch, position.index
        for _ in range(self.micro_batches_per_step):
            batches = self.epoch_order(epoch)
            groups.append(batches[index])
            index += 1
            if index >= len(batches):
                epoch, index = epoch + 1, 0
        return groups, DataPosition(epoch, index)

    def next_step(self, position: DataPosition, step: int = 1) -> tuple[list[Batch], DataPosition]:
        """This rank's `grad_accum` micro-batches of the step starting at `position`, and the next position.

        `step` is unused: conversations have no window curriculum.
        """
        groups, after = self.step_groups(position)
        mine = self.shard.slice_of(groups, self.grad_accum)
        return [self.collate([self.dataset[i] for i in group], self.pad_id) for group in mine], after


class SFTValidation:
    """Validation conversations, shortest first (less padding); bytes = supervised text."""

    def __init__(
        self,
        dataset,
        tokenizer: FucinaTokenizer,
        batch_size: int,
        pad_id: int,
        shard: DataShard = DataShard(),
        collate: Collate | None = None,
    ):
        from fucina.data.sft import collate_batch

        self.dataset, self.batch_size, self.pad_id, self.shard = dataset, batch_size, pad_id, shard
        self.collate = collate or collate_batch
        if len(dataset) == 0:
            raise DataError("no validation conversation has a supervised token")
        self.order = sorted(range(len(dataset)), key=lambda i: dataset.lengths[i])
        self.bytes = [_supervised_bytes(tokenizer, dataset[i]["labels"]) for i in range(len(dataset))]

    def batches(self, max_batches: int | None) -> Iterator[tuple[Batch, float]]:
        """This rank's share of the first `max_batches` validation batches, with their byte counts."""
        for number, start in enumerate(range(0, len(self.order), self.batch_size)):
            if max_batches is not None and number >= max_batches:
                return
            if not self.shard.owns(number):
                continue
            indices = self.order[start : start + self.batch_size]
            yield (
                self.collate([self.dataset[i] for i in indices], self.pad_id),
                float(sum(self.bytes[i] for i in indices)),
            )


# --- assembly ------------------------------------------------------------------------------------------


@dataclass
class StageData:
    """What the loop consumes: reproducible training steps and validation batches with byte counts."""

    train: PretrainBatches | SFTBatches
    val: PretrainValidation | SFTValidation
    summary: str


def build_pretrain_data(
    config: TrainConfig,
    run_dir: Path,
    tokenizer: FucinaTokenizer,
    context_length: int,
    shard: DataShard = DataShard(),
) -> StageData:
    """Pretraining windows: text packed into <run>/data once (and data.val into <run>/data-val);
    with data.mixture, named sources packed apart and drawn by phase weights (data/mixture.py)."""
    if config.data.mixture is not None:
        from fucina.data.mixture import build_mixture_data

        return build_mixture_data(config, run_dir, tokenizer, context_length, shard)
    eval_batch = config.eval.batch_size or config.train.batch_size
    train_dir = _packed(
        read_texts(config.data.train, "prose", config),
        tokenizer,
        run_dir / PACKED_DIR,
        config,
        config.data.val_fraction,
        config.data.min_val_docs,
    )
    train = TokenShards(train_dir, "train", tokenizer)
    if config.data.val:
        val_dir = _packed(
            read_texts(config.data.val, "prose", config),
            tokenizer,
            run_dir / PACKED_VAL_DIR,
            config,
            0.0,
            0,
        )
        val_splits = [TokenShards(val_dir, "train", tokenizer), TokenShards(val_dir, "val", tokenizer)]
    else:
        val_splits = [TokenShards(train_dir, "val", tokenizer)]
    batches = PretrainBatches(
        train, context_length, config.train.batch_size, config.train.seed, config.train.grad_accum, shard
    )
    val = PretrainValidation(val_splits, context_length, eval_batch, shard)
    summary = (
        f"{train.num_tokens:,} training tokens ({batches.num_windows:,} windows of {context_length}), "
        f"{sum(s.num_tokens for s in val_splits):,} validation tokens"
    )
    return StageData(batches, val, summary)


def build_sft_data(
    config: TrainConfig,
    run_dir: Path,
    tokenizer: FucinaTokenizer,
    context_length: int,
    shard: DataShard = DataShard(),
) -> StageData:
    """Chat fine-tuning: conversations tokenized with the template, assistant tokens supervised."""
    from fucina.data.sft import SFTDataset

    _require_pad(tokenizer, "SFT")
    stats = ReadStats()
    conversations = list(
        islice(
            read_records(config.data.train, "chat", config, "conversation", stats), config.data.max_documents
        )
    )
    if config.data.val:
        train_convs = conversations
        val_convs = list(read_records(config.data.val, "chat", config, "conversation", stats))
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
    batches, val = _example_batches(train_set, val_set, config, tokenizer, shard)
    summary = (
        f"{len(train_set):,} training conversations ({sum(train_set.lengths):,} tokens), "
        f"{len(val_set):,} validation conversations"
    )
    return StageData(batches, val, summary)


def build_preference_data(
    config: TrainConfig,
    run_dir: Path,
    tokenizer: FucinaTokenizer,
    context_length: int,
    shard: DataShard = DataShard(),
) -> StageData:
    """DPO: preference pairs (data/preferences.py), held out by the same seeded rule as conversations."""
    from fucina.data.preferences import PreferenceDataset, collate_pairs, read_preference_pairs

    _require_pad(tokenizer, "DPO")
    pairs = list(islice(read_preference_pairs(config.data.train), config.data.max_documents))
    if config.data.val:
        train_pairs, val_pairs = pairs, list(read_preference_pairs(config.data.val))
    else:
        train_pairs, val_pairs = _split_conversations(pairs, config)
    train_set = PreferenceDataset(train_pairs, tokenizer, context_length)
    val_set = PreferenceDataset(val_pairs, tokenizer, context_length)
    if len(train_set) == 0:
        raise DataError("no training preference pair is usable (identical answers or nothing scored)")
    batches, val = _example_batches(train_set, val_set, config, tokenizer, shard, collate_pairs)
    summary = (
        f"{len(train_set):,} training preference pairs ({train_set.dropped} dropped), "
        f"{len(val_set):,} validation pairs"
    )
    return StageData(batches, val, summary)


def _require_pad(tokenizer: FucinaTokenizer, purpose: str) -> None:
    """Examples of different lengths are padded: refuse a tokenizer without a pad token."""
    if tokenizer.pad_id is None:
        raise TokenizerError(
            f"the {tokenizer.template.name!r} tokenizer has no pad token, needed for {purpose}"
        )


def _example_batches(
    train_set,
    val_set,
    config: TrainConfig,
    tokenizer: FucinaTokenizer,
    shard: DataShard,
    collate: Collate | None = None,
) -> tuple[SFTBatches, SFTValidation]:
    """Training batches and validation of padded examples (conversations, preference pairs)."""
    eval_batch = config.eval.batch_size or config.train.batch_size
    batches = SFTBatches(
        train_set,
        config.train.batch_size,
        config.train.seed,
        tokenizer.pad_id,
        config.train.grad_accum,
        shard,
        collate,
    )
    val = SFTValidation(val_set, tokenizer, eval_batch, tokenizer.pad_id, shard, collate)
    return batches, val


def build_distill_data(
    config: TrainConfig,
    run_dir: Path,
    tokenizer: FucinaTokenizer,
    context_length: int,
    shard: DataShard = DataShard(),
) -> StageData:
    """Distillation: packed text windows (`distill.data: text`) or conversations (`chat`)."""
    builder = build_sft_data if config.distill.data == "chat" else build_pretrain_data
    return builder(config, run_dir, tokenizer, context_length, shard)


def epochs_to_steps(epochs: float, batches_per_epoch: float, micro_batches_per_step: int) -> int:
    """Optimizer steps that cover `epochs` passes over the training data (at least 1)."""
    return max(1, math.ceil(epochs * batches_per_epoch / micro_batches_per_step))
