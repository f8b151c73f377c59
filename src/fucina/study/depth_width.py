"""The depth-versus-width study: plan, train every shape with fucina's loop, tabulate, plot, conclude.

What `run_study` does, in order:
1. Writes the study corpus (`corpus.py`: ELTeC + Wikipedia minus held-out documents, else the built-in
   prose) and trains one tokenizer on it, shared by every run (so bits per byte and loss compare).
2. Plans: the compute of one run in FLOPs (`--flops-per-run`, or the budget in minutes times the FLOP
   rate measured by timing a few forward+backward passes), the scale (the largest models whose REAL
   shape still sees `min_tokens_per_param` tokens per non-embedding parameter, unless `scale` is given),
   and per shape the steps that spend that compute (`shapes.py`). The plan is saved in `plan.json` and
   reused on a rerun, so a resumed study trains exactly the runs it planned.
3. Trains each shape with `fucina.train.loop.train` in `runs/<depth>x<width>/` (the same corpus, seed,
   batch, learning rate and schedule for all). A finished run is skipped; an interrupted one resumes
   from its checkpoint (the loop's own exact resume).
4. Writes `results.json` and `results.md` (params, depth, width, tokens seen, val bpb) and the plots, and
   a verdict on the fixed-parameter sweep: does the deepest shape beat the shallowest at equal
   non-embedding parameters? A difference under `TIE_BPB` is reported as inconclusive (one seed).

Validation bits per byte is the loop's own evaluation on the study's validation file (a slice of the
held-out documents), measured on the final weights: every run spent the same compute, so the last
evaluation is the comparable one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fucina.errors import ConfigError
from fucina.evaluate.report import write_json
from fucina.fsutil import write_atomically
from fucina.study.corpus import write_study_corpus
from fucina.study.shapes import DEFAULT_SWEEP_DEPTHS, SCALES, Shape, StudyRun, four_configurations, study_runs

logger = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
TIE_BPB = 0.01
OVERHEAD = 0.75  # share of a run's wall time spent in training steps (the rest: data, evaluations, saving)
EVALS_PER_RUN = 8
EMBEDDING_MODULES = ("token_embedding", "position_embedding", "lm_head")


@dataclass
class StudySettings:
    """Everything that decides what the study trains (saved in plan.json)."""

    budget_minutes: float = 20.0
    flops_per_run: float | None = None
    scale: int | None = None
    sweep_depths: tuple[int, ...] = DEFAULT_SWEEP_DEPTHS
    context_length: int = 128
    batch_size: int = 16
    lr: float = 1e-3
    vocab_size: int = 4096
    corpus: str = "auto"
    corpus_chars: int = 4_000_000
    val_chars: int = 200_000
    eval_batches: int = 16
    min_tokens_per_param: float = 1.0
    precision: str = "fp32"
    device: str = "auto"
    seed: int = 0
    data_dir: str | None = None
    show_progress: bool = True


@dataclass
class PlannedRun:
    """One shape of the plan with the steps that spend the study's per-run compute."""

    name: str
    labels: list[str]
    n_layers: int
    d_model: int
    n_heads: int
    params: int
    non_embedding_params: int
    flops_per_token: int
    steps: int
    tokens: int


@dataclass
class StudyPlan:
    settings: dict[str, Any]
    scale: int
    flops_per_run: float
    flops_per_second: float | None
    vocab_size: int
    runs: list[PlannedRun] = field(default_factory=list)


def _model_params(shape: Shape, vocab_size: int, context_length: int) -> tuple[int, int]:
    """(all, non-embedding) parameters of the real fucina Transformer of this shape (built on 'meta')."""
    from fucina.model.transformer import Transformer
    from fucina.train.loop import build_model_config

    config = build_model_config(shape.model_section(context_length), vocab_size)
    with torch.device("meta"):
        model = Transformer(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(
        p.numel() for name, p in model.named_parameters() if name.split(".")[0] in EMBEDDING_MODULES
    )
    return total, total - embedding


def measure_flops_per_second(settings: StudySettings, vocab_size: int, steps: int = 3) -> float:
    """Training FLOP rate of this machine: timed forward+backward of a mid-size shape (first pass untimed)."""
    from fucina.model.transformer import Transformer
    from fucina.train.loop import autocast_dtype, build_model_config, resolve_device

    shape = four_configurations(8)["BALANCED"]
    device = resolve_device(settings.device)
    model = Transformer(build_model_config(shape.model_section(settings.context_length), vocab_size)).to(
        device
    )
    dtype = autocast_dtype(settings.precision, device)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(
        0, vocab_size, (settings.batch_size, settings.context_length + 1), generator=generator
    )
    tokens = tokens.to(device)
    elapsed = 0.0
    for step in range(steps + 1):
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(tokens[:, :-1], labels=tokens[:, 1:]) / tokens[:, 1:].numel()  # as the loop does
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            elapsed += time.perf_counter() - started
    flops = shape.flops_per_token(vocab_size, settings.context_length) * tokens[:, :-1].numel() * steps
    return flops / max(elapsed, 1e-9)


def _plan_runs(
    runs: list[StudyRun], settings: StudySettings, vocab: int, flops_per_run: float
) -> list[PlannedRun]:
    tokens_per_step = settings.batch_size * settings.context_length
    planned = []
    for run in runs:
        shape = run.shape
        per_token = shape.flops_per_token(vocab, settings.context_length)
        steps = max(1, round(flops_per_run / (per_token * tokens_per_step)))
        params, non_embedding = _model_params(shape, vocab, settings.context_length)
        planned.append(
            PlannedRun(
                shape.name,
                list(run.labels),
                shape.n_layers,
                shape.d_model,
                shape.n_heads,
                params,
                non_embedding,
                per_token,
                steps,
                steps * tokens_per_step,
            )
        )
    return planned


def make_plan(settings: StudySettings, vocab_size: int) -> StudyPlan:
    """Choose the scale and the steps per shape (see the module doc)."""
    rate = None
    if settings.flops_per_run is None:
        rate = measure_flops_per_second(settings, vocab_size)
        logger.info("measured %.3g training FLOP/s", rate)
    scales = [settings.scale] if settings.scale is not None else list(SCALES)
    chosen = None
    for scale in scales:
        runs = study_runs(scale, settings.sweep_depths)
        per_run = settings.flops_per_run
        if per_run is None:
            per_run = rate * settings.budget_minutes * 60 * OVERHEAD / len(runs)
        planned = _plan_runs(runs, settings, vocab_size, per_run)
        chosen = (scale, per_run, planned)
        real = next(p for p in planned if "REAL" in p.labels)
        if real.tokens >= settings.min_tokens_per_param * real.non_embedding_params:
            break
    scale, per_run, planned = chosen
    return StudyPlan(asdict(settings), scale, per_run, rate, vocab_size, planned)


def _plan_key(settings: dict[str, Any]) -> dict[str, Any]:
    ignored = ("show_progress", "data_dir", "device")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items() if k not in ignored}


def load_or_make_plan(out: Path, settings: StudySettings, vocab_size: int) -> StudyPlan:
    """The saved plan when its settings match, else a new one (ConfigError if they differ)."""
    path = out / PLAN_FILE
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if _plan_key(saved["settings"]) != _plan_key(asdict(settings)):
            raise ConfigError(
                f"{path} was planned with other settings; use a new --out or the same options "
                f"(saved: {_plan_key(saved['settings'])})"
            )
        runs = [PlannedRun(**run) for run in saved.pop("runs")]
        return StudyPlan(**saved, runs=runs)
    plan = make_plan(settings, vocab_size)
    write_json(asdict(plan), path)
    return plan


def train_config(run: PlannedRun, settings: StudySettings, out: Path) -> dict[str, Any]:
    """The fucina TrainConfig mapping of one study run."""
    every = max(1, run.steps // EVALS_PER_RUN)
    shape = Shape(run.n_layers, run.d_model)
    return {
        "stage": "pretrain",
        "model": shape.model_section(settings.context_length),
        "tokenizer": {"path": str(out / "tokenizer")},
        "data": {"train": [str(out / "corpus" / "train.jsonl")], "val": [str(out / "corpus" / "val.jsonl")]},
        "optim": {"lr": settings.lr, "weight_decay": 0.1, "grad_clip": 1.0},
        "schedule": {"name": "cosine", "warmup_ratio": 0.05, "min_lr": settings.lr / 10},
        "train": {
            "batch_size": settings.batch_size,
            "max_steps": run.steps,
            "precision": settings.precision,
            "device": settings.device,
            "seed": settings.seed,
        },
        "eval": {"every": every, "max_batches": settings.eval_batches},
        "checkpoint": {"every": max(1, run.steps // 4), "keep_last": 1},
        "log": {
            "every": max(1, run.steps // 50),
            "progress": settings.show_progress,
            "tensorboard": False,
            "plot": False,
        },
    }


def _prepare_tokenizer(out: Path, settings: StudySettings):
    from fucina.data.readers import iter_texts
    from fucina.tokenizer import TOKENIZER_FILE, FucinaTokenizer, train_tokenizer

    directory = out / "tokenizer"
    if (directory / TOKENIZER_FILE).is_file():
        return FucinaTokenizer.load(directory)
    tokenizer = train_tokenizer(
        iter_texts([out / "corpus" / "train.jsonl"]),
        vocab_size=settings.vocab_size,
        template="chatml",
        show_progress=False,
    )
    tokenizer.save(directory)
    return tokenizer


def _corpus_source(out: Path) -> str:
    info = out / "corpus" / "info.json"
    return json.loads(info.read_text(encoding="utf-8"))["source"] if info.is_file() else "unknown"


def _finished(run_dir: Path) -> bool:
    stats = run_dir / "train_stats.json"
    return stats.is_file() and bool(json.loads(stats.read_text(encoding="utf-8")).get("finished"))


def _run_record(run: PlannedRun, run_dir: Path) -> dict[str, Any]:
    stats = json.loads((run_dir / "train_stats.json").read_text(encoding="utf-8"))
    evals = stats.get("evals") or []
    final = evals[-1] if evals else {}
    return {
        **asdict(run),
        "tokens_seen": stats.get("tokens_seen"),
        "train_seconds": stats.get("train_seconds"),
        "val_bpb": final.get("val_bpb"),
        "val_loss": final.get("val_loss"),
        "curve": [
            {"step": e["step"], "tokens_seen": e["tokens_seen"], "val_bpb": e["val_bpb"]} for e in evals
        ],
    }


def verdict(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Depth against width at equal non-embedding parameters, from the sweep's shallowest and deepest."""
    sweep = sorted(
        (r for r in records if any(label.startswith("SWEEP-") for label in r["labels"])),
        key=lambda r: r["n_layers"],
    )
    if len(sweep) < 2:
        return {"answer": "n/a", "text": "the sweep needs at least two depths to compare depth with width"}
    shallow, deep = sweep[0], sweep[-1]
    best = min(sweep, key=lambda r: r["val_bpb"])
    difference = shallow["val_bpb"] - deep["val_bpb"]
    if abs(difference) < TIE_BPB:
        answer = "inconclusive"
    else:
        answer = "yes" if difference > 0 else "no"
    text = (
        f"depth beats width at ~{deep['non_embedding_params'] / 1e6:.2f}M non-embedding parameters: {answer} "
        f"({deep['name']}: {deep['val_bpb']:.4f} bpb vs {shallow['name']}: {shallow['val_bpb']:.4f} bpb; "
        f"best depth in the sweep: {best['n_layers']} layers, {best['val_bpb']:.4f} bpb)"
    )
    return {
        "answer": answer,
        "text": text,
        "shallow": shallow["name"],
        "deep": deep["name"],
        "best": best["name"],
        "bpb_difference": difference,
    }


def markdown_table(records: list[dict[str, Any]]) -> str:
    header = (
        "| configuration | depth | width | heads | params | non-emb params | steps | tokens seen | val bpb |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(
            f"| {', '.join(r['labels'])} | {r['n_layers']} | {r['d_model']} | {r['n_heads']} | "
            f"{r['params'] / 1e6:.2f}M | {r['non_embedding_params'] / 1e6:.2f}M | {r['steps']} | "
            f"{r['tokens_seen']:,} | {r['val_bpb']:.4f} |"
        )
    return "\n".join(lines)


@dataclass
class StudyResult:
    out: Path
    records: list[dict[str, Any]]
    verdict: dict[str, Any]
    plots: list[Path]
    skipped: list[str]


def run_study(out: str | Path, settings: StudySettings | None = None) -> StudyResult:
    """Run (or resume) the depth-versus-width study into `out` (see the module doc)."""
    from fucina.study.plots import plot_bpb_vs_depth, plot_loss_curves
    from fucina.train.config import config_from_dict
    from fucina.train.loop import train

    settings = settings or StudySettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "corpus" / "info.json").is_file():
        write_study_corpus(
            out / "corpus",
            data_dir=settings.data_dir,
            corpus=settings.corpus,
            train_chars=settings.corpus_chars,
            val_chars=settings.val_chars,
        )
    tokenizer = _prepare_tokenizer(out, settings)
    plan = load_or_make_plan(out, settings, tokenizer.vocab_size)
    logger.info(
        "plan: scale 1/%d, %.3g FLOPs per run, %d runs: %s",
        plan.scale,
        plan.flops_per_run,
        len(plan.runs),
        ", ".join(f"{r.name} ({r.steps} steps)" for r in plan.runs),
    )
    records, skipped = [], []
    for run in plan.runs:
        run_dir = out / "runs" / run.name
        if _finished(run_dir):
            skipped.append(run.name)
            logger.info("%s: finished earlier, skipped", run.name)
        else:
            logger.info("%s (%s): training %d steps", run.name, ", ".join(run.labels), run.steps)
            train(config_from_dict(train_config(run, settings, out)), run_dir)
        records.append(_run_record(run, run_dir))
    result_verdict = verdict(records)
    write_json(
        {"plan": asdict(plan), "runs": records, "verdict": result_verdict, "equal": "training FLOPs"},
        out / RESULTS_JSON,
    )
    write_atomically(
        out / RESULTS_MD,
        f"# Depth vs width ({_corpus_source(out)} corpus)\n\n"
        f"Every run: {plan.flops_per_run:.3g} training FLOPs (equal compute), scale 1/{plan.scale} of "
        f"the 768-wide originals, context {settings.context_length}, batch {settings.batch_size}, "
        f"lr {settings.lr}, vocabulary {plan.vocab_size}. val bpb: final weights, study validation text.\n\n"
        f"{markdown_table(records)}\n\n{result_verdict['text']}\n",
    )
    plots = [
        plot_loss_curves(records, out / "loss_curves.png"),
        plot_bpb_vs_depth(records, out / "bpb_vs_depth.png"),
    ]
    return StudyResult(out, records, result_verdict, plots, skipped)
