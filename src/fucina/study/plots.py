"""PNG plots of the depth-versus-width study (matplotlib, headless Agg backend).

- `loss_curves.png`: validation bits per byte against training FLOPs spent, one line per shape. FLOPs,
  not steps or tokens, on the x axis because compute is what every run was given in equal measure.
- `bpb_vs_depth.png`: final validation bits per byte against depth; the fixed-parameter sweep as a line,
  the four configurations of the original study as labelled points.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def _finish(figure, axis, path: Path) -> Path:
    """Grid, legend and layout shared by the study's plots; the PNG is written and the figure closed."""
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_loss_curves(records: list[dict[str, Any]], path: Path) -> Path:
    """Validation bpb vs training FLOPs, one line per run."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for record in records:
        curve = record["curve"]
        flops = [point["tokens_seen"] * record["flops_per_token"] for point in curve]
        label = f"{record['name']} ({', '.join(record['labels'])})"
        axis.plot(flops, [point["val_bpb"] for point in curve], marker="o", markersize=3, label=label)
    axis.set_xlabel("training FLOPs")
    axis.set_ylabel("validation bits per byte")
    axis.set_title("Depth vs width: validation bpb during training (equal compute)")
    return _finish(figure, axis, path)


def plot_bpb_vs_depth(records: list[dict[str, Any]], path: Path) -> Path:
    """Final validation bpb vs depth: the sweep at fixed parameters as a line, the four configs as points."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    sweep = sorted(
        (r for r in records if any(label.startswith("SWEEP-") for label in r["labels"])),
        key=lambda r: r["n_layers"],
    )
    if sweep:
        params = sum(r["non_embedding_params"] for r in sweep) / len(sweep) / 1e6
        axis.plot(
            [r["n_layers"] for r in sweep],
            [r["val_bpb"] for r in sweep],
            marker="o",
            label=f"sweep at ~{params:.2f}M non-embedding params",
        )
        for r in sweep:
            axis.annotate(
                f"d={r['d_model']}",
                (r["n_layers"], r["val_bpb"]),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
    for record in records:
        named = [label for label in record["labels"] if not label.startswith("SWEEP-")]
        if named:
            axis.scatter([record["n_layers"]], [record["val_bpb"]], marker="s", zorder=3)
            axis.annotate(
                f"{'/'.join(named)} {record['name']}",
                (record["n_layers"], record["val_bpb"]),
                fontsize=7,
                xytext=(4, -10),
                textcoords="offset points",
            )
    depths = sorted({r["n_layers"] for r in records})
    axis.set_xscale("log", base=2)
    axis.set_xticks(depths, [str(d) for d in depths])
    axis.minorticks_off()
    axis.set_xlabel("layers (log scale)")
    axis.set_ylabel("final validation bits per byte")
    axis.set_title("Depth vs width at equal compute")
    return _finish(figure, axis, path)
