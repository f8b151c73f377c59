"""Elleci's recipe, one technique at a time (issue 17): does each claimed gain hold on our data and CPU?

ablation: on elleci-tiny and a dense LLaMA-style model of similar size, the same data (prose, Wikipedia
and chat drawn by Elleci's phase-1 weights; the full recipe switches to its phase-2 weights at 90%) and
the same wall-clock budget per run, these variants:
  baseline (cosine, AdamW), +wsd, +curriculum, +averaging (SWA over the last 20%), +lerac, +adamw8bit, full.
Each variant's step budget is its measured seconds per step divided into the budget (equal wall time);
variants slower or faster than the baseline also run at the baseline's steps (equal tokens: every variant
trains the same tokens per step). Reported per run: held-out ELTeC and Wikipedia bits per byte
(splits.json), tokens/s, steps, tokens; per model: optimizer-state bytes of AdamW vs 8-bit AdamW. The
baseline and the full recipe run with two seeds: their spread is the noise each effect is judged against.

context: context extension after training (issue 17 req. 7). A trained model (--model, or a short run
trained here) is extended to twice its context with each RoPE scaling (or, for learned positions, the
copied table); held-out bits per byte at the old and the new length, before and after a short fine-tune
at the new length (on a run's own data, when --model is a run of ours). A control row fine-tunes the
same steps at the old length.

table: the Markdown tables of docs/recipe.md from the JSON.

    python bench/recipe_ablation.py ablation --minutes-per-run 2.5 --work runs/bench-ablation  # 72 min
    python bench/recipe_ablation.py context --model runs/reference/llama-30m-pretrain --finetune-steps 200
    python bench/recipe_ablation.py table                                 # tables for docs/recipe.md
    python bench/recipe_ablation.py ablation --quick                      # < 1 min: the script works
Results: bench/results/recipe_ablation.json (+ _context), docs/images/recipe_ablation.png; quick: *_quick.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from fucina.evaluate.heldout import heldout_texts, resolve_data_dir, training_texts
from fucina.evaluate.intrinsic import evaluate_texts
from fucina.model_dir import load_pretrained
from fucina.tokenizer import train_tokenizer
from fucina.train.config import OptimSection, config_from_dict
from fucina.train.loop import build_model_config, train
from fucina.train.optim import build_optimizer, optimizer_state_bytes

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
PLOT = ROOT.parent / "docs" / "images" / "recipe_ablation.png"

MODELS = {
    "elleci-tiny": {"preset": "elleci-tiny"},
    # LLaMA layout at elleci-tiny's width, depth and vocabulary (GQA 6/2, SwiGLU 512, RoPE, RMSNorm).
    "llama-dense": {"preset": "llama-tiny", "d_model": 192, "n_heads": 6, "n_kv_heads": 2, "d_ff": 512},
}
PHASE1 = {"prose": 0.55, "wikipedia": 0.35, "chat": 0.10}
PHASE2 = {"prose": 0.20, "wikipedia": 0.25, "chat": 0.55}
WSD = {"name": "wsd", "warmup_ratio": 0.05, "decay_ratio": 0.2, "min_lr": 2.0e-5}
CURRICULUM = [[0.0, 64], [0.35, 128], [0.7, 256]]
LERAC = {"enabled": True, "c": 2.0, "min_lr": 1.0e-6}  # steps: a fifth of the run, set per run
SWA_LAST_20 = {"kind": "swa", "start": 0.8, "every": 5, "publish": "best"}
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "+wsd": ["wsd"],
    "+curriculum": ["curriculum"],
    "+averaging": ["averaging"],
    "+lerac": ["lerac"],
    "+adamw8bit": ["adamw8bit"],
    "full": ["wsd", "curriculum", "averaging", "lerac", "adamw8bit", "phases"],
}
TWO_SEEDS = ("baseline", "full")
# Variants that change only learning-rate numbers do the baseline's work per step: they take its speed
# instead of a probe of their own, whose noise would give them a different step budget.
LEARNING_RATE_ONLY = ("+wsd", "+lerac")
# Elleci's claims, the variant that tests each, and how it was stated.
CLAIMS = {
    "+curriculum": "sequence curriculum 256->512->1024: '17x early'",
    "+wsd": "WSD scheduler: '2.9x loss'",
    "+adamw8bit": "8-bit AdamW: 'memory -25%'",
    "+lerac": "LeRaC per-layer rates: '65% loss'",
    "+averaging": "SWA over the last 20%: 'generalisation'",
}


def _machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def _data_section(data_dir: Path, quick: bool, phases: bool) -> dict[str, Any]:
    shared = str(data_dir)
    prose_docs = 8 if quick else 60
    return {
        "exclude": [f"{shared}/splits.json"],
        "val_fraction": 0.01,
        "min_val_docs": 2,
        "max_documents": 40 if quick else None,
        "mixture": {
            "sources": [
                {
                    "name": "prose",
                    "train": [
                        f"{shared}/cligs-short19-20/cligs_short19-20.jsonl.xz",
                        f"{shared}/eltec-ita/eltec_ita.jsonl.xz",
                    ],
                    "max_documents": prose_docs,
                },
                {"name": "wikipedia", "train": [f"{shared}/exams-it/exams_it_wikipedia_snippets.jsonl.xz"]},
                {
                    "name": "chat",
                    "kind": "chat",
                    "train": [
                        f"{shared}/xpersona-it/xpersona_it_valid.chat.jsonl",
                        f"{shared}/jilda/jilda.chat.jsonl",
                    ],
                },
            ],
            "phases": [{"start": 0.0, "weights": PHASE1}]
            + ([{"start": 0.9, "weights": PHASE2}] if phases else []),
        },
    }


def run_config(
    model: str, variant: str, steps: int, seed: int, tokenizer_dir: Path, data_dir: Path, quick: bool
) -> dict[str, Any]:
    """The training config of one (model, variant) run of `steps` optimizer steps."""
    parts = VARIANTS[variant]
    config: dict[str, Any] = {
        "stage": "pretrain",
        "model": dict(MODELS[model]),
        "tokenizer": {"path": str(tokenizer_dir)},
        "data": _data_section(data_dir, quick, "phases" in parts),
        "optim": {"name": "adamw", "lr": 2.0e-3, "weight_decay": 0.1},
        "schedule": {"name": "cosine", "warmup_ratio": 0.05, "min_lr": 2.0e-4},
        "train": {"batch_size": 4 if quick else 8, "max_steps": steps, "seed": seed, "num_threads": None},
        "eval": {"every": max(steps, 1), "max_batches": 2 if quick else 10},
        "checkpoint": {"every": 0, "keep_last": 1},
        "log": {"every": 10, "progress": False, "tensorboard": False, "plot": False},
    }
    if "wsd" in parts:
        config["schedule"] = dict(WSD)
    if "curriculum" in parts:
        config["data"]["curriculum"] = [[f, w // (4 if quick else 1)] for f, w in CURRICULUM]
    if "averaging" in parts:
        config["averaging"] = dict(SWA_LAST_20)
        if "wsd" in parts:
            config["averaging"].pop("start")  # the decay phase, WSD's last 20%
    if "lerac" in parts:
        config["optim"]["lerac"] = {**LERAC, "steps": max(1, steps // 5)}
    if "adamw8bit" in parts:
        config["optim"]["name"] = "adamw8bit"
    if quick:
        config["model"]["context_length"] = 64
    return config


def heldout_bpb(run: Path, data_dir: Path, chars: int) -> dict[str, float]:
    """Held-out ELTeC and Wikipedia bits per byte of the run's published model (first `chars` of each)."""
    model, tokenizer = load_pretrained(run / "final")
    scores = {}
    for source in ("eltec", "wikipedia"):
        texts, total = [], 0
        for text in heldout_texts(data_dir, source):
            texts.append(text[: chars - total])
            total += len(texts[-1])
            if total >= chars:
                break
        result = evaluate_texts(
            model.eval(), tokenizer, texts, name=source, batch_size=8, show_progress=False
        )
        scores[f"{source}_bpb"] = round(result.bits_per_byte, 4)
    return scores


def optimizer_memory(model: str, vocab: int) -> dict[str, int]:
    """Optimizer-state bytes of AdamW and 8-bit AdamW after one step on `model`."""
    from fucina.model.transformer import Transformer

    out = {}
    for name in ("adamw", "adamw8bit"):
        torch.manual_seed(0)
        network = Transformer(build_model_config(MODELS[model], vocab))
        optimizer, _ = build_optimizer(network, OptimSection(name=name))
        network(torch.randint(0, vocab, (2, 16))).float().mean().backward()
        optimizer.step()
        out[name] = optimizer_state_bytes(optimizer)
    out["parameters"] = sum(p.numel() for p in network.parameters())
    return out


def _train(config: dict[str, Any], run: Path) -> dict[str, Any]:
    result = train(config_from_dict(config), run, resume=False, overwrite=True)  # a fresh run, timed whole
    record = {
        "steps": result.steps,
        "tokens": result.steps * config["train"]["batch_size"] * _context(config),
        "train_seconds": round(result.train_seconds, 2),
        "tokens_per_s": round(result.tokens_per_second, 1),
        "val_bpb": result.best_val_bpb,
    }
    record.update(_last_evaluation(run))
    return record


def _last_evaluation(run: Path) -> dict[str, float]:
    """The raw and averaged validation bpb of the run's last evaluation: with `publish: best` only the
    better one is published, so both are kept to judge averaging on its own."""
    metrics = run / "metrics.jsonl"
    last: dict[str, float] = {}
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        entry = json.loads(line)
        if "val_bpb" in entry:  # with averaging, val_bpb is the published weights' and raw_ the raw ones'
            last = {"raw_val_bpb": entry.get("raw_val_bpb", entry["val_bpb"])}
            if "averaged_val_bpb" in entry:
                last["averaged_val_bpb"] = entry["averaged_val_bpb"]
    return last


def _context(config: dict[str, Any]) -> int:
    return config["model"].get("context_length", 256)


def ablation(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = resolve_data_dir(args.data_dir)
    work = Path(args.work or tempfile.mkdtemp(prefix="recipe-ablation-"))
    tokenizer_dir = work / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        texts = list(training_texts(data_dir, "wikipedia"))[: 300 if args.quick else 6000]
        train_tokenizer(texts, 2048, template="chatml", show_progress=False).save(tokenizer_dir)
    budget = args.minutes_per_run * 60.0
    models = args.models.split(",")
    # Every finished run is appended to runs.jsonl in the work directory, and a rerun with the same
    # --work skips it: hours of runs survive a time limit or a crash.
    journal = work / "runs.jsonl"
    runs: list[dict[str, Any]] = (
        [json.loads(line) for line in journal.read_text().splitlines()] if journal.is_file() else []
    )
    done = {(r["model"], r["variant"], r["seed"], r["budget"]) for r in runs}
    memory, probes = {}, {}
    for model in models:
        memory[model] = optimizer_memory(model, 2048)
        speeds = _probe_speeds(model, args, tokenizer_dir, data_dir, work)
        probes[model] = speeds
        base_steps = args.steps or max(10, int(budget / speeds["baseline"]))
        for variant in VARIANTS:
            steps_time = args.steps or max(10, int(budget / speeds[variant]))
            # Within the probe's own noise of the baseline's speed, equal time is equal tokens.
            same = abs(steps_time - base_steps) <= args.same_speed * base_steps
            budgets = {"time": base_steps} if same else {"time": steps_time, "tokens": base_steps}
            for seed in (0, 1) if variant in TWO_SEEDS and not args.quick else (0,):
                for kind, steps in budgets.items():
                    if (model, variant, seed, kind) in done:
                        continue
                    name = f"{model}/{variant}/seed{seed}/{kind}"
                    config = run_config(model, variant, steps, seed, tokenizer_dir, data_dir, args.quick)
                    started = time.perf_counter()
                    record = {"model": model, "variant": variant, "seed": seed, "budget": kind}
                    record.update(_train(config, work / "runs" / name.replace("/", "_")))
                    record.update(
                        heldout_bpb(work / "runs" / name.replace("/", "_"), data_dir, args.heldout_chars)
                    )
                    record["wall_seconds"] = round(time.perf_counter() - started, 1)
                    record["equal_tokens_too"] = "tokens" not in budgets
                    runs.append(record)
                    with journal.open("a") as out:
                        out.write(json.dumps(record) + "\n")
                    print(json.dumps(record), file=sys.stderr, flush=True)
    return {
        "machine": _machine(),
        "minutes_per_run": args.minutes_per_run,
        "quick": args.quick,
        "variants": {k: v for k, v in VARIANTS.items()},
        "optimizer_memory_bytes": memory,
        "probe_seconds_per_step": probes,
        "runs": runs,
        "claims": claims(runs, memory),
    }


def _probe_speeds(
    model: str, args: argparse.Namespace, tokenizer_dir: Path, data_dir: Path, work: Path
) -> dict[str, float]:
    """Seconds per optimizer step of each variant: the mean of a short run's step times after its first
    few (start-up, allocation). The baseline is probed first and last and takes the mean of the two,
    since every other variant's budget is set against it. Saved in the work directory, so that a
    rerun plans the same steps."""
    saved = work / "probe" / f"{model}.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    speeds: dict[str, Any] = {}
    for number, variant in enumerate([*VARIANTS, "baseline"]):
        if variant in LEARNING_RATE_ONLY:
            continue
        probe = run_config(model, variant, args.probe_steps, 0, tokenizer_dir, data_dir, args.quick)
        probe["eval"]["every"] = 0
        probe["log"]["every"] = 1
        run = work / "probe" / model / f"{number}-{variant}"
        _train(probe, run)
        entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        tokens = probe["train"]["batch_size"] * _context(probe)
        times = [tokens / e["tokens_per_s"] for e in entries if "tokens_per_s" in e]
        seconds = statistics.fmean(times[min(4, len(times) - 1) :])
        if variant == "baseline" and "baseline" in speeds:
            speeds["baseline_probes"] = [speeds["baseline"], seconds]
            seconds = statistics.fmean(speeds["baseline_probes"])
        speeds[variant] = seconds
        print(f"probe {model} {variant}: {seconds:.3f} s/step", file=sys.stderr, flush=True)
    for variant in LEARNING_RATE_ONLY:
        speeds[variant] = speeds["baseline"]
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(speeds))
    return speeds


def _mean_bpb(record: dict[str, Any]) -> float:
    return (record["eltec_bpb"] + record["wikipedia_bpb"]) / 2


def claims(runs: list[dict[str, Any]], memory: dict[str, Any]) -> dict[str, Any]:
    """Per model and claim: the held-out bpb change against the baseline (equal time and equal tokens),
    next to the seed noise (the largest baseline or full-recipe spread between two seeds)."""
    out: dict[str, Any] = {}
    for model in sorted({r["model"] for r in runs}):
        mine = [r for r in runs if r["model"] == model]

        def mean(variant: str, budget: str, mine: list = mine) -> float | None:
            chosen = [
                _mean_bpb(r)
                for r in mine
                if r["variant"] == variant
                and (r["budget"] == budget or (budget == "tokens" and r["equal_tokens_too"]))
            ]
            return statistics.fmean(chosen) if chosen else None

        spreads = []
        for variant in TWO_SEEDS:
            values = [_mean_bpb(r) for r in mine if r["variant"] == variant and r["budget"] == "time"]
            if len(values) == 2:
                spreads.append(abs(values[0] - values[1]))
        noise = max(spreads) if spreads else None
        base = {budget: mean("baseline", budget) for budget in ("time", "tokens")}
        model_claims = {}
        for variant in [*CLAIMS, "full"]:
            deltas = {
                budget: None
                if mean(variant, budget) is None or base[budget] is None
                else round(mean(variant, budget) - base[budget], 4)
                for budget in ("time", "tokens")
            }
            entry: dict[str, Any] = {"claim": CLAIMS.get(variant, "the whole recipe"), "bpb_change": deltas}
            if noise is not None and deltas["time"] is not None:
                entry["beyond_noise"] = abs(deltas["time"]) > noise
                entry["supported"] = deltas["time"] < -noise
            model_claims[variant] = entry
        averaged = [
            r["averaged_val_bpb"] - r["raw_val_bpb"]
            for r in mine
            if r["variant"] == "+averaging" and "averaged_val_bpb" in r
        ]
        if averaged:  # the averaged weights against the raw ones of the same run, on validation
            model_claims["+averaging"]["averaged_minus_raw_val_bpb"] = round(statistics.fmean(averaged), 4)
        saved = memory[model]
        eight_bit = model_claims["+adamw8bit"]
        eight_bit["optimizer_memory_change"] = round(saved["adamw8bit"] / saved["adamw"] - 1, 3)
        if "supported" in eight_bit:  # a memory claim: a quarter less, with no loss beyond the noise
            eight_bit["supported"] = (
                eight_bit["optimizer_memory_change"] <= -0.25 and eight_bit["bpb_change"]["time"] <= noise
            )
        out[model] = {"seed_noise_bpb": None if noise is None else round(noise, 4), "claims": model_claims}
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in results["runs"]})
    variants = list(VARIANTS)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for offset, budget in ((-0.2, "time"), (0.2, "tokens")):
            means, errors = [], []
            for variant in variants:
                values = [
                    _mean_bpb(r)
                    for r in results["runs"]
                    if r["model"] == model
                    and r["variant"] == variant
                    and (r["budget"] == budget or (budget == "tokens" and r["equal_tokens_too"]))
                ]
                means.append(statistics.fmean(values) if values else float("nan"))
                errors.append((max(values) - min(values)) / 2 if len(values) > 1 else 0.0)
            xs = [i + offset for i in range(len(variants))]
            ax.bar(
                xs,
                means,
                width=0.4,
                yerr=errors,
                label=f"equal {'wall time' if budget == 'time' else 'tokens'}",
            )
        finite = [r for r in results["runs"] if r["model"] == model]
        low = min(_mean_bpb(r) for r in finite)
        ax.set_ylim(low * 0.97, max(_mean_bpb(r) for r in finite) * 1.01)
        ax.set_xticks(range(len(variants)), variants, rotation=30)
        ax.set_title(model)
        ax.set_ylabel("held-out bits per byte (ELTeC, Wikipedia mean)")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# --- context extension ------------------------------------------------------------------------------------


def _bpb_at(model, tokenizer, length: int, texts: list[str]) -> float:
    """Held-out bits per byte with windows of `length` tokens (the model's table may be longer)."""
    original = model.config
    model.config = dataclasses.replace(original, context_length=length)
    try:
        return round(
            evaluate_texts(model.eval(), tokenizer, texts, batch_size=4, show_progress=False).bits_per_byte, 4
        )
    finally:
        model.config = original


def context(args: argparse.Namespace) -> dict[str, Any]:
    from fucina.train.context_extension import model_with_overrides

    data_dir = resolve_data_dir(args.data_dir)
    work = Path(args.work or tempfile.mkdtemp(prefix="recipe-context-"))
    texts = [heldout_texts(data_dir, "eltec")[0][: args.heldout_chars]]
    base_run = Path(args.model) if args.model else None
    if base_run is None:  # a short elleci-tiny run of our own
        tokenizer_dir = work / "tokenizer"
        wiki = list(training_texts(data_dir, "wikipedia"))[:300]
        train_tokenizer(wiki, 2048, template="chatml", show_progress=False).save(tokenizer_dir)
        config = run_config("elleci-tiny", "baseline", args.steps, 0, tokenizer_dir, data_dir, args.quick)
        train(config_from_dict(config), work / "base", overwrite=True)
        base_run = work / "base"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_pretrained(base_run)
    model.to(device)
    old = model.config.context_length
    new = 2 * old
    rows = []
    # "control": the same fine-tune at the old length, so that the gain of the extra steps themselves
    # is told apart from the model learning the new length.
    scalings = ["copy"] if model.config.positions == "learned" else ["none", "linear", "ntk", "yarn"]
    kinds = ["control", *scalings]
    for kind in kinds:
        overrides: dict[str, Any] = {} if kind == "control" else {"context_length": new}
        if kind not in ("none", "copy", "control"):
            overrides["rope_scaling"] = {"rope_type": kind}
        extended = model_with_overrides(copy.deepcopy(model), overrides).to(device)
        row: dict[str, Any] = {"scaling": kind, "old_length": old, "new_length": new}
        row["before_old"] = _bpb_at(extended, tokenizer, old, texts)
        row["before_new"] = None if kind == "control" else _bpb_at(extended, tokenizer, new, texts)
        config = run_config(
            "elleci-tiny", "baseline", args.finetune_steps, 0, Path("."), data_dir, args.quick
        )
        config.pop("tokenizer")
        config["init_from"] = str(base_run)
        config["model"] = overrides
        config["optim"]["lr"] = 3.0e-4
        trained = base_run / "train_config.yaml"
        if trained.is_file():  # a run of ours: fine-tune on its own data, from its final learning rate
            base = yaml.safe_load(trained.read_text())
            config["data"] = base["data"]
            config["train"]["batch_size"] = base["train"]["batch_size"]
            config["optim"]["lr"] = base["schedule"].get("min_lr") or config["optim"]["lr"]
        config["schedule"]["min_lr"] = config["optim"]["lr"] / 10
        if kind != "control":  # same tokens per step at twice the length
            config["train"]["batch_size"] = max(1, config["train"]["batch_size"] // 2)
        run = work / f"extend-{kind}"
        _train(config, run)
        tuned, _ = load_pretrained(run / "final")
        tuned.to(device)
        row["after_old"] = _bpb_at(tuned, tokenizer, old, texts)
        row["after_new"] = None if kind == "control" else _bpb_at(tuned, tokenizer, new, texts)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return {
        "machine": _machine(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "model": str(args.model or "elleci-tiny (trained here)"),
        "finetune_steps": args.finetune_steps,
        "rows": rows,
    }


# --- tables -----------------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    """The ablation table and the claims table of docs/recipe.md, in Markdown."""
    lines = [
        "| model | variant | seed | budget | steps | tokens | tokens/s | ELTeC bpb | Wikipedia bpb |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        budget = "time + tokens" if r["equal_tokens_too"] else r["budget"]
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['seed']} | {budget} | {r['steps']} | {r['tokens']:,} | "
            f"{r['tokens_per_s']:,.0f} | {r['eltec_bpb']:.4f} | {r['wikipedia_bpb']:.4f} |"
        )
    lines += ["", "| model | optimizer | state bytes |", "|---|---|---:|"]
    for model, memory in results["optimizer_memory_bytes"].items():
        for name in ("adamw", "adamw8bit"):
            lines.append(f"| {model} | {name} | {memory[name]:,} |")
    lines += [
        "",
        "| model | claim | bpb change, equal time | equal tokens | seed noise | supported |",
        "|---|---|---:|---:|---:|---|",
    ]
    for model, entry in results["claims"].items():
        for claim in entry["claims"].values():
            change = claim["bpb_change"]
            lines.append(
                f"| {model} | {claim['claim']} | {change['time']} | {change['tokens']} | "
                f"{entry['seed_noise_bpb']} | {claim.get('supported', 'n/a')} |"
            )
    return "\n".join(lines)


def context_table(results: dict[str, Any]) -> str:
    """The context-extension table of docs/recipe.md, in Markdown."""
    rows = results["rows"]
    old, new = rows[0]["old_length"], rows[0]["new_length"]
    lines = [
        f"| scaling | before, {old} | before, {new} | after, {old} | after, {new} |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = {
            "none": "none (extrapolation)",
            "copy": "copied table",
            "control": f"control: fine-tuned at {old}",
        }.get(r["scaling"], r["scaling"])
        cells = [r[k] for k in ("before_old", "before_new", "after_old", "after_new")]
        lines.append(f"| {name} | " + " | ".join("–" if c is None else f"{c:.4f}" for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["ablation", "context", "table"])
    parser.add_argument("--minutes-per-run", type=float, default=6.0, help="wall-clock budget of each run")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: elleci-tiny,llama-dense")
    parser.add_argument("--steps", type=int, help="fixed steps for every run instead of the time budget")
    parser.add_argument(
        "--probe-steps", type=int, default=24, help="steps of the speed probe of each variant"
    )
    parser.add_argument(
        "--same-speed",
        type=float,
        default=0.1,
        help="variants whose step budget is within this fraction of the baseline's run once, at its steps",
    )
    parser.add_argument("--heldout-chars", type=int, default=200_000, help="held-out characters per source")
    parser.add_argument("--model", help="context: the trained run or model directory to extend")
    parser.add_argument("--finetune-steps", type=int, default=100, help="context: fine-tune steps at 2x")
    parser.add_argument("--data-dir", help="the shared data root (default: $FUCINA_DATA_DIR, ../shared/data)")
    parser.add_argument("--work", help="where runs go (default: a temporary directory)")
    parser.add_argument("--quick", action="store_true", help="tiny everything: checks the script in < 1 min")
    args = parser.parse_args()
    suffix = "_quick" if args.quick else ""
    if args.mode == "table":
        print(table(json.loads((RESULTS / "recipe_ablation.json").read_text())))
        context_file = RESULTS / "recipe_ablation_context.json"
        if context_file.is_file():
            print("\n" + context_table(json.loads(context_file.read_text())))
        return
    if args.quick:
        args.models = "llama-dense" if args.mode == "ablation" else args.models
        args.steps, args.probe_steps, args.heldout_chars = args.steps or 4, 4, 2000
        args.finetune_steps = 2
    if args.mode == "context":
        args.steps = args.steps or 200
        results = context(args)
        name = f"recipe_ablation_context{suffix}.json"
    else:
        results = ablation(args)
        name = f"recipe_ablation{suffix}.json"
        plot(results, PLOT if not args.quick else Path(tempfile.gettempdir()) / "recipe_ablation_quick.png")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
