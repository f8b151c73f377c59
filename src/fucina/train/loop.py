"""The one training loop, for pretraining and chat fine-tuning alike, exactly resumable.

What happens, in order: open the run directory (resume or start), seed everything, get the tokenizer
(inherited, loaded or trained), build or load the model, prepare the stage's data, then step:
`grad_accum` micro-batches -> the stage's objective -> backward -> clip -> AdamW; evaluate every
`eval.every` steps (loss, perplexity, bits per byte; best/ kept; early stopping), checkpoint every
`checkpoint.every` steps, and write final/ at the end.

Design choices:
- The stage (train/stages.py) supplies the data builder and the objective; the loop has no branch on
  the stage's name. For the LM objective the loss is the model's fused LM-head cross-entropy.
- Several processes (`dist.strategy` ddp or fsdp under torchrun, train/process_group.py): each rank
  reads its shard of every global batch; the step's supervised count is summed over ranks before the
  loss is normalised, and the loss is scaled by the world size (DDP and FSDP average gradients), so a
  step is the single-process step on the global batch. Rank 0 writes every file; the others wait for
  it where they read what it writes (tokenizer, packed data). Checkpoints are then DCP shards
  (train/sharded_checkpoint.py) that resume at any world size.
- Exact resume on CPU: the checkpoint holds the float32 weights, the optimizer's state, the weight
  average (train/averaging.py), every RNG (python,
  numpy, torch CPU and CUDA), the data position (epoch, index; the order itself is a pure function of
  (seed, epoch)), the step, the early-stopping state and the running metrics. The learning rate is a
  function of the step. So killing a run at any point and resuming it reproduces the uninterrupted run
  bit for bit (with the same thread count; tests/train/test_resume.py checks it with SIGKILL).
- Each optimizer group's rate is the schedule's at the optimizer step times LeRaC's factor for the
  group's depth (train/lerac.py; 1 when LeRaC is off).
- With weight averaging, every evaluation scores the raw and the averaged weights; `averaging.publish`
  picks which of them best/ and final/ hold and whose loss drives best/ and early stopping.
- Gradient accumulation divides every micro-batch's summed loss by the supervised-token count of the
  WHOLE step, so a step's gradient is that of the token-mean loss over all its micro-batches.
- Precision: fp32 master weights always. bf16 autocast (CPU or CUDA) needs no loss scaling; fp16 autocast
  only on CUDA with GradScaler (CPU fp16 is refused).
- A stage that needs a frozen second model (DPO's reference, distillation's teacher) gets it loaded once
  from the config's path, in eval mode with requires_grad off (a teacher in bf16 on a GPU that has it),
  never saved in checkpoints: a resumed run reloads the same weights. Its tokenizer must be the run's
  (same vocabulary and ids), or the two models' token distributions would not compare.
- An objective's `unit_sums` are reported as means per unit of the step (training) or of the
  validation set (evaluation); its plain `logs` are summed over the step's micro-batches.
- `kill_after_step` is a debugging/testing aid: the process SIGKILLs itself right after that step, with
  no chance to clean up, like a power cut.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from fucina.adapt.adapter_dir import save_trained_model
from fucina.adapt.lora import apply_lora, load_trainable_state_dict, trainable_state_dict
from fucina.config import from_dict
from fucina.data.curriculum import plan_data
from fucina.data.loaders import DataPosition, DataShard, StageData, epochs_to_steps, prepare_tokenizer
from fucina.errors import ConfigError, FucinaError, TokenizerError
from fucina.fsutil import write_atomically
from fucina.model.config import ModelConfig
from fucina.model.io import CONFIG_FILE as MODEL_CONFIG_FILE
from fucina.model.io import MODEL_VERSION
from fucina.model.transformer import Transformer, maybe_compile
from fucina.model_dir import BEST_DIR, FINAL_DIR, load_pretrained
from fucina.presets import get_preset
from fucina.tokenizer import FucinaTokenizer
from fucina.train.activation_checkpointing import apply_activation_checkpointing
from fucina.train.averaging import WeightAverage, averaging_start_step
from fucina.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fucina.train.config import TrainConfig, scientific_floats
from fucina.train.context_extension import model_with_overrides
from fucina.train.lerac import lerac_factor
from fucina.train.metrics import MetricsLogger, collect_routing_statistics
from fucina.train.optim import build_optimizer, optimizer_state_bytes
from fucina.train.process_group import (
    SINGLE_PROCESS,
    ProcessGroup,
    exit_after_peer_failure,
    peer_failure,
    start_process_group,
    stop_process_group,
    wrap_model,
)
from fucina.train.run_dir import RunDirectory, RunDirectoryError, open_run_directory, publish_model_dir
from fucina.train.schedules import LRSchedule, build_schedule
from fucina.train.sharded_checkpoint import (
    gathered_model,
    load_rank_rng,
    load_sharded_state,
    save_sharded_checkpoint,
)
from fucina.train.stages import get_stage

log = logging.getLogger(__name__)

LN2 = math.log(2.0)


class TrainingDivergedError(FucinaError):
    """The loss became NaN or infinite."""


@dataclass
class EvalResult:
    val_loss: float
    val_ppl: float
    val_bpb: float
    val_tokens: int
    objective: dict[str, float] = field(default_factory=dict)  # the objective's unit_sums, per unit


@dataclass
class Progress:
    """Everything about the run's progress that a checkpoint must bring back."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    tokens_seen: int = 0
    train_seconds: float = 0.0
    best_val_loss: float = math.inf
    best_step: int = 0
    evals_without_improvement: int = 0
    stopped_early: bool = False
    last_eval_step: int = 0
    window_loss_sum: float = 0.0
    window_tokens: int = 0


@dataclass
class LoopTiming:
    """Wall-clock time of this invocation's loop (not saved in checkpoints; for reports and benchmarks).

    `step_seconds[i]` is the whole i-th iteration (data, forward/backward/step, logging, progress bar)
    minus the evaluation and checkpoint it may have done, which are summed apart.
    """

    step_seconds: list[float] = field(default_factory=list)
    eval_seconds: float = 0.0
    checkpoint_seconds: float = 0.0


@dataclass
class TrainResult:
    """Outcome of `train`: where things are and the numbers that matter."""

    run_dir: Path
    steps: int
    total_steps: int
    best_val_loss: float
    best_val_bpb: float | None
    last_eval: EvalResult | None
    stopped_early: bool
    tokens_per_second: float
    train_seconds: float
    timing: LoopTiming = field(default_factory=LoopTiming)


# --- set-up -----------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is available")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None: plain fp32); refuses fp16 on CPU."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError(
                "train.precision fp16 needs a CUDA device (it relies on GradScaler loss scaling); "
                "use bf16 or fp32 on CPU"
            )
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision bf16 is not supported by this GPU; use fp16 or fp32")
    return torch.bfloat16


def build_model_config(section: dict[str, Any], vocab_size: int) -> ModelConfig:
    """ModelConfig from `preset: NAME` + overrides, or from full fields; vocab from the tokenizer if unset."""
    fields = scientific_floats(dict(section), ModelConfig)
    preset = fields.pop("preset", None)
    base = get_preset(preset).to_dict() if preset is not None else {}
    if "vocab_size" not in fields:
        fields["vocab_size"] = vocab_size
    return from_dict(ModelConfig, {**base, **fields}, "model")


def _check_vocab(tokenizer: FucinaTokenizer, model_config: ModelConfig, where: str) -> None:
    if tokenizer.vocab_size > model_config.vocab_size:
        raise TokenizerError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model_config.vocab_size} ({where}); use a matching tokenizer or set model.vocab_size"
        )


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[-2], tuple(python[:-2]), python[-1]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _eval_values(result: EvalResult) -> dict[str, Any]:
    """An evaluation as flat values (the objective's own values beside the loss) for logs and info."""
    values = asdict(result)
    return {**values, **values.pop("objective")}


# --- the loop ---------------------------------------------------------------------------------------------


class Trainer:
    """One stage of training in one run directory (see the module docstring)."""

    def __init__(
        self,
        config: TrainConfig,
        run: RunDirectory,
        checkpoint,
        kill_after_step: int | None = None,
        group: ProcessGroup = SINGLE_PROCESS,
        device_name: str | None = None,
    ):
        self.config, self.run, self.kill_after_step, self.group = config, run, kill_after_step, group
        train = config.train
        if train.num_threads is not None:
            torch.set_num_threads(train.num_threads)
        random.seed(train.seed)
        np.random.seed(train.seed)
        torch.manual_seed(train.seed)
        self.device = resolve_device(device_name or train.device)
        self.amp_dtype = autocast_dtype(train.precision, self.device)

        inherited_model, inherited_tokenizer = None, None
        if config.init_from is not None:
            inherited_model, inherited_tokenizer = load_pretrained(config.init_from)
        self.stage = get_stage(config.stage)
        self.tokenizer = group.writer_first(
            lambda: prepare_tokenizer(config, run.path, inherited_tokenizer, self.stage.builtin_corpus)
        )
        self.objective = self.stage.objective(config, self._load_frozen_model())
        if inherited_model is not None:
            model = model_with_overrides(inherited_model, config.model)
            _check_vocab(self.tokenizer, model.config, f"init_from {config.init_from}")
        else:
            model_config = build_model_config(config.model, self.tokenizer.vocab_size)
            _check_vocab(self.tokenizer, model_config, "model section")
            model = Transformer(model_config)
        if config.lora is not None:  # the base frozen, adapters on its projections (fucina.adapt)
            model = apply_lora(model, config.lora)
        if checkpoint is not None and not checkpoint.sharded:
            try:  # a LoRA run's checkpoints hold the adapters only
                load_trainable_state_dict(model, checkpoint.model_state)
            except RuntimeError as err:
                raise ConfigError(
                    f"{checkpoint.path}: weights do not fit the configured model ({err})"
                ) from None
        self.model = model.to(self.device)
        self.model_config = self.model.config
        model_json = {"fucina_model_version": MODEL_VERSION, **self.model_config.to_dict()}
        if group.is_writer:
            write_atomically(run.path / MODEL_CONFIG_FILE, json.dumps(model_json, indent=2) + "\n")
        self._configure_model_switches()

        model_context = self.model_config.context_length
        self.context_length = config.data.context_length or model_context
        if self.context_length > model_context:
            raise ConfigError(
                f"data.context_length {self.context_length} exceeds the model's {model_context}"
            )
        if self.frozen_context is not None and self.context_length > self.frozen_context:
            raise ConfigError(
                f"the {self.stage.frozen_model} model holds {self.frozen_context} tokens of context, fewer "
                f"than this run's {self.context_length}; set data.context_length or model.context_length"
            )
        config = self.config = _keep_global_batch(config, checkpoint, group)
        self.global_rows = config.train.batch_size * config.train.grad_accum * group.world_size
        shard = DataShard(rank=group.rank, world_size=group.world_size)
        self.data: StageData = group.writer_first(
            lambda: self.stage.build_data(config, run.path, self.tokenizer, self.context_length, shard)
        )
        log.info("data: %s", self.data.summary)
        prepare = getattr(self.objective, "prepare", None)  # one-off work on the data (DPO's reference)
        if prepare is not None:
            group.writer_first(lambda: prepare(self.data, run.path, self.device))

        self.total_steps = self._total_steps()
        plan_data(self.data.train, config, self.total_steps)  # curriculum windows, mixture phases
        self.schedule: LRSchedule = build_schedule(config.schedule, config.optim.lr, self.total_steps)
        self.optimizer, groups = build_optimizer(self.model, config.optim)
        log.info(
            "%s: weight decay on %d tensors, none on %d (embeddings, norms, biases)%s",
            config.optim.name,
            len(groups.decay),
            len(groups.no_decay),
            f"; LeRaC over {len(self.optimizer.param_groups)} groups" if config.optim.lerac.enabled else "",
        )
        self.average: WeightAverage | None = None
        self.published_weights = "raw"  # which weights the last evaluation chose for best/ and final/
        if config.averaging.kind != "none":
            start = averaging_start_step(config.averaging, self.total_steps, self.schedule.decay_start)
            self.average = WeightAverage(self.model, config.averaging, start)
            log.info("weight averaging: %s from step %d", config.averaging.kind, start)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.progress = Progress()
        self.timing = LoopTiming()
        if checkpoint is not None:
            self._restore(checkpoint)
        self.metrics = MetricsLogger(
            run.path,
            config.stage,
            self.progress.step,
            config.log.tensorboard,
            config.log.plot,
            enabled=group.is_writer,
        )

    def _load_frozen_model(self) -> Transformer | None:
        """The stage's reference or teacher model, frozen on the device; None if the stage needs none."""
        role = self.stage.frozen_model
        self.frozen_context: int | None = None  # the frozen model's context, checked against the run's
        if role is None:
            return None
        path = self.config.distill.teacher if role == "teacher" else self.config.dpo.reference
        if role == "teacher" and path is None and self.config.distill.teacher_topk is not None:
            return None  # offline distillation from a finished top-k cache: no teacher model
        path = path or self.config.init_from
        if path is None:
            raise ConfigError(f"stage {self.config.stage} needs a {role} model and none is configured")
        # A bf16 teacher halves its memory; the reference stays fp32 like the policy's master weights, so
        # the two agree exactly at the first step (h = 0, loss ln 2).
        bf16 = role == "teacher" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        with torch.random.fork_rng(devices=[]):  # building it must not move the run's random stream
            model, tokenizer = load_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)
        if tokenizer.backend.get_vocab() != self.tokenizer.backend.get_vocab():
            raise TokenizerError(
                f"the {role} {path} has a different tokenizer (vocabulary or ids) from this run's; "
                f"{self.config.stage} needs one shared tokenizer"
            )
        model.eval().requires_grad_(False)
        self.frozen_context = model.config.context_length
        log.info("%s model: %s", role, path)
        return model.to(self.device)

    def _configure_model_switches(self) -> None:
        train = self.config.train
        if train.gradient_checkpointing:
            apply_activation_checkpointing(self.model)
        wrapped = wrap_model(self.model, self.group, self.device, self.amp_dtype == torch.bfloat16)
        self.forward = maybe_compile(wrapped, train.compile)

    def _total_steps(self) -> int:
        train = self.config.train
        steps = []
        if train.max_steps is not None:
            steps.append(train.max_steps)
        if train.epochs is not None:
            data = self.data.train
            steps.append(epochs_to_steps(train.epochs, data.batches_per_epoch, data.micro_batches_per_step))
        return min(steps)

    # --- state ---

    def _trainer_state(self) -> dict[str, Any]:
        progress = asdict(self.progress)
        progress["position"] = [self.progress.position.epoch, self.progress.position.index]
        progress["source_positions"] = {k: list(v) for k, v in self.progress.position.sources.items()}
        return {
            "global_rows": self.global_rows,  # fixed at the start: resuming elsewhere keeps it
            # Several processes: the optimizer's state is in the DCP shards (train/sharded_checkpoint.py).
            "optimizer": None if self.group.distributed else self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "averaging": self.average.state_dict() if self.average is not None else None,
            "rng": _rng_state(),
            "progress": progress,
        }

    def _restore(self, checkpoint) -> None:
        state = checkpoint.trainer_state
        if checkpoint.sharded:
            if not self.group.distributed:
                raise ConfigError(
                    f"{checkpoint.path} was saved by dist.strategy {state.get('strategy', 'ddp/fsdp')}; "
                    "resume it with the same dist.strategy (any number of processes)"
                )
            load_sharded_state(checkpoint.path, self.model, self.optimizer)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.average is not None and state.get("averaging"):
            self.average.load_state_dict(state["averaging"])
        progress = dict(state["progress"])
        epoch, index = progress.pop("position")
        sources = {k: (int(e), int(i)) for k, (e, i) in progress.pop("source_positions", {}).items()}
        self.progress = Progress(**progress, position=DataPosition(int(epoch), int(index), sources))
        _set_rng_state(
            load_rank_rng(checkpoint.path, self.group.rank) if checkpoint.sharded else state["rng"]
        )

    def _save_checkpoint(self) -> None:
        if self.group.distributed:
            save_sharded_checkpoint(
                self.run.checkpoints,
                self.progress.step,
                self.model,
                self.optimizer,
                {**self._trainer_state(), "strategy": self.group.strategy},
                _rng_state(),
                self.group,
                self.config.checkpoint.keep_last,
            )
            return
        path = save_checkpoint(
            self.run.checkpoints,
            self.progress.step,
            trainable_state_dict(self.model),
            self._trainer_state(),
            self.config.checkpoint.keep_last,
        )
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        # A LoRA run reports its (adapter-only) checkpoint size; others keep the quiet debug line.
        log.log(logging.INFO if self.config.lora else logging.DEBUG, "checkpoint %s: %.2f MiB", path, size)

    def _publish(self, name: str, result: EvalResult | None, weights: str = "raw") -> None:
        """Write best/ or final/ from the raw weights or the averaged ones (`weights`).

        Under FSDP every rank takes part in gathering the full weights; rank 0 alone writes."""
        model = gathered_model(self.model, self.model_config) if self.group.strategy == "fsdp" else self.model
        if not self.group.is_writer:
            return

        def write(directory: Path) -> None:
            averaged = weights == "averaged" and self.average is not None and self.average.active
            with self.average.swapped_in() if averaged else contextlib.nullcontext():
                save_trained_model(model, directory, self.config.init_from, self.config.lora)
            self.tokenizer.save(directory)

        info = {
            "stage": self.config.stage,
            "step": self.progress.step,
            "template": self.tokenizer.template.name,
            "weights": weights,
            **(_eval_values(result) if result else {}),
        }
        publish_model_dir(self.run, name, write, info)

    def _learning_rates(self, step: int) -> list[float]:
        """Each optimizer group's rate at `step`: the schedule's, times LeRaC's factor for its depth."""
        lr = self.schedule.lr_at(step)
        lerac, peak = self.config.optim.lerac, self.config.optim.lr
        return [
            lr * lerac_factor(lerac, peak, group.get("depth", 0), step)
            for group in self.optimizer.param_groups
        ]

    def _group_rates(self, step: int) -> dict[str, float]:
        """Per-group rates for the logs (LeRaC only: otherwise every group has the schedule's rate)."""
        if not self.config.optim.lerac.enabled:
            return {}
        names = [group["name"] for group in self.optimizer.param_groups]
        return {f"lr/{name}": rate for name, rate in zip(names, self._learning_rates(step))}

    # --- steps ---

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self) -> tuple[float, int, int, float, dict[str, float]]:
        """One optimizer step; returns (summed loss, supervised tokens, input tokens, grad norm, the
        objective's extra values summed over the step's micro-batches)."""
        config = self.config
        step = self.progress.step + 1
        lr = self.schedule.lr_at(step)
        for group, rate in zip(self.optimizer.param_groups, self._learning_rates(step)):
            group["lr"] = rate
        micro_batches, position = self.data.train.next_step(self.progress.position, step)
        # The step's normaliser: the supervised tokens of the GLOBAL batch, summed over ranks; the world
        # size undoes DDP's and FSDP's averaging of the gradients over ranks.
        local = sum(self.objective.supervised_count(b) for b in micro_batches)
        supervised = int(self.group.sum([local])[0])
        scale = self.group.world_size
        loss_total, tokens = 0.0, 0
        logs: dict[str, float] = {}
        unit_sums: dict[str, float] = {}
        for batch in micro_batches:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self._autocast():
                output = self.objective(self.forward, batch)
            loss = output.loss_sum * scale / max(supervised, 1)
            aux = self.model.auxiliary_loss() if hasattr(self.model, "auxiliary_loss") else None
            if aux is not None and torch.is_tensor(aux) and aux.requires_grad:
                loss = loss + aux / config.train.grad_accum
            self.scaler.scale(loss).backward()
            loss_total += float(output.loss_sum.detach())
            for key, value in output.logs.items():
                logs[key] = logs.get(key, 0.0) + value
            for key, value in output.unit_sums.items():
                unit_sums[key] = unit_sums.get(key, 0.0) + value
            tokens += batch["input_ids"].numel()
        if self.group.distributed:  # the step's values over the whole global batch
            keys = sorted(unit_sums)
            loss_total, tokens, *sums = self.group.sum([loss_total, tokens, *(unit_sums[k] for k in keys)])
            tokens, unit_sums = int(tokens), dict(zip(keys, sums, strict=True))
        logs.update({key: value / max(supervised, 1) for key, value in unit_sums.items()})
        if not math.isfinite(loss_total) and self.amp_dtype != torch.float16:
            raise TrainingDivergedError(
                f"the loss became {loss_total} at step {step} (learning rate {lr:.3g} too high?); "
                f"the last checkpoint in {self.run.checkpoints} is intact"
            )
        self.scaler.unscale_(self.optimizer)
        clip = config.optim.grad_clip if config.optim.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.average is not None:
            self.average.update(step)
        self.progress.step = step
        self.progress.position = position
        self.progress.tokens_seen += tokens
        return loss_total, supervised, tokens, grad_norm, logs

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> EvalResult:
        """Validation loss (nats/token), perplexity and bits per byte."""
        self.model.eval()
        nats, count, num_bytes = 0.0, 0, 0.0
        logs: dict[str, float] = {}
        batches = list(self.data.val.batches(max_batches or self.config.eval.max_batches))  # this rank's
        # FSDP gathers weights inside every forward: all ranks must run as many (extras are discarded).
        # DDP evaluates on the bare module, which runs no collective.
        forward = self.forward if self.group.strategy == "fsdp" else self.model
        extra = 0
        if self.group.strategy == "fsdp":
            if -self.group.max(-len(batches)) == 0:
                raise ConfigError(
                    f"too few validation batches for {self.group.world_size} processes: raise eval.max_batches "
                    "or data.val_fraction so every rank has one"
                )
            extra = self.group.max(len(batches)) - len(batches)
        try:
            for number, (batch, batch_bytes) in enumerate(batches + batches[-1:] * extra):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with self._autocast():
                    output = self.objective(forward, batch)
                if number >= len(batches):  # a padding forward of FSDP
                    continue
                nats += float(output.loss_sum)
                count += output.count
                for key, value in output.unit_sums.items():
                    logs[key] = logs.get(key, 0.0) + value
                num_bytes += batch_bytes
        finally:
            self.model.train()
        if self.group.distributed:  # sums over every rank's share of the validation data
            keys = self.group.broadcast(sorted(logs))
            nats, count, num_bytes, *sums = self.group.sum(
                [nats, count, num_bytes, *(logs.get(k, 0.0) for k in keys)]
            )
            count, logs = int(count), dict(zip(keys, sums, strict=True))
        loss = nats / max(count, 1)
        return EvalResult(
            val_loss=loss,
            val_ppl=math.exp(min(loss, 50.0)),
            val_bpb=nats / LN2 / max(num_bytes, 1.0),
            val_tokens=count,
            objective={key: value / max(count, 1) for key, value in logs.items()},
        )

    def _evaluate_published(self) -> tuple[EvalResult, dict[str, Any]]:
        """Evaluate the raw weights and, once averaging has started, the averaged ones; return the result
        of the weights `averaging.publish` picks and the values to log beside it."""
        raw = self.evaluate()
        if self.average is None:
            return raw, {}
        extra: dict[str, Any] = {"raw_val_loss": raw.val_loss, "raw_val_bpb": raw.val_bpb}
        averaged = None
        if self.average.active:
            with self.average.swapped_in():
                averaged = self.evaluate()
            extra.update(averaged_val_loss=averaged.val_loss, averaged_val_bpb=averaged.val_bpb)
        publish = self.config.averaging.publish
        use_averaged = averaged is not None and (
            publish == "averaged" or (publish == "best" and averaged.val_loss < raw.val_loss)
        )
        self.published_weights = "averaged" if use_averaged else "raw"
        extra["weights"] = self.published_weights
        return (averaged if use_averaged else raw), extra

    def _after_eval(self, result: EvalResult, train_loss: float | None, extra: dict[str, Any]) -> None:
        """Best/early-stopping bookkeeping and the log record of one evaluation of the published weights."""
        p, e = self.progress, self.config.eval
        improved = result.val_loss < p.best_val_loss - e.min_delta
        if improved:
            p.best_val_loss, p.best_step, p.evals_without_improvement = result.val_loss, p.step, 0
            self._publish(BEST_DIR, result, self.published_weights)
        else:
            p.evals_without_improvement += 1
        p.last_eval_step = p.step
        if e.early_stopping_patience is not None and p.evals_without_improvement >= e.early_stopping_patience:
            p.stopped_early = True
            log.info(
                "early stopping at step %d: no improvement in %d evaluations (best %.4f at step %d)",
                p.step,
                p.evals_without_improvement,
                p.best_val_loss,
                p.best_step,
            )
        record = {
            "epoch": round(self.data.train.epochs_done(p.position), 4),
            "tokens_seen": p.tokens_seen,
            "train_loss": train_loss,
            **_eval_values(result),
            **extra,
            "lr": self.schedule.lr_at(p.step),
            "elapsed_s": round(p.train_seconds, 2),
            "is_best": improved,
        }
        self.metrics.log_eval(p.step, record, self._stats_progress(finished=False))
        log.info(
            "step %d/%d: val loss %.4f, ppl %.2f, bpb %.4f%s",
            p.step,
            self.total_steps,
            result.val_loss,
            result.val_ppl,
            result.val_bpb,
            " (best)" if improved else "",
        )

    def _stats_progress(self, finished: bool) -> dict[str, Any]:
        p = self.progress
        return {
            "step": p.step,
            "total_steps": self.total_steps,
            "tokens_seen": p.tokens_seen,
            "train_seconds": round(p.train_seconds, 2),
            "tokens_per_second": round(p.tokens_seen / p.train_seconds, 1) if p.train_seconds else None,
            "stopped_early": p.stopped_early,
            "finished": finished,
        }

    def run_loop(self) -> TrainResult:
        config, p = self.config, self.progress
        eval_every, ckpt_every, log_every = config.eval.every, config.checkpoint.every, config.log.every
        last_result: EvalResult | None = None
        interval_seconds, interval_tokens, interval_loss, interval_supervised = 0.0, 0, 0.0, 0
        bar = tqdm(
            total=self.total_steps,
            initial=p.step,
            unit="step",
            dynamic_ncols=True,
            disable=not config.log.progress or not self.group.is_writer,
            desc=config.stage,
        )
        self.model.train()
        with logging_redirect_tqdm(), bar:
            while p.step < self.total_steps and not p.stopped_early:
                started = time.perf_counter()
                aside = 0.0  # seconds of evaluation and checkpointing in this iteration
                loss_sum, supervised, tokens, grad_norm, objective_logs = self.train_step()
                if not self.timing.step_seconds:
                    state_mib = optimizer_state_bytes(self.optimizer) / 2**20
                    log.info("optimizer state: %.2f MiB (%s)", state_mib, config.optim.name)
                seconds = time.perf_counter() - started
                p.train_seconds += seconds
                p.window_loss_sum += loss_sum
                p.window_tokens += supervised
                interval_seconds += seconds
                interval_tokens += tokens
                interval_loss += loss_sum
                interval_supervised += supervised
                bar.update(1)
                if p.step % log_every == 0 or p.step == self.total_steps:
                    # Mean loss per supervised token and training throughput (evaluations excluded).
                    loss = interval_loss / max(interval_supervised, 1)
                    speed = interval_tokens / max(interval_seconds, 1e-9)
                    interval_seconds, interval_tokens, interval_loss, interval_supervised = 0.0, 0, 0.0, 0
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{speed:,.0f}")
                    self.metrics.log_train(
                        p.step,
                        {
                            "loss": loss,
                            "lr": self.schedule.lr_at(p.step),
                            **self._group_rates(p.step),
                            "grad_norm": grad_norm,
                            "tokens_per_s": speed,
                            "tokens_seen": p.tokens_seen,
                            "epoch": round(self.data.train.epochs_done(p.position), 4),
                            **objective_logs,  # the last step's
                        },
                        collect_routing_statistics(self.model),
                    )
                last = p.step == self.total_steps
                if (eval_every and p.step % eval_every == 0) or last:
                    eval_started = time.perf_counter()
                    train_loss = p.window_loss_sum / max(p.window_tokens, 1)
                    p.window_loss_sum, p.window_tokens = 0.0, 0
                    last_result, extra = self._evaluate_published()
                    self._after_eval(last_result, train_loss, extra)
                    elapsed = time.perf_counter() - eval_started
                    aside, self.timing.eval_seconds = aside + elapsed, self.timing.eval_seconds + elapsed
                if (ckpt_every and p.step % ckpt_every == 0) or last or p.stopped_early:
                    checkpoint_started = time.perf_counter()
                    self._save_checkpoint()
                    elapsed = time.perf_counter() - checkpoint_started
                    aside, self.timing.checkpoint_seconds = (
                        aside + elapsed,
                        self.timing.checkpoint_seconds + elapsed,
                    )
                self.timing.step_seconds.append(time.perf_counter() - started - aside)
                if self.kill_after_step is not None and p.step == self.kill_after_step:
                    os.kill(os.getpid(), signal.SIGKILL)
        if last_result is None and p.last_eval_step != p.step:
            last_result, extra = self._evaluate_published()
            self._after_eval(last_result, None, extra)
        elif last_result is None:
            last_result = self._last_logged_eval()
        if self.group.broadcast(not self.run.best.exists()):  # one answer for every rank
            self._publish(BEST_DIR, last_result, self.published_weights)
        self._publish(FINAL_DIR, last_result, self.published_weights)
        self.metrics.write_stats(self._stats_progress(finished=True))
        self.metrics.close()
        best = self.metrics.stats.get("best") or {}
        return TrainResult(
            run_dir=self.run.path,
            steps=p.step,
            total_steps=self.total_steps,
            best_val_loss=p.best_val_loss,
            best_val_bpb=best.get("val_bpb"),
            last_eval=last_result,
            stopped_early=p.stopped_early,
            tokens_per_second=p.tokens_seen / p.train_seconds if p.train_seconds else 0.0,
            train_seconds=p.train_seconds,
            timing=self.timing,
        )

    def _last_logged_eval(self) -> EvalResult | None:
        evals = self.metrics.stats.get("evals") or []
        if not evals:
            return None
        last = evals[-1]
        self.published_weights = last.get("weights", "raw")
        return EvalResult(last["val_loss"], last["val_ppl"], last["val_bpb"], last["val_tokens"])


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool | None = None,
    overwrite: bool = False,
    kill_after_step: int | None = None,
) -> TrainResult:
    """Train one stage into `run_dir` (resuming it if it holds this run); see the module docstring.

    File-system failures (disk full, permissions) become one RunDirectoryError line naming the file.
    """
    group, device_name = start_process_group(config.dist.strategy, config.train.device, config.dist.timeout_s)
    if not group.is_writer:  # rank 0 speaks for the run
        logging.getLogger("fucina").setLevel(logging.WARNING)
    try:
        run, checkpoint = _open_run(run_dir, config, resume, overwrite, group)
        try:
            trainer = Trainer(config, run, checkpoint, kill_after_step, group, device_name)
            result = trainer.run_loop()
            group.finish()  # before the group goes: see process_group._LAST_WORK
            return result
        except RuntimeError as err:
            failure = peer_failure(err, group, str(run.checkpoints))
            if failure is None:
                raise
            exit_after_peer_failure(failure)
        finally:
            run.release()
    except OSError as err:
        where = err.filename or run_dir
        raise RunDirectoryError(
            f"{where}: {err.strerror or err} (files already in {run_dir} are intact)"
        ) from None
    finally:
        stop_process_group()


def _keep_global_batch(
    config: TrainConfig, checkpoint: Checkpoint | None, group: ProcessGroup
) -> TrainConfig:
    """The config with grad_accum set so the global batch is the one the run started with.

    A run resumed by another number of processes keeps its global batch (batch_size x grad_accum x
    world_size at its start) by changing how many micro-batches each rank accumulates."""
    train = config.train
    saved = checkpoint.trainer_state.get("global_rows") if checkpoint is not None else None
    if saved is None or saved == train.batch_size * train.grad_accum * group.world_size:
        return config
    per_pass = train.batch_size * group.world_size
    if saved % per_pass:
        raise ConfigError(
            f"this run's global batch is {saved} rows, which {group.world_size} process(es) x "
            f"train.batch_size {train.batch_size} cannot divide; resume with a world size that divides it"
        )
    log.info(
        "global batch of %d rows on %d process(es): grad_accum %d", saved, group.world_size, saved // per_pass
    )
    return replace(config, train=replace(train, grad_accum=saved // per_pass))


def _open_run(
    run_dir: str | Path, config: TrainConfig, resume: bool | None, overwrite: bool, group: ProcessGroup
) -> tuple[RunDirectory, Checkpoint | None]:
    """Rank 0 opens (locks, checks, resumes) the run directory; the others follow its decision."""
    if not group.distributed:
        return open_run_directory(run_dir, config, resume, overwrite)
    opened, failure = None, None
    if group.is_writer:
        try:
            opened = open_run_directory(run_dir, config, resume, overwrite)
        except FucinaError as err:
            failure = err
    checkpoint_path = opened[1].path if opened and opened[1] is not None else None
    decision = group.broadcast((str(failure) if failure else None, checkpoint_path))
    if failure is not None:
        raise failure
    if decision[0] is not None:
        raise RunDirectoryError(f"rank 0 could not open {run_dir}: {decision[0]}")
    if opened is not None:
        return opened
    return RunDirectory(run_dir), (load_checkpoint(decision[1]) if decision[1] is not None else None)
