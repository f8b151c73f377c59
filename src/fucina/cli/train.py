"""`fucina train`: a thin call into fucina.train.

`fucina train --config CONFIG --out DIR` (or `fucina train CONFIG`) trains one stage (pretraining or
chat fine-tuning) as the YAML says; the run directory defaults to runs/<config name>. `--set
section.key=value` overrides any key. Resume policy: a run directory that already holds this run is
resumed from its newest usable checkpoint (the default, or `--resume` to insist on it); `--no-resume`
refuses such a directory unless `--overwrite` moves the old run aside to `DIR.old-<timestamp>` (nothing
is ever deleted). `--dry-run` runs the whole pipeline briefly (a few steps, a tiny evaluation, at most a
few hundred documents) in a temporary directory unless --out is given. `--debug-kill-after-step K` makes
the process SIGKILL itself right after step K (tests use it to check that a killed run resumes
bit-identically).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from fucina.cli.summary import format_result
from fucina.errors import ConfigError

DRY_RUN_DOCUMENTS = 300


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train",
        help="train a model (pretraining or chat fine-tuning) from a YAML config",
        description=__doc__.split("\n\n")[1],
    )
    train.add_argument("config", nargs="?", help="YAML training config (see configs/)")
    train.add_argument(
        "--config", dest="config_option", metavar="CONFIG", help="the YAML config (same as the positional)"
    )
    train.add_argument("--out", help="run directory (default: runs/<config name>)")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.lr=1e-3 (repeatable)",
    )
    resume = train.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        dest="resume",
        action="store_true",
        default=None,
        help="resume the run in --out (error if there is none); the default when one exists",
    )
    resume.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="start afresh; refused on a directory holding a run unless --overwrite",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="with --no-resume: move an existing run aside to DIR.old-<timestamp>",
    )
    train.add_argument("--dry-run", action="store_true", help="run the whole pipeline briefly")
    train.add_argument("--steps", type=int, help="step budget (sets train.max_steps; 20 with --dry-run)")
    train.add_argument(
        "--debug-kill-after-step",
        type=int,
        metavar="K",
        help="testing aid: SIGKILL this process right after step K",
    )
    train.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from fucina.train.config import load_train_config
    from fucina.train.loop import train

    args.config = config_argument(args)
    overrides = list(args.overrides)
    steps = args.steps if args.steps is not None else (20 if args.dry_run else None)
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {steps}")
        overrides += [f"train.max_steps={steps}", "train.epochs=null"]
    if args.dry_run:
        overrides += dry_run_overrides(load_train_config(args.config, overrides))
    config = load_train_config(args.config, overrides)
    temporary = None
    out = args.out
    if out is None and args.dry_run:
        temporary = out = tempfile.mkdtemp(prefix="fucina-dry-run-")
    elif out is None:
        out = str(Path("runs") / Path(args.config).stem)
    try:
        result = train(
            config,
            out,
            resume=args.resume,
            overwrite=args.overwrite,
            kill_after_step=args.debug_kill_after_step,
        )
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        print(format_result(result, dry_run=args.dry_run))
    return 0


def config_argument(args: argparse.Namespace) -> str:
    """The config path, given positionally or as --config (exactly one of the two)."""
    given = [c for c in (args.config, args.config_option) if c is not None]
    if not given:
        raise ConfigError("fucina train needs a config: fucina train --config configs/picodac.yaml")
    if len(given) == 2 and given[0] != given[1]:
        raise ConfigError(f"two configs given ({given[0]} and --config {given[1]}); pass one")
    return given[0]


def dry_run_overrides(config) -> list[str]:
    """Overrides that keep every stage of the pipeline but make each one brief."""
    steps = config.train.max_steps or 20
    documents = min(config.data.max_documents or DRY_RUN_DOCUMENTS, DRY_RUN_DOCUMENTS)
    return [
        f"eval.every={max(1, steps // 2)}",
        "eval.max_batches=2",
        f"checkpoint.every={steps}",
        f"data.max_documents={documents}",
        "log.tensorboard=false",
    ]
