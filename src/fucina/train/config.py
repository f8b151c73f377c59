"""TrainConfig: one typed configuration for every training stage (pretraining and chat fine-tuning).

Design choices:
- Nested dataclasses loaded with `fucina.config.from_dict`, so a typo is rejected by name
  ("unknown key 'optim.lrr' (did you mean 'optim.lr'?)") instead of being silently ignored.
- The `model` section stays a plain mapping: either `preset: NAME` plus ModelConfig field overrides, or
  the full ModelConfig fields. It is validated against ModelConfig when the model is built, so this file
  does not have to mirror ModelConfig's fields.
- Paths written in a config FILE are relative to that file's directory (so a config works from any
  working directory); paths given with `--set` on the command line are relative to the working
  directory. `builtin`, `builtin:prose`, `builtin:chat` and `hf:NAME` are names, not paths.
- Cross-field rules (warmup in steps XOR ratio, a step or epoch budget, ...) are checked in `validate`,
  so a bad combination fails before any data is read; `stage` must be a row of train/stages.py.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fucina.adapt.lora_config import LoRAConfig
from fucina.config import apply_overrides, from_dict, load_yaml, to_dict
from fucina.data.sources import BUILTIN_SOURCE, is_path_source
from fucina.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class TokenizerSection:
    """Where the tokenizer comes from: an existing one (`path`) or trained at the start of the run."""

    path: str | None = None
    vocab_size: int = 1920
    template: str = "picodac"
    pretokenizer: str = "italian"
    min_frequency: int = 2
    inputs: list[str] = field(default_factory=list)


@dataclass
class MixtureSource:
    """One named source of a data mixture: its files and how to read them (data/mixture.py)."""

    name: str
    train: list[str] = field(default_factory=list)
    kind: Literal["text", "chat"] = "text"  # chat: conversations rendered with the chat template
    max_documents: int | None = None  # read at most this many (data.max_documents caps every source too)


@dataclass
class MixturePhase:
    """From `start` (a fraction of the run) on, draw the sources by these weights."""

    start: float = 0.0
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class MixtureSection:
    """Named sources and the phases of their weights (data/mixture.py)."""

    sources: list[MixtureSource] = field(default_factory=list)
    phases: list[MixturePhase] = field(default_factory=list)


@dataclass
class DataSection:
    """Training/validation sources and how they are split and cut into examples."""

    train: list[str] = field(default_factory=lambda: [BUILTIN_SOURCE])
    val: list[str] = field(default_factory=list)
    val_fraction: float = 0.05
    min_val_docs: int = 1
    max_documents: int | None = None
    skip_bad: bool = False
    train_on: Literal["all", "last"] = "all"
    context_length: int | None = None
    exclude: list[str] = field(default_factory=list)
    # [[fraction of the run, window], ...]: the window grows, tokens per step stay (data/curriculum.py)
    curriculum: list[list[int | float]] = field(default_factory=list)
    mixture: MixtureSection | None = None  # phased mixture of named sources (data/mixture.py)


@dataclass
class LeRaCSection:
    """LeRaC (Croitoru et al., arXiv 2205.09180): deeper layers start at lower rates (see lerac.py)."""

    enabled: bool = False
    c: float = 10.0  # the rate at depth d starts at lr * c^-d
    steps: int = 100  # optimizer step by which every group has grown to the common rate
    min_lr: float = 1e-8  # floor of the starting rates


@dataclass
class OptimSection:
    """AdamW hyper-parameters; weight decay applies to matrices only (see optim.py)."""

    name: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    lerac: LeRaCSection = field(default_factory=LeRaCSection)


@dataclass
class ScheduleSection:
    """Learning-rate schedule: warmup (steps or ratio of the run) then cosine decay, constant, or
    warmup-stable-decay (wsd: the peak held, then a decay over the last `decay_ratio` of the run)."""

    name: Literal["cosine", "constant", "wsd"] = "cosine"
    warmup_steps: int | None = None
    warmup_ratio: float | None = None
    min_lr: float = 0.0
    decay_ratio: float = 0.2  # wsd only
    decay_shape: Literal["linear", "cosine", "sqrt", "exp"] = "linear"  # wsd only


@dataclass
class AveragingSection:
    """Weight averaging kept beside the trained weights (see averaging.py)."""

    kind: Literal["none", "ema", "swa"] = "none"
    ema_decay: float = 0.999
    # Fraction of the run after which averaging starts; None: the schedule's decay phase for swa, 0 for ema.
    start: float | None = None
    every: int = 1  # fold the weights in every N optimizer steps
    # What best/ and final/ hold: best (whichever of raw and averaged has the lower val loss), raw, averaged.
    publish: Literal["best", "raw", "averaged"] = "best"


@dataclass
class TrainSection:
    """Batching, budget, numerics and device."""

    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "auto"
    seed: int = 0
    num_threads: int | None = None
    gradient_checkpointing: bool = False
    compile: bool = False


@dataclass
class EvalSection:
    """Validation cadence, size, early stopping."""

    every: int = 200
    max_batches: int | None = None
    batch_size: int | None = None
    early_stopping_patience: int | None = None
    min_delta: float = 0.0


@dataclass
class CheckpointSection:
    """Resumable checkpoints under <run>/checkpoints/."""

    every: int = 200
    keep_last: int = 2


@dataclass
class LogSection:
    """Console progress, metrics.jsonl, TensorBoard and the loss plot."""

    every: int = 10
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True


@dataclass
class DPOSection:
    """Preference optimisation (stage dpo): the frozen reference and the loss (train/dpo.py)."""

    reference: str | None = None  # a model or run directory; None: init_from, the policy's start
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None  # weight of the SFT term on the chosen answer (RPO); None: off
    precompute_reference: bool = False  # score every pair with the reference once, then free it


@dataclass
class DistillSection:
    """Knowledge distillation (stage distill): the frozen teacher and the loss (train/distill.py)."""

    teacher: str | None = None  # a model or run directory sharing the student's tokenizer
    data: Literal["text", "chat"] = "text"  # packed text windows or conversations
    alpha: float = 0.5  # weight of the cross-entropy on the labels; 1 - alpha goes to the teacher
    temperature: float = 1.0
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = 0.5  # the generalised JSD's mixture weight (divergence: jsd)
    top_k: int | None = None  # offline mode: the teacher's top-k log-probabilities, computed once
    teacher_topk: str | None = None  # a finished top-k cache to read (default: <run>/teacher_topk)


@dataclass
class DistSection:
    """Several processes under torchrun (train/process_group.py): how they share the training."""

    strategy: Literal["none", "ddp", "fsdp"] = "none"  # none: one process; ddp: replicas; fsdp: shards
    timeout_s: float = 600.0  # longest wait in a collective before a rank gives up (a dead peer)


@dataclass
class TrainConfig:
    """Everything one training stage needs; saved resolved as <run>/train_config.yaml."""

    stage: str = "pretrain"  # a row of the stage table (train/stages.py)
    init_from: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    averaging: AveragingSection = field(default_factory=AveragingSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    distill: DistillSection = field(default_factory=DistillSection)
    lora: LoRAConfig | None = None  # adapters on the frozen init_from model (adapt/lora_config.py)
    dist: DistSection = field(default_factory=DistSection)

    def validate(self) -> TrainConfig:
        """Check cross-field rules; raises ConfigError naming the key."""
        from fucina.train.stages import get_stage  # the table's data builders read this config

        get_stage(self.stage)
        _positive("train.batch_size", self.train.batch_size)
        _positive("train.grad_accum", self.train.grad_accum)
        if self.train.max_steps is None and self.train.epochs is None:
            raise ConfigError("set train.max_steps or train.epochs (the run needs a budget)")
        if self.train.max_steps is not None:
            _positive("train.max_steps", self.train.max_steps)
        if self.train.epochs is not None and self.train.epochs <= 0:
            raise ConfigError(f"train.epochs must be > 0, got {self.train.epochs}")
        if self.train.num_threads is not None:
            _positive("train.num_threads", self.train.num_threads)
        s = self.schedule
        if s.warmup_steps is not None and s.warmup_ratio is not None:
            raise ConfigError("set schedule.warmup_steps or schedule.warmup_ratio, not both")
        if s.warmup_steps is not None and s.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0, got {s.warmup_steps}")
        if s.warmup_ratio is not None and not 0.0 <= s.warmup_ratio < 1.0:
            raise ConfigError(f"schedule.warmup_ratio must be in [0, 1), got {s.warmup_ratio}")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.optim.lr}")
        if not 0.0 <= s.min_lr <= self.optim.lr:
            raise ConfigError(f"schedule.min_lr must be in [0, optim.lr], got {s.min_lr}")
        if not 0.0 <= s.decay_ratio <= 1.0:
            raise ConfigError(f"schedule.decay_ratio must be in [0, 1], got {s.decay_ratio}")
        self._validate_recipe()
        if len(self.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.optim.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.optim.betas}")
        if self.optim.weight_decay < 0 or self.optim.grad_clip < 0:
            raise ConfigError("optim.weight_decay and optim.grad_clip must be >= 0")
        if not 0.0 <= self.data.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.data.val_fraction}")
        if not self.data.train:
            raise ConfigError("data.train: give at least one source (a file, 'builtin' or 'hf:NAME')")
        if self.data.max_documents is not None:
            _positive("data.max_documents", self.data.max_documents)
        if self.data.context_length is not None:
            _positive("data.context_length", self.data.context_length)
        _positive("eval.every", self.eval.every, allow_zero=True)
        _positive("checkpoint.every", self.checkpoint.every, allow_zero=True)
        _positive("checkpoint.keep_last", self.checkpoint.keep_last)
        _positive("log.every", self.log.every)
        if self.eval.max_batches is not None:
            _positive("eval.max_batches", self.eval.max_batches)
        if self.eval.early_stopping_patience is not None:
            _positive("eval.early_stopping_patience", self.eval.early_stopping_patience)
        if self.init_from is not None and self.tokenizer.path is not None:
            raise ConfigError(
                "set init_from or tokenizer.path, not both: a run initialised from a model reuses its tokenizer"
            )
        self._validate_post_training()
        self._validate_distributed()
        if self.lora is not None:
            self.lora.validate()
            if self.init_from is None:
                raise ConfigError("lora needs init_from: the adapters train on a frozen, trained model")
        return self

    def _validate_recipe(self) -> None:
        from fucina.data.curriculum import check_curriculum
        from fucina.data.mixture import check_mixture

        check_curriculum(self.data.curriculum)
        if self.data.mixture is not None:
            check_mixture(self.data.mixture)
            if self.tokenizer.path is None and self.init_from is None and not self.tokenizer.inputs:
                raise ConfigError(
                    "data.mixture: set tokenizer.inputs (or tokenizer.path, or init_from): the tokenizer is "
                    "trained on data.train otherwise, which a mixture does not read"
                )
        lerac, averaging = self.optim.lerac, self.averaging
        if lerac.enabled:
            if lerac.c < 1.0:
                raise ConfigError(f"optim.lerac.c must be >= 1 (deeper layers start lower), got {lerac.c}")
            _positive("optim.lerac.steps", lerac.steps)
            if not 0.0 < lerac.min_lr <= self.optim.lr:
                raise ConfigError(f"optim.lerac.min_lr must be in (0, optim.lr], got {lerac.min_lr}")
        if not 0.0 < averaging.ema_decay < 1.0:
            raise ConfigError(f"averaging.ema_decay must be in (0, 1), got {averaging.ema_decay}")
        if averaging.start is not None and not 0.0 <= averaging.start < 1.0:
            raise ConfigError(f"averaging.start must be in [0, 1), got {averaging.start}")
        _positive("averaging.every", averaging.every)
        if averaging.kind == "none" and averaging.publish == "averaged":
            raise ConfigError("averaging.publish is averaged but averaging.kind is none")

    def _validate_distributed(self) -> None:
        """What cannot run under several processes is refused by name, never run wrong."""
        strategy = self.dist.strategy
        if self.dist.timeout_s <= 0:
            raise ConfigError(f"dist.timeout_s must be > 0, got {self.dist.timeout_s}")
        if strategy == "none":
            return
        if self.optim.name == "adamw8bit":
            raise ConfigError(
                f"dist.strategy {strategy}: optim.name adamw8bit has no distributed state; use adamw"
            )
        if strategy == "fsdp" and self.averaging.kind != "none":
            raise ConfigError(
                "dist.strategy fsdp: weight averaging keeps a full copy per rank; use ddp or none"
            )
        if strategy == "fsdp" and self.lora is not None:
            raise ConfigError("dist.strategy fsdp: LoRA adapters are small, use dist.strategy ddp")
        if self.train.compile and strategy == "fsdp":
            raise ConfigError(
                "dist.strategy fsdp with train.compile is not supported yet; use ddp or drop compile"
            )

    def _validate_post_training(self) -> None:
        dpo, distill = self.dpo, self.distill
        if dpo.beta <= 0:
            raise ConfigError(f"dpo.beta must be > 0, got {dpo.beta}")
        if not 0.0 <= dpo.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {dpo.label_smoothing}")
        if dpo.rpo_alpha is not None and dpo.rpo_alpha < 0:
            raise ConfigError(f"dpo.rpo_alpha must be >= 0, got {dpo.rpo_alpha}")
        if self.stage == "dpo" and self.init_from is None:
            raise ConfigError("stage dpo needs init_from (the policy starts from a trained chat model)")
        if not 0.0 <= distill.alpha <= 1.0:
            raise ConfigError(f"distill.alpha must be in [0, 1], got {distill.alpha}")
        if distill.temperature <= 0:
            raise ConfigError(f"distill.temperature must be > 0, got {distill.temperature}")
        if not 0.0 <= distill.beta <= 1.0:
            raise ConfigError(f"distill.beta must be in [0, 1], got {distill.beta}")
        if self.stage == "distill" and distill.teacher is None and distill.teacher_topk is None:
            raise ConfigError(
                "stage distill needs distill.teacher (a model or run directory) or distill.teacher_topk"
            )
        if distill.top_k is not None and distill.top_k < 1:
            raise ConfigError(f"distill.top_k must be >= 1, got {distill.top_k}")
        if distill.teacher_topk is not None and distill.top_k is None:
            raise ConfigError("distill.teacher_topk needs distill.top_k (the offline mode)")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def _positive(key: str, value: int, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the path-valued keys of a raw config mapping absolute, relative to `base`."""

    def fix(value: Any) -> Any:
        if isinstance(value, str) and is_path_source(value) and not Path(value).expanduser().is_absolute():
            return str((base / Path(value).expanduser()).resolve())
        return value

    data = copy.deepcopy(data)
    if isinstance(data.get("init_from"), str):
        data["init_from"] = fix(data["init_from"])
    for section, keys in (
        ("tokenizer", ("path", "inputs")),
        ("data", ("train", "val", "exclude")),
        ("dpo", ("reference",)),
        ("distill", ("teacher", "teacher_topk")),
    ):
        node = data.get(section)
        if not isinstance(node, dict):
            continue
        if section == "data" and isinstance(node.get("mixture"), dict):
            for source in node["mixture"].get("sources") or []:
                if isinstance(source, dict) and isinstance(source.get("train"), list):
                    source["train"] = [fix(v) for v in source["train"]]
                elif isinstance(source, dict) and isinstance(source.get("train"), str):
                    source["train"] = [fix(source["train"])]
        for key in keys:
            if isinstance(node.get(key), list):
                node[key] = [fix(v) for v in node[key]]
            elif isinstance(node.get(key), str):
                node[key] = fix(node[key])
    return data


# YAML 1.1 (PyYAML) reads `3e-4` as a string (it wants `3.0e-4`); float fields accept that spelling too.
_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _is_float_field(annotation: Any) -> bool:
    if annotation is float:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return float in typing.get_args(annotation)
    return False


def scientific_floats(data: Any, cls: type) -> Any:
    """Copy of `data` where strings like '3e-4' in float fields of dataclass `cls` become floats."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return data
    hints = typing.get_type_hints(cls)
    fixed = dict(data)
    for key, value in data.items():
        hint = hints.get(key)
        if hint is None:
            continue
        if isinstance(value, str) and _is_float_field(hint) and _SCIENTIFIC.match(value.strip()):
            fixed[key] = float(value)
        elif dataclasses.is_dataclass(hint):
            fixed[key] = scientific_floats(value, hint)
    return fixed


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A validated TrainConfig from a mapping plus `section.key=value` overrides."""
    data = _resolve_paths(apply_overrides(copy.deepcopy(data), overrides), Path.cwd())
    data = scientific_floats(_moved_model_switches(data), TrainConfig)
    for key in ("tokenizer.inputs", "data.train", "data.val", "data.exclude"):
        section, name = key.split(".")
        node = data.get(section)
        if isinstance(node, dict) and isinstance(node.get(name), str):
            node[name] = [node[name]]  # a single source is a one-element list
    return from_dict(TrainConfig, data).validate()


def _moved_model_switches(data: dict[str, Any]) -> dict[str, Any]:
    """A config written when `model.gradient_checkpointing` existed: the switch moves to `train`."""
    model = data.get("model")
    if not isinstance(model, dict) or "gradient_checkpointing" not in model:
        return data
    switch = model.pop("gradient_checkpointing")
    train = data.setdefault("train", {})
    if isinstance(train, dict):
        train["gradient_checkpointing"] = bool(train.get("gradient_checkpointing")) or bool(switch)
    log.warning("model.gradient_checkpointing is now train.gradient_checkpointing (a training option)")
    return data


def load_train_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load a YAML training config; its relative paths are taken relative to the file's directory."""
    path = Path(path)
    data = _resolve_paths(load_yaml(path), path.resolve().parent)
    try:
        return config_from_dict(data, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
