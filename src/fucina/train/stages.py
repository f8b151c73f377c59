"""The stage table: each training stage names its data builder and its objective.

Design choices:
- One row per stage, no `if stage == ...` anywhere else: the loop looks its stage up here, builds the
  data with the row's builder and minimises the row's objective. DPO, distillation and LoRA add rows
  (with their own builders and objectives) instead of branches.
- A row also says which built-in corpus a bare `builtin` data source means for the stage (pretraining
  reads prose, chat fine-tuning reads conversations), which the tokenizer, trained before any batch
  exists, needs too.
- Post-training stages need a second, frozen model: the row names its role (`frozen_model`:
  "reference" for DPO, "teacher" for distillation) and the loop loads it once, in eval mode without
  gradients, and hands it to the row's objective factory with the config. The other rows get None.
- `TrainConfig.validate` checks `stage` against this table, so a stage name is known in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fucina.data.loaders import (
    DataShard,
    StageData,
    build_distill_data,
    build_preference_data,
    build_pretrain_data,
    build_sft_data,
)
from fucina.errors import ConfigError
from fucina.tokenizer import FucinaTokenizer
from fucina.train.distill import DIVERGENCES, DistillationObjective
from fucina.train.dpo import DPOObjective
from fucina.train.objectives import LanguageModelingObjective, Model, Objective

if TYPE_CHECKING:  # the config validates against this table; the table reads configs
    from fucina.train.config import TrainConfig

DataBuilder = Callable[["TrainConfig", Path, FucinaTokenizer, int, DataShard], StageData]
ObjectiveFactory = Callable[["TrainConfig", Model | None], Objective]  # (config, frozen model)


def _language_modeling(config: TrainConfig, frozen: Model | None) -> Objective:
    return LanguageModelingObjective()


def _dpo(config: TrainConfig, reference: Model | None) -> Objective:
    dpo = config.dpo
    return DPOObjective(
        reference, dpo.loss, dpo.beta, dpo.label_smoothing, dpo.rpo_alpha, dpo.precompute_reference
    )


def _distill(config: TrainConfig, teacher: Model | None) -> Objective:
    distill = config.distill
    beta = DIVERGENCES.get(distill.divergence, distill.beta)
    return DistillationObjective(
        teacher, distill.alpha, distill.temperature, beta, distill.top_k, distill.teacher_topk
    )


@dataclass(frozen=True)
class Stage:
    """One training stage: how its data is built and what is minimised on it."""

    name: str
    build_data: DataBuilder  # (config, run_dir, tokenizer, context_length, shard) -> StageData
    objective: ObjectiveFactory  # a fresh objective for a run
    builtin_corpus: str  # what a bare `builtin` source means: "prose" or "chat"
    description: str
    frozen_model: str | None = None  # "reference" or "teacher": the loop loads it and passes it on


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "pretrain",
            build_pretrain_data,
            _language_modeling,
            "prose",
            "next-token prediction on packed text windows",
        ),
        Stage(
            "sft",
            build_sft_data,
            _language_modeling,
            "chat",
            "chat fine-tuning: next-token loss on assistant tokens only",
        ),
        Stage(
            "dpo",
            build_preference_data,
            _dpo,
            "chat",
            "direct preference optimisation on chosen/rejected answer pairs, against a frozen reference",
            frozen_model="reference",
        ),
        Stage(
            "distill",
            build_distill_data,
            _distill,
            "prose",
            "knowledge distillation: labels plus a frozen teacher's soft targets",
            frozen_model="teacher",
        ),
    )
}


def get_stage(name: str) -> Stage:
    """The row of stage `name`; ConfigError lists the known stages."""
    try:
        return STAGES[name]
    except KeyError:
        raise ConfigError(f"stage: unknown stage {name!r} (known: {', '.join(STAGES)})") from None
