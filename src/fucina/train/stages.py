"""The stage table: each training stage names its data builder and its objective.

Design choices:
- One row per stage, no `if stage == ...` anywhere else: the loop looks its stage up here, builds the
  data with the row's builder and minimises the row's objective. DPO, distillation and LoRA add rows
  (with their own builders and objectives) instead of branches.
- A row also says which built-in corpus a bare `builtin` data source means for the stage (pretraining
  reads prose, chat fine-tuning reads conversations), which the tokenizer, trained before any batch
  exists, needs too.
- `TrainConfig.validate` checks `stage` against this table, so a stage name is known in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fucina.data.loaders import DataShard, StageData, build_pretrain_data, build_sft_data
from fucina.errors import ConfigError
from fucina.tokenizer import FucinaTokenizer
from fucina.train.objectives import LanguageModelingObjective, Objective

if TYPE_CHECKING:  # the config validates against this table; the table reads configs
    from fucina.train.config import TrainConfig

DataBuilder = Callable[["TrainConfig", Path, FucinaTokenizer, int, DataShard], StageData]


@dataclass(frozen=True)
class Stage:
    """One training stage: how its data is built and what is minimised on it."""

    name: str
    build_data: DataBuilder  # (config, run_dir, tokenizer, context_length, shard) -> StageData
    objective: Callable[[], Objective]  # a fresh objective for a run
    builtin_corpus: str  # what a bare `builtin` source means: "prose" or "chat"
    description: str


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "pretrain",
            build_pretrain_data,
            LanguageModelingObjective,
            "prose",
            "next-token prediction on packed text windows",
        ),
        Stage(
            "sft",
            build_sft_data,
            LanguageModelingObjective,
            "chat",
            "chat fine-tuning: next-token loss on assistant tokens only",
        ),
    )
}


def get_stage(name: str) -> Stage:
    """The row of stage `name`; ConfigError lists the known stages."""
    try:
        return STAGES[name]
    except KeyError:
        raise ConfigError(f"stage: unknown stage {name!r} (known: {', '.join(STAGES)})") from None
