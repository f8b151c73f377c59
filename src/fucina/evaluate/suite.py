"""Run a list of evaluations by name and gather one report: the engine behind `fucina eval`.

Task names:
- `bpb`: loss, perplexity and bits per byte on the held-out documents of `splits.json` (ELTeC novels,
  Wikipedia passages) and on the assistant turns of the held-out XPersona-it chats.
- `tokenizer`: characters and bytes per token of the tokenizer on the same held-out texts (no model).
- a built-in multiple-choice task (`italic`, `exams`, `xcopa`, `itacola`, `fever`) or a task YAML path.
- a .txt / .jsonl file (optionally .xz/.gz): intrinsic metrics on it (chat JSONL: assistant tokens).

`limit` samples N items of each multiple-choice task (seeded) and keeps the first N documents of each
intrinsic or tokenizer source.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from fucina.errors import ConfigError
from fucina.evaluate.heldout import HELDOUT_SOURCES, heldout_conversations, heldout_texts
from fucina.evaluate.intrinsic import IntrinsicResult, evaluate_conversations, evaluate_file, evaluate_texts
from fucina.evaluate.loglikelihood import DEFAULT_BATCH_TOKENS
from fucina.evaluate.multiple_choice import evaluate_task
from fucina.evaluate.report import ScoreRow, rows_to_dicts
from fucina.evaluate.runtime import context_length_of
from fucina.evaluate.tokenizer_report import tokenizer_report
from fucina.tokenizer import FucinaTokenizer

logger = logging.getLogger(__name__)

INTRINSIC_TASK = "bpb"
TOKENIZER_TASK = "tokenizer"
DEFAULT_TASKS = ("bpb", "italic", "exams", "xcopa", "itacola", "fever")
TEXT_FILE_SUFFIXES = (".txt", ".jsonl", ".txt.xz", ".txt.gz", ".jsonl.xz", ".jsonl.gz")


@dataclass
class EvalSettings:
    """How every task of a run is evaluated."""

    data_dir: str | None = None
    shots: int = 0
    limit: int | None = None
    seed: int = 0
    batch_size: int | None = None  # rows per forward; None: as many as batch_tokens allows
    batch_tokens: int = DEFAULT_BATCH_TOKENS  # token slots per forward, padding included
    stride: int | None = None
    bf16: bool | None = None  # None: bf16 for multiple choice where native, fp32 for bits per byte
    show_progress: bool = True


@dataclass
class EvaluationReport:
    """All rows of a run, per-task details and timings."""

    rows: list[ScoreRow] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    settings: EvalSettings = field(default_factory=EvalSettings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "results": rows_to_dicts(self.rows),
            "details": self.details,
            "seconds": self.seconds,
        }


def parse_task_list(text: str) -> list[str]:
    """`"bpb, italic,my.yaml"` -> ["bpb", "italic", "my.yaml"]; ConfigError when empty."""
    tasks = [name.strip() for name in text.split(",") if name.strip()]
    if not tasks:
        raise ConfigError("--tasks is empty; e.g. --tasks bpb,italic,xcopa")
    return tasks


def is_text_file_task(name: str) -> bool:
    return name.lower().endswith(TEXT_FILE_SUFFIXES)


def needs_model(tasks: Sequence[str]) -> bool:
    return any(task != TOKENIZER_TASK for task in tasks)


def _intrinsic_rows(task: str, result: IntrinsicResult) -> list[ScoreRow]:
    return [
        ScoreRow(task, "bits_per_byte", result.bits_per_byte, n=result.bytes),
        ScoreRow(task, "loss", result.loss, n=result.tokens),
        ScoreRow(task, "perplexity", result.perplexity, n=result.tokens),
    ]


def _windows_per_batch(model: nn.Module, settings: EvalSettings) -> int:
    """Bits-per-byte windows per forward: `batch_size`, else as many context windows as batch_tokens holds."""
    if settings.batch_size is not None:
        return settings.batch_size
    return max(1, settings.batch_tokens // context_length_of(model))


def _heldout_intrinsic(
    model: nn.Module, tokenizer: FucinaTokenizer, settings: EvalSettings, report: EvaluationReport
) -> None:
    options = dict(
        stride=settings.stride,
        batch_size=_windows_per_batch(model, settings),
        bf16=settings.bf16 is True,
        show_progress=settings.show_progress,
    )
    for source, (_, kind) in HELDOUT_SOURCES.items():
        name = f"{INTRINSIC_TASK}/{source}"
        if kind == "chat":
            conversations = heldout_conversations(settings.data_dir, source)[: settings.limit]
            result = evaluate_conversations(model, tokenizer, conversations, name=name, **options)
        else:
            texts = heldout_texts(settings.data_dir, source)[: settings.limit]
            result = evaluate_texts(model, tokenizer, texts, name=name, **options)
        report.rows += _intrinsic_rows(name, result)
        report.details[name] = result.to_dict()


def run_evaluation(
    tasks: Sequence[str],
    model: nn.Module | None = None,
    tokenizer: FucinaTokenizer | None = None,
    settings: EvalSettings | None = None,
    tokenizer_path: str | Path | None = None,
) -> EvaluationReport:
    """Evaluate `tasks` in order (see the module doc for the names) and gather one report.

    The tokenizer report measures `tokenizer_path` when given, else `tokenizer`.
    """
    settings = settings or EvalSettings()
    report = EvaluationReport(settings=settings)
    for task in tasks:
        started = time.perf_counter()
        if task == TOKENIZER_TASK:
            measured = tokenizer_path if tokenizer_path is not None else tokenizer
            if measured is None:
                raise ConfigError("the 'tokenizer' task needs --tokenizer PATH or --model")
            for stats in tokenizer_report(measured, settings.data_dir, limit=settings.limit):
                report.rows += stats.rows(TOKENIZER_TASK)
                report.details[f"{TOKENIZER_TASK}/{stats.source}"] = stats.to_dict()
        elif model is None or tokenizer is None:
            raise ConfigError(f"task '{task}' needs a model (--model PATH)")
        elif task == INTRINSIC_TASK:
            _heldout_intrinsic(model, tokenizer, settings, report)
        elif is_text_file_task(task):
            name = f"{INTRINSIC_TASK}/{Path(task).name}"
            result = evaluate_file(
                model,
                tokenizer,
                task,
                limit=settings.limit,
                name=name,
                stride=settings.stride,
                batch_size=_windows_per_batch(model, settings),
                bf16=settings.bf16 is True,
                show_progress=settings.show_progress,
            )
            report.rows += _intrinsic_rows(name, result)
            report.details[name] = result.to_dict()
        else:
            result = evaluate_task(
                model,
                tokenizer,
                task,
                data_dir=settings.data_dir,
                shots=settings.shots,
                limit=settings.limit,
                seed=settings.seed,
                batch_tokens=settings.batch_tokens,
                batch_size=settings.batch_size,
                bf16=settings.bf16,
                show_progress=settings.show_progress,
            )
            report.rows += result.rows
            seconds = time.perf_counter() - started
            report.details[result.name] = {
                **result.to_dict(),
                "items_per_second": len(result.questions) / seconds,
            }
        report.seconds[task] = round(time.perf_counter() - started, 3)
        logger.info("%s done in %.1f s", task, report.seconds[task])
    return report
