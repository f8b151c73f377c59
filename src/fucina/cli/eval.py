"""`fucina eval`: intrinsic metrics, Italian multiple-choice benchmarks and the tokenizer report.

    fucina eval --model runs/x --tasks bpb,italic,exams,xcopa,itacola,fever [--shots 0] [--limit N]
                [--batch-tokens 8192] [--batch-size N] [--data-dir DIR] [--out results.json]
    fucina eval --tokenizer runs/x/best --tasks tokenizer      # no model needed
    fucina eval --list-tasks

The tokenizer report is the task `tokenizer` of the same command (not a separate subcommand), so one
`--tasks` list can measure a model and its tokenizer together; `--tokenizer PATH` measures any
tokenizer.json (or fucina tokenizer directory) instead of the model's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fucina.errors import ConfigError
from fucina.evaluate.report import format_table, write_json
from fucina.evaluate.suite import DEFAULT_TASKS, EvalSettings, needs_model, parse_task_list, run_evaluation
from fucina.evaluate.task_config import builtin_task_names, load_task_spec


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model: bits per byte, Italian benchmarks, tokenizer report",
        description="Evaluate a model (or only a tokenizer) and print a table of task, metric, score with "
        "its 95%% interval, chance level and n; --out also writes JSON. Tasks: bpb (held-out bits per "
        "byte), tokenizer (chars/bytes per token), the built-in multiple-choice tasks (see --list-tasks), "
        "a task YAML path, or a .txt/.jsonl file to measure bits per byte on.",
    )
    parser.add_argument("--model", type=Path, help="model directory or run directory (uses its best/)")
    parser.add_argument(
        "--tokenizer", type=Path, help="tokenizer to report on (tokenizer.json or a directory holding one)"
    )
    parser.add_argument(
        "--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated tasks (default: %(default)s)"
    )
    parser.add_argument("--shots", type=int, default=0, help="few-shot examples per question (default 0)")
    parser.add_argument(
        "--limit", type=int, help="evaluate a seeded sample of N items per task (first N documents for bpb)"
    )
    parser.add_argument(
        "--batch-tokens",
        type=int,
        default=8192,
        help="tokens per forward pass, padding included (default 8192)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="cap on rows per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of --limit samples and few-shot draws")
    parser.add_argument("--stride", type=int, help="bpb window stride in tokens (default: context length)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="evaluation data root (default $FUCINA_DATA_DIR, else ../shared/data beside the working directory)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score under bf16 autocast (default: on where the hardware computes bf16 natively)",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--list-tasks", action="store_true", help="list the built-in tasks and exit")
    parser.set_defaults(func=run_eval)


def _list_tasks() -> int:
    print("bpb        bits per byte, loss and perplexity on the held-out splits (splits.json)")
    print("tokenizer  characters and bytes per token on the held-out texts")
    for name in builtin_task_names():
        print(f"{name:<10} {load_task_spec(name).description}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    if args.list_tasks:
        return _list_tasks()
    if args.batch_tokens < 1:
        raise ConfigError(f"--batch-tokens must be at least 1, got {args.batch_tokens}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    tasks = parse_task_list(args.tasks)
    model = tokenizer = None
    tokenizer_path = args.tokenizer
    if args.model is None and (needs_model(tasks) or tokenizer_path is None):
        raise ConfigError("--model is required (only `--tasks tokenizer --tokenizer PATH` runs without one)")
    if needs_model(tasks):
        from fucina.model_dir import load_pretrained

        model, tokenizer = load_pretrained(args.model, device=args.device)
    elif tokenizer_path is None:
        from fucina.model_dir import resolve_model_dir

        tokenizer_path = resolve_model_dir(args.model)
    settings = EvalSettings(
        data_dir=str(args.data_dir) if args.data_dir else None,
        shots=args.shots,
        limit=args.limit,
        seed=args.seed,
        batch_size=args.batch_size,
        batch_tokens=args.batch_tokens,
        stride=args.stride,
        bf16=args.bf16,
        show_progress=not args.no_progress,
    )
    started = time.perf_counter()
    report = run_evaluation(tasks, model, tokenizer, settings, tokenizer_path=tokenizer_path)
    seconds = time.perf_counter() - started
    subject = f"model {args.model}" if args.model else f"tokenizer {args.tokenizer}"
    shots = f", {args.shots}-shot" if args.shots else ""
    print(f"{subject}{shots}, seed {args.seed}, {seconds:.1f} s")
    print(format_table(report.rows))
    if args.out:
        data = report.to_dict()
        data["model"] = str(args.model) if args.model else None
        data["tokenizer"] = str(args.tokenizer) if args.tokenizer else None
        write_json(data, args.out)
        print(f"results written to {args.out}")
    return 0
