"""Overhead of the training loop: `fucina train` tokens/s against the model benchmark's raw step.

Same model (the `picodac` preset with a 1920-id tokenizer trained on the built-in corpus), same batch
shape (32 x 64 tokens of the built-in prose), same precision, same thread count, in the same process:
- raw: `bench/model_speed.py`'s training step (forward with the fused LM-head + cross-entropy,
  backward, fused AdamW step, zero_grad) on one fixed batch, nothing else;
- loop: `fucina.train.loop.train` on the same data, i.e. everything a user's run does per step: the
  next batch from the packed shards in the seeded order, the learning-rate schedule, the masked loss
  (sum / supervised tokens), gradient clipping, AdamW with decay/no-decay groups, metrics.jsonl every
  10 steps, the progress-bar bookkeeping (bar hidden). Its window is the loop's own per-iteration wall
  time (`TrainResult.timing.step_seconds`); the single evaluation and checkpoint at the end of each run
  fall outside it and are reported apart (eval.every and checkpoint.every are 0, so none happens inside).
Rounds alternate raw and loop (order flipped every round) so drift in the machine's load hits both; the
first `--warmup` steps of each are not timed; the median over rounds is reported.

    .venv/bin/python bench/loop_overhead.py [--quick] [--threads N] [--steps S] [--rounds R]
        [--out bench/results/loop_overhead.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_speed import fucina_loss, training_run  # noqa: E402  (the model benchmark's raw step, reused as is)

from fucina.data.packing import TokenShards  # noqa: E402
from fucina.data.readers import iter_texts  # noqa: E402
from fucina.model.transformer import Transformer  # noqa: E402
from fucina.presets import get_preset  # noqa: E402
from fucina.resources import builtin_chat_file, builtin_prose_files  # noqa: E402
from fucina.tokenizer import FucinaTokenizer, train_tokenizer  # noqa: E402
from fucina.train.config import config_from_dict  # noqa: E402
from fucina.train.loop import train  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH, LENGTH = 32, 64
AUTOCAST = {"bf16": torch.bfloat16, "fp32": None}


def loop_config(tokenizer_dir: Path, precision: str, steps: int, threads: int) -> dict:
    """The picodac recipe on the built-in prose, with no evaluation or checkpoint inside the window."""
    return {
        "stage": "pretrain",
        "model": {"preset": "picodac"},
        "tokenizer": {"path": str(tokenizer_dir)},
        "data": {"train": ["builtin:prose"], "val_fraction": 0.05},
        "optim": {"lr": 2.0e-3},
        "schedule": {"warmup_steps": 10},
        "train": {
            "batch_size": BATCH,
            "max_steps": steps,
            "precision": precision,
            "device": "cpu",
            "num_threads": threads,
        },
        "eval": {"every": 0, "max_batches": 1},
        "checkpoint": {"every": 0, "keep_last": 1},
        "log": {"every": 10, "progress": False, "tensorboard": False, "plot": False},
    }


def run_loop(workdir: Path, tokenizer_dir: Path, precision: str, warmup: int, steps: int, threads: int):
    run_dir = Path(tempfile.mkdtemp(prefix="loop-", dir=workdir))
    result = train(config_from_dict(loop_config(tokenizer_dir, precision, warmup + steps, threads)), run_dir)
    window = result.timing.step_seconds[warmup:]
    return {
        "tokens_per_s": steps * BATCH * LENGTH / sum(window),
        "end_of_run_eval_s": result.timing.eval_seconds,
        "end_of_run_checkpoint_s": result.timing.checkpoint_seconds,
        "run_dir": run_dir,
    }


def run_raw(vocab_size: int, batch: dict, precision: str, warmup: int, steps: int) -> float:
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(get_preset("picodac"), vocab_size=vocab_size))
    one_step = training_run(model, fucina_loss, (batch["input_ids"], batch["labels"]), 1, AUTOCAST[precision])
    for _ in range(warmup):
        one_step()
    start = time.perf_counter()
    tokens = sum(one_step() for _ in range(steps))
    return tokens / (time.perf_counter() - start)


def table(results: dict) -> str:
    lines = [f"{'picodac 32x64 (cpu)':24s} {'raw step':>14s} {'fucina train':>14s} {'loop/raw':>9s}"]
    for row in results["rows"]:
        lines.append(
            f"{row['precision']:24s} {row['raw_tokens_per_s']:12,.0f}/s {row['loop_tokens_per_s']:12,.0f}/s "
            f"{row['loop_over_raw']:8.2f}x"
        )
    lines.append(
        f"rounds {results['rounds']}, {results['steps']} timed steps each after {results['warmup']} warm-up; "
        f"threads {results['threads']}; load average before/after: {results['load_average_before']} / "
        f"{results['load_average_after']}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps, one round: a smoke test")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--precisions", nargs="+", default=list(AUTOCAST), choices=list(AUTOCAST))
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "loop_overhead.json")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.rounds = 4, 1, 1
    torch.set_num_threads(args.threads)

    results: dict = {
        "benchmark": "loop_overhead",
        "quick": args.quick,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "batch": [BATCH, LENGTH],
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="fucina-loop-bench-") as tmp:
        workdir = Path(tmp)
        tokenizer_dir = workdir / "tokenizer"
        texts = iter_texts([*builtin_prose_files(), builtin_chat_file()])
        train_tokenizer(texts, 1920, template="picodac", show_progress=False).save(tokenizer_dir)
        tokenizer = FucinaTokenizer.load(tokenizer_dir)
        batch = None
        for precision in args.precisions:
            raw_rates, loop_rates, loop_runs = [], [], []
            for round_index in range(args.rounds):
                order = ("loop", "raw") if round_index % 2 == 0 else ("raw", "loop")
                for side in order:
                    if side == "loop":
                        loop = run_loop(
                            workdir, tokenizer_dir, precision, args.warmup, args.steps, args.threads
                        )
                        loop_rates.append(loop["tokens_per_s"])
                        loop_runs.append(loop)
                        if batch is None:  # the loop's own packed prose, the first 32 windows
                            shards = TokenShards(loop["run_dir"] / "data", "train", tokenizer)
                            batch = shards.batch(range(BATCH), LENGTH)
                    else:
                        raw_rates.append(
                            run_raw(tokenizer.vocab_size, batch, precision, args.warmup, args.steps)
                        )
            raw, looped = statistics.median(raw_rates), statistics.median(loop_rates)
            results["rows"].append(
                {
                    "precision": precision,
                    "raw_tokens_per_s": raw,
                    "loop_tokens_per_s": looped,
                    "loop_over_raw": looped / raw,
                    "raw_rounds": raw_rates,
                    "loop_rounds": loop_rates,
                    "end_of_run_eval_s": statistics.median(r["end_of_run_eval_s"] for r in loop_runs),
                    "end_of_run_checkpoint_s": statistics.median(
                        r["end_of_run_checkpoint_s"] for r in loop_runs
                    ),
                }
            )
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
