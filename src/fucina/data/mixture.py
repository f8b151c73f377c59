"""Phased data mixtures: named sources drawn by weight, with weights that change at run fractions.

Design choices:
- `data.mixture.sources` names each source (its files, and `kind: text` or `chat`: conversations are
  rendered with the tokenizer's chat template and packed as text); each is packed once into
  `<run>/data/mix-<name>/`, so a source keeps its own train/val split and its own block order.
- `data.mixture.phases` lists `{start: fraction of the run, weights: {name: weight}}`; the weights of the
  phase holding a step are normalised and apply to every row of that step.
- The sampler: the source of each of a step's global rows is drawn with
  `numpy.random.default_rng([seed, MIXTURE_STREAM, step])`, a pure function of the step; each source then
  hands out its next blocks from its own (seed, epoch, source)-determined order. The sampler's state is
  therefore the per-source positions, which live in the loader's position (`DataPosition.sources`) that
  checkpoints already save, and a resumed run draws exactly the rows of an uninterrupted one, across a
  phase switch too. Rank sharding is the plain loader's: every rank draws the same global rows and keeps
  its contiguous slice.
- Blocks are windows of the run's context length, so the sequence-length curriculum (curriculum.py)
  applies unchanged.
- The realised mixture of each phase (rows per source) is logged when the phase ends; it is recomputed
  by replaying the draws, so it is right after a resume as well.
- Validation: every source's held-out split (plus `data.val` if given), at the full window.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fucina.data.curriculum import Curriculum, build_curriculum, split_blocks
from fucina.data.packing import TokenShards
from fucina.errors import ConfigError, DataError

if TYPE_CHECKING:
    from fucina.data.loaders import Batch, DataPosition, DataShard, StageData
    from fucina.tokenizer import FucinaTokenizer
    from fucina.train.config import MixtureSection, TrainConfig

log = logging.getLogger(__name__)

MIXTURE_STREAM = 0x6D6978  # "mix": keeps the draws apart from every other seeded stream
MIX_DIR_PREFIX = "mix-"


@dataclass(frozen=True)
class Phase:
    """From run fraction `start` on, draw the sources with these normalised probabilities."""

    start: float
    probabilities: tuple[float, ...]


def check_mixture(section: MixtureSection, key: str = "data.mixture") -> None:
    """Names, weights and phase boundaries; raises ConfigError naming the key."""
    names = [source.name for source in section.sources]
    if not names:
        raise ConfigError(f"{key}.sources: name at least one source")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key}.sources: source names must be unique, got {names}")
    for index, source in enumerate(section.sources):
        if not source.name or "/" in source.name:
            raise ConfigError(f"{key}.sources[{index}].name: {source.name!r} is not a usable name")
        if not source.train:
            raise ConfigError(f"{key}.sources[{index}].train: give at least one file or directory")
        if source.max_documents is not None and source.max_documents < 1:
            raise ConfigError(f"{key}.sources[{index}].max_documents must be > 0, got {source.max_documents}")
    if not section.phases:
        raise ConfigError(f"{key}.phases: give at least one phase")
    previous = -1.0
    for index, phase in enumerate(section.phases):
        where = f"{key}.phases[{index}]"
        if not 0.0 <= phase.start < 1.0 or phase.start <= previous:
            raise ConfigError(f"{where}.start: must be in [0, 1) and increasing, got {phase.start}")
        previous = phase.start
        unknown = sorted(set(phase.weights) - set(names))
        if unknown:
            raise ConfigError(f"{where}.weights: unknown source {unknown[0]!r} (sources: {', '.join(names)})")
        if any(w < 0 for w in phase.weights.values()) or sum(phase.weights.values()) <= 0:
            raise ConfigError(f"{where}.weights: weights must be >= 0 with a positive sum")
    if section.phases[0].start != 0.0:
        raise ConfigError(f"{key}.phases[0].start: the first phase must start at 0.0")


def mixture_phases(section: MixtureSection) -> list[Phase]:
    """The phases with weights normalised over the sources (a source a phase does not name gets 0)."""
    names = [source.name for source in section.sources]
    phases = []
    for phase in section.phases:
        total = float(sum(phase.weights.values()))
        phases.append(Phase(phase.start, tuple(phase.weights.get(n, 0.0) / total for n in names)))
    return phases


class MixtureBatches:
    """Training steps whose rows come from named sources drawn by phase weights (see the module doc)."""

    def __init__(
        self,
        sources: dict[str, TokenShards],
        phases: list[Phase],
        context_length: int,
        batch_size: int,
        seed: int,
        grad_accum: int = 1,
        shard: DataShard | None = None,
    ):
        from fucina.data.loaders import DataShard

        self.names = list(sources)
        self.sources, self.phases = sources, phases
        self.context_length, self.batch_size, self.seed = context_length, batch_size, seed
        self.grad_accum, self.shard = grad_accum, shard or DataShard()
        self.num_blocks = {name: s.num_windows(context_length) for name, s in sources.items()}
        for name, count in self.num_blocks.items():
            if count == 0:
                raise DataError(
                    f"mixture source {name!r}: {sources[name].num_tokens} tokens cannot fill one window of "
                    f"{context_length + 1}",
                    sources[name].directory,
                )
        self.num_windows = sum(self.num_blocks.values())
        self.curriculum: Curriculum | None = None
        self.total_steps: int | None = None
        self._orders: dict[str, tuple[int, np.ndarray]] = {}

    # --- the run's plan ---

    def plan(self, total_steps: int, curriculum: Sequence[Sequence[float]]) -> None:
        """Fix the run length (phases are run fractions) and the window curriculum, if any."""
        self.total_steps = total_steps
        if curriculum:
            self.curriculum = build_curriculum(curriculum, self.context_length, total_steps)

    def phase_index(self, step: int) -> int:
        """The phase of optimizer step `step` (1-based): the last whose start <= the step's fraction."""
        if self.total_steps is None:
            if len(self.phases) > 1:
                raise DataError("the mixture's phases are run fractions: call plan(total_steps) first")
            return 0
        total = self.total_steps
        index = 0
        for number, phase in enumerate(self.phases):
            if step > math.floor(phase.start * total):
                index = number
        return index

    def step_sources(self, step: int) -> np.ndarray:
        """The source index of each global row of step `step`: a pure function of (seed, step)."""
        rows = self.batch_size * self.micro_batches_per_step
        probabilities = self.phases[self.phase_index(step)].probabilities
        rng = np.random.default_rng([self.seed, MIXTURE_STREAM, step])
        return rng.choice(len(self.names), size=rows, p=probabilities)

    # --- the loader interface (as PretrainBatches) ---

    @property
    def batches_per_epoch(self) -> float:
        return self.num_windows / self.batch_size

    @property
    def micro_batches_per_step(self) -> int:
        return self.grad_accum * self.shard.world_size

    def epochs_done(self, position: DataPosition) -> float:
        return position.index / self.num_windows

    def _order(self, name: str, epoch: int) -> np.ndarray:
        cached = self._orders.get(name)
        if cached is None or cached[0] != epoch:
            stream = [self.seed, epoch, 1 + self.names.index(name)]
            cached = (epoch, np.random.default_rng(stream).permutation(self.num_blocks[name]))
            self._orders[name] = cached
        return cached[1]

    def step_blocks(self, position: DataPosition, step: int) -> tuple[list[tuple[str, int]], DataPosition]:
        """(source, block index) of each global row of step `step` starting at `position`, and the next."""
        from fucina.data.loaders import DataPosition

        places = {name: list(position.sources.get(name, (0, 0))) for name in self.names}
        rows: list[tuple[str, int]] = []
        for source in self.step_sources(step):
            name = self.names[int(source)]
            epoch, index = places[name]
            rows.append((name, int(self._order(name, epoch)[index])))
            index += 1
            if index >= self.num_blocks[name]:
                epoch, index = epoch + 1, 0
            places[name] = [epoch, index]
        after = DataPosition(0, position.index + len(rows), {n: (e, i) for n, (e, i) in places.items()})
        return rows, after

    def next_step(self, position: DataPosition, step: int = 1) -> tuple[list[Batch], DataPosition]:
        """This rank's `grad_accum` micro-batches of step `step` starting at `position`, and the next position."""
        rows, after = self.step_blocks(position, step)
        mine = self.shard.slice_of(rows, self.batch_size * self.grad_accum)
        window = self.curriculum.window_at(step) if self.curriculum is not None else self.context_length
        size = self.batch_size
        micro = []
        for start in range(0, len(mine), size):
            blocks = [
                self.sources[name].window(i, self.context_length) for name, i in mine[start : start + size]
            ]
            micro.append(split_blocks(blocks, window))
        self._log_phase_end(step)
        return micro, after

    # --- the realised mixture ---

    def realised_mixture(self, phase: int, until_step: int) -> dict[str, float]:
        """Fraction of rows each source got in `phase`, over the steps up to `until_step` (replayed)."""
        counts = np.zeros(len(self.names), dtype=np.int64)
        for step in range(1, until_step + 1):
            if self.phase_index(step) == phase:
                counts += np.bincount(self.step_sources(step), minlength=len(self.names))
        total = max(int(counts.sum()), 1)
        return {name: float(c) / total for name, c in zip(self.names, counts)}

    def _log_phase_end(self, step: int) -> None:
        if self.total_steps is None:
            return
        phase = self.phase_index(step)
        if step != self.total_steps and self.phase_index(step + 1) == phase:
            return
        realised = self.realised_mixture(phase, step)
        wanted = self.phases[phase].probabilities
        log.info(
            "mixture phase %d (steps up to %d): %s",
            phase + 1,
            step,
            ", ".join(f"{n} {realised[n]:.1%} (weight {w:.1%})" for n, w in zip(self.names, wanted)),
        )


def _source_texts(source, config: TrainConfig, tokenizer: FucinaTokenizer) -> Iterator[str]:
    """A source's documents: text records, or conversations rendered with the chat template."""
    from itertools import islice

    from fucina.data.loaders import read_records
    from fucina.data.readers import ReadStats

    caps = [n for n in (source.max_documents, config.data.max_documents) if n is not None]
    limit = min(caps) if caps else None
    if source.kind == "text":
        return islice(read_records(source.train, "prose", config, "text", ReadStats()), limit)
    conversations = read_records(source.train, "chat", config, "conversation", ReadStats())
    return islice((tokenizer.template.render(messages) for messages in conversations), limit)


def build_mixture_data(
    config: TrainConfig,
    run_dir: Path,
    tokenizer: FucinaTokenizer,
    context_length: int,
    shard: DataShard,
) -> StageData:
    """Pretraining windows drawn from the named sources of data.mixture, each packed once."""
    from fucina.data.loaders import (
        PACKED_DIR,
        PACKED_VAL_DIR,
        PretrainValidation,
        StageData,
        _packed,
        read_texts,
    )

    section = config.data.mixture
    sources: dict[str, TokenShards] = {}
    val_splits: list[TokenShards] = []
    for source in section.sources:
        directory = _packed(
            _source_texts(source, config, tokenizer),
            tokenizer,
            run_dir / PACKED_DIR / f"{MIX_DIR_PREFIX}{source.name}",
            config,
            config.data.val_fraction,
            config.data.min_val_docs,
        )
        sources[source.name] = TokenShards(directory, "train", tokenizer)
        val_splits.append(TokenShards(directory, "val", tokenizer))
    if config.data.val:
        val_dir = _packed(
            read_texts(config.data.val, "prose", config), tokenizer, run_dir / PACKED_VAL_DIR, config, 0.0, 0
        )
        val_splits = [TokenShards(val_dir, "train", tokenizer), TokenShards(val_dir, "val", tokenizer)]
    batches = MixtureBatches(
        sources,
        mixture_phases(section),
        context_length,
        config.train.batch_size,
        config.train.seed,
        config.train.grad_accum,
        shard,
    )
    val = PretrainValidation(
        val_splits, context_length, config.eval.batch_size or config.train.batch_size, shard
    )
    summary = ", ".join(
        f"{name}: {s.num_tokens:,} tokens ({batches.num_blocks[name]:,} windows of {context_length})"
        for name, s in sources.items()
    )
    return StageData(
        batches, val, f"mixture of {summary}; {sum(s.num_tokens for s in val_splits):,} validation tokens"
    )
