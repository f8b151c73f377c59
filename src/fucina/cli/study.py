"""`fucina study`: experiments that train several models with fucina's loop and compare them.

    fucina study depth-width --budget-minutes 20 --out studies/depth-width
    fucina study prepare-data --out runs/reference/data      # ELTeC + Wikipedia minus held-out docs
    fucina study results --reference-dir runs/reference --out docs/results.md

`depth-width` reruns resume: finished runs are skipped, interrupted ones continue from their checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fucina.errors import ConfigError


def _depths(text: str) -> tuple[int, ...]:
    try:
        depths = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer counts, got {text!r}") from None
    if not depths or min(depths) < 1:
        raise argparse.ArgumentTypeError(f"expected positive layer counts, got {text!r}")
    return depths


def register(subparsers) -> None:
    study = subparsers.add_parser("study", help="run a study (depth vs width) or prepare its data")
    commands = study.add_subparsers(dest="study_command", metavar="STUDY", required=True)

    dw = commands.add_parser(
        "depth-width",
        help="depth vs width at equal compute on Italian text",
        description="Train the four configurations of the 'LLM from scratch' study (REAL 12xW, DEMO 6xW, "
        "DEEP 12xW/2, BALANCED 6xW/2, scaled to the budget) and a sweep over layers at fixed "
        "non-embedding parameters, each for the same training FLOPs; write results.md/json and PNG plots.",
    )
    dw.add_argument("--out", type=Path, default=Path("studies/depth-width"), help="study directory")
    dw.add_argument("--budget-minutes", type=float, default=20.0, help="wall-time budget of the whole study")
    dw.add_argument(
        "--flops-per-run", type=float, help="training FLOPs per run (skips the speed calibration)"
    )
    dw.add_argument("--scale", type=int, help="width divisor of 768 (default: chosen from the budget)")
    dw.add_argument("--sweep-depths", type=_depths, default=(3, 6, 12, 24), help="default 3,6,12,24")
    dw.add_argument("--context-length", type=int, default=128)
    dw.add_argument("--batch-size", type=int, default=16)
    dw.add_argument("--lr", type=float, default=1e-3)
    dw.add_argument("--vocab-size", type=int, default=4096)
    dw.add_argument("--corpus", choices=("auto", "shared", "builtin"), default="auto")
    dw.add_argument("--corpus-chars", type=int, default=4_000_000, help="training characters")
    dw.add_argument("--val-chars", type=int, default=200_000, help="validation characters (held-out docs)")
    dw.add_argument("--eval-batches", type=int, default=16, help="validation batches per evaluation")
    dw.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    dw.add_argument("--device", default="auto")
    dw.add_argument("--seed", type=int, default=0)
    dw.add_argument("--data-dir", type=Path, help="data root (default $FUCINA_DATA_DIR or ../shared/data)")
    dw.add_argument("--no-progress", action="store_true")
    dw.set_defaults(func=run_depth_width)

    prep = commands.add_parser(
        "prepare-data", help="write ELTeC and Wikipedia without their held-out documents as JSONL"
    )
    prep.add_argument("--out", type=Path, default=Path("runs/reference/data"))
    prep.add_argument("--data-dir", type=Path)
    prep.set_defaults(func=run_prepare_data)

    results = commands.add_parser("results", help="write docs/results.md from the reference runs")
    results.add_argument("--reference-dir", type=Path, default=Path("runs/reference"))
    results.add_argument("--out", type=Path, default=Path("docs/results.md"))
    results.set_defaults(func=run_results)


def run_depth_width(args: argparse.Namespace) -> int:
    from fucina.study.depth_width import StudySettings, run_study

    if args.budget_minutes <= 0:
        raise ConfigError(f"--budget-minutes must be > 0, got {args.budget_minutes}")
    settings = StudySettings(
        budget_minutes=args.budget_minutes,
        flops_per_run=args.flops_per_run,
        scale=args.scale,
        sweep_depths=args.sweep_depths,
        context_length=args.context_length,
        batch_size=args.batch_size,
        lr=args.lr,
        vocab_size=args.vocab_size,
        corpus=args.corpus,
        corpus_chars=args.corpus_chars,
        val_chars=args.val_chars,
        eval_batches=args.eval_batches,
        precision=args.precision,
        device=args.device,
        seed=args.seed,
        data_dir=str(args.data_dir) if args.data_dir else None,
        show_progress=not args.no_progress,
    )
    result = run_study(args.out, settings)
    print((result.out / "results.md").read_text(encoding="utf-8"))
    if result.skipped:
        print(f"skipped (finished earlier): {', '.join(result.skipped)}")
    print(f"plots: {', '.join(str(p) for p in result.plots)}")
    return 0


def run_prepare_data(args: argparse.Namespace) -> int:
    from fucina.study.corpus import write_pretraining_corpus

    for source, path in write_pretraining_corpus(args.out, args.data_dir).items():
        print(f"{source}: {path}")
    return 0


def run_results(args: argparse.Namespace) -> int:
    from fucina.errors import DataError
    from fucina.study.reference import write_results_page

    if not args.reference_dir.is_dir():
        raise DataError("reference run directory not found", args.reference_dir)
    print(f"written {write_results_page(args.reference_dir, args.out)}")
    return 0
