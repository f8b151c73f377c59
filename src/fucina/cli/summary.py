"""One-paragraph summaries of finished trainings, shared by `fucina train` and `fucina demo`."""

from __future__ import annotations

from pathlib import Path


def format_result(result, dry_run: bool = False) -> str:
    """Steps, speed, last and best validation of a TrainResult, and where its model is."""
    lines = [
        f"{'dry run: ' if dry_run else ''}trained {result.steps}/{result.total_steps} steps in "
        f"{result.train_seconds:.0f} s ({result.tokens_per_second:,.0f} tokens/s)"
        + (", stopped early" if result.stopped_early else "")
    ]
    if result.last_eval is not None:
        e = result.last_eval
        lines.append(
            f"validation: loss {e.val_loss:.4f}, perplexity {e.val_ppl:.2f}, bits/byte {e.val_bpb:.4f}"
        )
    if result.best_val_bpb is not None:
        lines.append(f"best: loss {result.best_val_loss:.4f}, bits/byte {result.best_val_bpb:.4f}")
    if not dry_run:
        lines.append(f"model: {Path(result.run_dir) / 'best'}")
    return "\n".join(lines)
