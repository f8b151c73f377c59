"""Evaluation speed: multiple-choice questions per second and bits-per-byte tokens per second on CPU.

The model is a PicoDAC-size fucina Transformer (the `picodac` preset: 6 layers, d_model 240, context 64,
4.6M parameters) with a 1920-id tokenizer trained on the built-in prose, or a trained model given with
`--model RUN`. Speed does not depend on what the weights learned, so a freshly initialised model times
the same as a trained one of the same shape. Measured, with `fucina.evaluate` exactly as `fucina eval`
runs it:
- ITALIC: a seeded sample of `--items` questions (zero-shot), scored with the shared-context KV-cache
  path (the default) and with the plain path (each choice its own row); questions/s of each, and the
  estimated time of a full 10,000-question ITALIC pass at the faster rate;
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
    parser.add_argument("--batch-size", type=int, default=32)
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
        from fucina.pretrained import load_pretrained

        model, tokenizer = load_pretrained(args.model)
    else:
        model, tokenizer = picodac_model()
    params = sum(p.numel() for p in model.parameters())
    spec = load_task_spec("italic")
    total_items = len(load_items(spec, data_dir))
    options = dict(data_dir=data_dir, limit=args.items, batch_size=args.batch_size, show_progress=False)

    # One untimed pass of a few questions down each path first: allocator and kernel warm-up.
    for share in (True, False):
        evaluate_task(model, tokenizer, spec, share_context=share, **{**options, "limit": 4})
    results = {}
    for path, share in (("shared_context", True), ("plain", False)):
        seconds = best_seconds(
            lambda share=share: evaluate_task(model, tokenizer, spec, share_context=share, **options),
            args.rounds,
        )
        results[path] = {"seconds": round(seconds, 3), "questions_per_second": round(args.items / seconds, 2)}
    fastest = max(value["questions_per_second"] for value in results.values())
    full_minutes = total_items / fastest / 60

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
        "torch": torch.__version__,
        "italic": {
            "items_timed": args.items,
            **results,
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
        f"{params / 1e6:.1f}M params, {torch.get_num_threads()} threads: ITALIC "
        f"{results['shared_context']['questions_per_second']} q/s shared-context, "
        f"{results['plain']['questions_per_second']} q/s plain; full pass ~{full_minutes:.1f} min; "
        f"bpb {report['bpb']['tokens_per_second']:,.0f} tokens/s"
    )
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
