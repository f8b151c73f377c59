"""What a run records about itself: metrics.jsonl, train_stats.json, TensorBoard events, plots/loss.png
and plots/lr.png.

Design choices:
- metrics.jsonl is the complete log (one JSON object per line, `"kind": "train"` every `log.every`
  steps and `"kind": "eval"` at each evaluation); train_stats.json is the summary PicoDAC keeps (every
  evaluation, the best one, progress), rewritten atomically at each evaluation.
- On resume, records from steps after the checkpoint are dropped (those steps are trained again), and
  TensorBoard is opened with `purge_step`, so the logs of a resumed run read like an uninterrupted one.
- Mixture-of-experts routing: at each training record the loop asks every module with a callable
  `routing_statistics()` (fucina's MoE layers) for the tokens routed to each expert in the last forward
  (with gradient accumulation, the step's last micro-batch). The counts go into metrics.jsonl as
  `tokens_per_expert: {layer: [counts]}` and into TensorBoard as each expert's share of its layer's
  assignments, plus the busiest expert's load over the mean (1 = balanced), so collapse shows early.
  A model without such modules logs nothing extra.
- The plot uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch) and
  is replaced atomically, so a viewer never sees half a PNG.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from fucina.fsutil import write_atomically

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
STATS_FILE = "train_stats.json"
TENSORBOARD_DIR = "tb"
PLOT_FILE = Path("plots") / "loss.png"
LR_PLOT_FILE = Path("plots") / "lr.png"


def collect_routing_statistics(model: nn.Module) -> dict[str, list[int]]:
    """Tokens per expert of the last forward, per routing module: {module name: [count per expert]}.

    A module's `routing_statistics()` may return a list of counts (named after the module), a mapping
    {name: counts} (taken as is), or None (skipped).
    """
    collected: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        method = getattr(module, "routing_statistics", None)
        if not callable(method):
            continue
        stats = method()
        if stats is None:
            continue
        if isinstance(stats, dict):
            collected.update({str(k): [int(n) for n in v] for k, v in stats.items()})
        else:
            collected[name or "model"] = [int(n) for n in stats]
    return collected


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a crash ends the usable log
    return records


class MetricsLogger:
    """Writes the run's metrics; `resume_step` > 0 continues the logs of an interrupted run."""

    def __init__(
        self,
        run_dir: str | Path,
        stage: str,
        resume_step: int = 0,
        tensorboard: bool = True,
        plot: bool = True,
        enabled: bool = True,
    ):
        """`enabled` False (ranks other than 0): the records are kept in memory and no file is written."""
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.enabled = enabled
        self.plot_enabled = plot and enabled
        self.records = [
            r for r in _read_jsonl(self.run_dir / METRICS_FILE) if r.get("step", 0) <= resume_step
        ]
        if enabled:
            self._rewrite_jsonl()
        self.stats: dict[str, Any] = {"stage": stage, "evals": [], "best": None}
        stats_path = self.run_dir / STATS_FILE
        if resume_step > 0 and stats_path.is_file():
            try:
                self.stats = json.loads(stats_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                log.warning("%s is unreadable; rebuilding it from metrics.jsonl", stats_path)
        self.stats["evals"] = [e for e in self.records if e.get("kind") == "eval"]
        best = [e for e in self.stats["evals"] if e.get("is_best")]
        self.stats["best"] = best[-1] if best else None
        self.writer = None
        if tensorboard and enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: it is slow to import

            self.writer = SummaryWriter(
                str(self.run_dir / TENSORBOARD_DIR), purge_step=resume_step + 1 if resume_step else None
            )

    def _rewrite_jsonl(self) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records)
        write_atomically(self.run_dir / METRICS_FILE, text)

    def _append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def log_train(
        self, step: int, values: dict[str, float], routing: dict[str, list[int]] | None = None
    ) -> None:
        """A training record: loss, lr, grad norm, throughput... and MoE tokens per expert if any."""
        record: dict[str, Any] = {"kind": "train", "step": step, **values}
        if routing:
            record["tokens_per_expert"] = routing
        self._append(record)
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, int | float):
                    self.writer.add_scalar(f"train/{name}", value, step)
            for layer, counts in (routing or {}).items():
                total = sum(counts)
                if not total:
                    continue
                for expert, count in enumerate(counts):
                    self.writer.add_scalar(f"routing/{layer}/expert_{expert}", count / total, step)
                self.writer.add_scalar(f"routing/{layer}/max_load", max(counts) * len(counts) / total, step)

    def log_eval(self, step: int, values: dict[str, Any], progress: dict[str, Any]) -> None:
        """An evaluation record; refreshes train_stats.json and the plot."""
        record = {"kind": "eval", "step": step, **values}
        self._append(record)
        self.stats["evals"].append(record)
        if record.get("is_best"):
            self.stats["best"] = record
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.writer.add_scalar(f"val/{name.removeprefix('val_')}", value, step)
            self.writer.flush()
        self.write_stats(progress)
        if self.plot_enabled:
            self.write_plot()

    def write_stats(self, progress: dict[str, Any]) -> None:
        """Rewrite train_stats.json with the evaluations so far and `progress` (step, finished, ...)."""
        self.stats.update(progress)
        if not self.enabled:
            return
        write_atomically(self.run_dir / STATS_FILE, json.dumps(self.stats, indent=2, ensure_ascii=False))

    def write_plot(self) -> None:
        """plots/loss.png: training loss and validation loss against the step."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        train = [(r["step"], r["loss"]) for r in self.records if r.get("kind") == "train" and "loss" in r]
        evals = [(r["step"], r["val_loss"]) for r in self.records if r.get("kind") == "eval"]
        figure = Figure(figsize=(7, 4.5), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        if train:
            axes.plot(*zip(*train), label="train loss", linewidth=1, alpha=0.8)
        if evals:
            axes.plot(*zip(*evals), "o-", label="validation loss", linewidth=1.5, markersize=3)
        axes.set_xlabel("step")
        axes.set_ylabel("loss (nats/token)")
        axes.set_title(f"{self.run_dir.name} ({self.stage})")
        axes.grid(alpha=0.3)
        if train or evals:
            axes.legend()
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        (self.run_dir / PLOT_FILE).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.run_dir / PLOT_FILE, buffer.getvalue())
        self._write_lr_plot()

    def _write_lr_plot(self) -> None:
        """plots/lr.png: the learning rate against the step, one line per optimizer group when the groups'
        rates differ (LeRaC logs them as `lr/<group>`), else the schedule's one line."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        train = [r for r in self.records if r.get("kind") == "train" and "lr" in r]
        if not train:
            return
        keys = sorted({k for r in train for k in r if k.startswith("lr/")}) or ["lr"]
        figure = Figure(figsize=(7, 4.5), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for key in keys:
            points = [(r["step"], r[key]) for r in train if key in r]
            axes.plot(*zip(*points), label=key.removeprefix("lr/"), linewidth=1)
        axes.set_xlabel("step")
        axes.set_ylabel("learning rate")
        axes.set_title(f"{self.run_dir.name} ({self.stage})")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        write_atomically(self.run_dir / LR_PLOT_FILE, buffer.getvalue())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
