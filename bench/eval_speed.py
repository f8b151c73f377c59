"""Evaluation speed: multiple-choice questions per second and bits-per-byte tokens per second on CPU.

The model is a PicoDAC-size fucina Transformer (the `picodac` preset: 6 layers, d_model 240, context 64,
4.6M parameters) with a 1920-id tokenizer trained on the built-in prose, or a trained model given with
`--model RUN`. Speed does not depend on what the weights learned, so a freshly initialised model times
the same as a trained one of the same shape. Measured, with `fucina.evaluate` exactly as `fucina eval`
runs it:
- ITALIC: a seeded sample of `--items` questions (zero-shot), scored four ways in the same run, rounds
  interleaved: the shared-context KV-cache path (the default) and the plain path (each choice its own row), each with the defaults (8192-token batches, bf16 autocast where the CPU has native bf16) and with
  the earlier settings (32 rows per batch, fp32); questions/s of each, the speed-ups, and the estimated
  time of a full 10,000-question ITALIC pass with the defaults;
- bits per byte: tokens/s on the first held-out ELTeC novel (cut to `--bpb-chars` characters).
After an untimed warm-up, the best of `--rounds` repeats is reported (the least disturbed by other load on the machine).

    .venv/bin/python bench/eval_speed.py [--quick] [--model RUN] [--items 500] [--batch-size 32]
        [--threads N] [--rounds 3] [--data-dir DIR] [--out bench/results/eval_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from fucina.evaluate.heldout import heldout_texts, resolve_data_dir
from fucina.evaluate.intrinsic import evaluate_texts
from fucina.evaluate.multiple_choice import evaluate_task
from fucina.evaluate.task_config import load_items, load_task_spec
from fucina.model.transformer import Transformer
from fucina.presets import get_preset
from fucina.resources import builtin_chat_file, builtin_prose_files
from fucina.tokenizer import train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
ITALIC_QUESTIONS = 10_000


def picodac_model():
    """A freshly initialised picodac Transformer and a 1920-id picodac tokenizer (built-in corpus)."""
    from fucina.data.readers import iter_texts

    texts = list(iter_texts([*builtin_prose_files(), builtin_chat_file()]))
    tokenizer = train_tokenizer(texts, vocab_size=1920, template="picodac", show_progress=False)
    torch.manual_seed(0)
    config = get_preset("picodac")
    config.vocab_size = max(config.vocab_size, tokenizer.vocab_size)
    return Transformer(config), tokenizer


def best_seconds(work, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: 16 items, 1 round")
    parser.add_argument("--model", type=Path, help="a trained model or run directory (default: picodac)")
    parser.add_argument("--items", type=int, default=500, help="ITALIC questions timed (default 500)")
    parser.add_argument("--bpb-chars", type=int, default=200_000, help="characters of ELTeC for bpb")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch of the fp32 baseline")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument(
        "--out", type=Path, help="JSON results (default bench/results/eval_speed[_quick].json)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.bpb_chars, args.rounds = 16, 5_000, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = resolve_data_dir(args.data_dir)

    if args.model:
        from fucina.model_dir import load_pretrained

        model, tokenizer = load_pretrained(args.model)
    else:
        model, tokenizer = picodac_model()
    params = sum(p.numel() for p in model.parameters())
    spec = load_task_spec("italic")
    total_items = len(load_items(spec, data_dir))
    options = dict(data_dir=data_dir, limit=args.items, batch_size=args.batch_size, show_progress=False)

    variants = {
        "plain": dict(share_context=False),
        "shared_context": dict(share_context=True),
        "plain_fp32_rows": dict(share_context=False, bf16=False, batch_size=args.batch_size),
        "shared_context_fp32_rows": dict(share_context=True, bf16=False, batch_size=args.batch_size),
    }
    # One untimed pass of a few questions down each path first: allocator and kernel warm-up.
    for variant in variants.values():
        evaluate_task(model, tokenizer, spec, **{**options, "limit": 4, **variant})
    seconds = {name: float("inf") for name in variants}
    for _ in range(args.rounds):  # interleaved, so that load changes hit every variant alike
        for name, variant in variants.items():
            seconds[name] = min(
                seconds[name],
                best_seconds(lambda v=variant: evaluate_task(model, tokenizer, spec, **{**options, **v}), 1),
            )
    results = {
        name: {"seconds": round(value, 3), "questions_per_second": round(args.items / value, 2)}
        for name, value in seconds.items()
    }
    speedups = {
        "plain_vs_plain_fp32_rows": round(seconds["plain_fp32_rows"] / seconds["plain"], 2),
        "shared_vs_shared_fp32_rows": round(
            seconds["shared_context_fp32_rows"] / seconds["shared_context"], 2
        ),
        "plain_vs_shared": round(seconds["shared_context"] / seconds["plain"], 2),
    }
    full_minutes = total_items / results["shared_context"]["questions_per_second"] / 60  # the default

    text = heldout_texts(data_dir, "eltec")[0][: args.bpb_chars]
    timed = {}

    def score_bpb() -> None:
        timed["result"] = evaluate_texts(
            model, tokenizer, [text], batch_size=args.batch_size, show_progress=False
        )

    bpb_seconds = best_seconds(score_bpb, args.rounds)
    bpb_tokens = timed["result"].tokens

    report = {
        "benchmark": "eval_speed",
        "quick": args.quick,
        "model": str(args.model) if args.model else "picodac preset, random init",
        "parameters": params,
        "context_length": model.config.context_length,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "torch": torch.__version__,
        "italic": {
            "items_timed": args.items,
            **results,
            "speedups": speedups,
            "full_pass_questions": total_items,
            "full_pass_minutes_estimate": round(full_minutes, 2),
        },
        "bpb": {
            "tokens": bpb_tokens,
            "seconds": round(bpb_seconds, 3),
            "tokens_per_second": round(bpb_tokens / bpb_seconds, 1),
        },
    }
    out = args.out or REPO_ROOT / "bench" / "results" / f"eval_speed{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(
        f"{params / 1e6:.1f}M params, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}: ITALIC "
        + ", ".join(f"{name} {value['questions_per_second']} q/s" for name, value in results.items())
        + f"; speed-ups {speedups}; full pass ~{full_minutes:.1f} min; "
        f"bpb {report['bpb']['tokens_per_second']:,.0f} tokens/s"
    )
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
