"""Structured pruning healed by distillation: bits per byte and batch-1 speed before, after, healed.

For one trained model (--model, by default the LLaMA-30M reference run of configs/), and each plan
"PERCENT:STRATEGY" (--plans), it:
- picks a `fucina prune` spec that removes at least PERCENT% of the parameters: `width` removes half
  of the KV groups of every layer (when Hugging Face can still configure the result) and then as many FFN
  channels (multiples of 32) as the rest needs; `depth` removes whole blocks only; `mixed` removes
  blocks for half the parameters to remove and width for the rest;
- prunes with activation importance on calibration text from the training split;
- heals with configs/llama-pruned-heal.yaml (stage distill, the unpruned model as teacher) for
  --heal-steps steps, timing it;
- measures bits per byte on held-out ELTeC and Wikipedia (the first --heldout-chars characters of each,
  ../shared/data) after pruning and after healing, and batch-1 greedy tokens/s (best of --repeats).
Target (issue 16): 25% fewer parameters within 5% of the unpruned bits per byte after at most 30 minutes
of CPU healing.

Full run (the lead, on a quiet machine, after training the reference model):
    fucina study prepare-data --out runs/reference/data
    fucina train configs/reference-llama-30m-pretrain.yaml --out runs/reference/llama-30m-pretrain
    python bench/prune_heal.py --threads 2
Quick check that the script works (a minute, numbers meaningless): python bench/prune_heal.py --quick
Results go to bench/results/prune_heal.json (quick: prune_heal_quick.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from fucina.compress.prune import PruneSpec, prune_model_dir, pruned_config
from fucina.errors import ConfigError
from fucina.evaluate.intrinsic import evaluate_texts
from fucina.inference.generate import SamplingConfig, generate
from fucina.model.config import ModelConfig
from fucina.model.transformer import Transformer
from fucina.model_dir import load_pretrained, resolve_model_dir
from fucina.resources import builtin_prose_files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
HEAL_CONFIG = ROOT / "configs" / "llama-pruned-heal.yaml"
REFERENCE = ROOT / "runs" / "reference"
FFN_MULTIPLE = 32


def parameters_of(config: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(config).parameters())


def plan(config: ModelConfig, percent: float, strategy: str) -> PruneSpec:
    """The lightest spec of `strategy` that removes at least `percent`% of the parameters."""
    total, goal = parameters_of(config), (1 - percent / 100) * parameters_of(config)

    def size(spec: PruneSpec) -> int:
        return parameters_of(pruned_config(config, spec, list(range(config.n_layers - spec.layers))))

    if strategy == "depth":
        for layers in range(1, config.n_layers):
            if size(PruneSpec(layers=layers)) <= goal:
                return PruneSpec(layers=layers)
    elif strategy in ("width", "mixed"):
        layers = 0
        if strategy == "mixed":  # blocks for half the parameters to remove, width for the rest
            half = (total + goal) / 2
            layers = next(n for n in range(1, config.n_layers) if size(PruneSpec(layers=n)) <= half)
        try:
            heads = 0.5 if size(PruneSpec(heads=0.5, layers=layers)) > goal else 0.0
        except ConfigError:  # no head fraction of 0.5 for this model
            heads = 0.0
        for removed in range(0, config.ff_size, FFN_MULTIPLE):
            ffn = removed / config.ff_size
            spec = PruneSpec(heads=heads, ffn=ffn, layers=layers, ffn_multiple=FFN_MULTIPLE if ffn else 1)
            if size(spec) <= goal:
                return spec
    else:
        raise SystemExit(f"unknown strategy {strategy!r} (width, depth or mixed)")
    raise SystemExit(f"{strategy} pruning cannot remove {percent}% of {total:,} parameters")


def train_quick_model(work: Path) -> Path:
    """A llama-tiny trained for a few steps on the built-in prose (quick mode only)."""
    from fucina.cli.main import main

    recipe = ROOT / "src" / "fucina" / "train" / "recipes" / "demo-pretrain.yaml"
    overrides = [
        "model.preset=llama-tiny",
        "model.context_length=64",
        "tokenizer.vocab_size=2000",
        "tokenizer.template=chatml",
        "train.batch_size=8",
        "schedule.warmup_steps=2",
        "eval.every=20",
        "checkpoint.every=20",
        "log.tensorboard=false",
    ]
    argv = ["train", str(recipe), "--out", str(work / "model"), "--steps", "20", "--no-resume"]
    if main(argv + [arg for override in overrides for arg in ("--set", override)]) != 0:
        raise SystemExit("training the quick model failed")
    return resolve_model_dir(work / "model")


def heal(pruned: Path, teacher: Path, out: Path, steps: int, quick: bool) -> float:
    """Run the healing config from `pruned` with `teacher`; returns the wall seconds it took."""
    from fucina.cli.main import main

    overrides = [
        f"init_from={pruned}",
        f"distill.teacher={teacher}",
        "log.tensorboard=false",
        "log.plot=false",
        f"eval.every={steps}",
        f"checkpoint.every={steps}",
    ]
    if quick:
        overrides += [
            "data.train=[builtin]",
            "train.batch_size=4",
            "eval.max_batches=2",
            "data.min_val_docs=1",
        ]
    argv = ["train", str(HEAL_CONFIG), "--out", str(out), "--steps", str(steps), "--no-resume"]
    start = time.perf_counter()
    if main(argv + [arg for override in overrides for arg in ("--set", override)]) != 0:
        raise SystemExit(f"healing {pruned} failed")
    return time.perf_counter() - start


def heldout_sets(max_chars: int, quick: bool) -> dict[str, list[str]]:
    """The first `max_chars` characters of held-out ELTeC and Wikipedia (built-in prose when quick)."""
    if quick:
        return {
            "builtin": [path.read_text(encoding="utf-8")[:max_chars] for path in builtin_prose_files()[-2:]]
        }
    from fucina.evaluate.heldout import heldout_texts

    sets = {}
    for name in ("eltec", "wikipedia"):
        kept, total = [], 0
        for text in heldout_texts(None, name):
            kept.append(text[: max_chars - total])
            total += len(kept[-1])
            if total >= max_chars:
                break
        sets[name] = kept
    return sets


def tokens_per_second(model, prompt: list[int], new_tokens: int, repeats: int) -> float:
    sampling = SamplingConfig(max_new_tokens=new_tokens, greedy=True)
    generate(model, [prompt], SamplingConfig(max_new_tokens=4, greedy=True))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate(model, [prompt], sampling)[0]
        best = min(best, (time.perf_counter() - start) / max(len(out), 1))
    return 1.0 / best


def measure(path: Path, heldout: dict[str, list[str]], args: argparse.Namespace) -> dict:
    model, tokenizer = load_pretrained(path)
    prompt = tokenizer.encode(" ".join(next(iter(heldout.values())))[:400])[:32]
    result = {"parameters": sum(p.numel() for p in model.parameters())}
    for name, texts in heldout.items():
        result[f"bpb_{name}"] = evaluate_texts(
            model, tokenizer, texts, name=name, show_progress=False
        ).bits_per_byte
    result["tokens_per_second"] = tokens_per_second(model, prompt, args.new_tokens, args.repeats)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REFERENCE / "llama-30m-pretrain"), help="the trained model")
    parser.add_argument(
        "--calibration", default=str(REFERENCE / "data" / "wikipedia_train.jsonl"), help="calibration text"
    )
    parser.add_argument("--plans", default="25:width,25:depth,50:mixed", help="PERCENT:STRATEGY,...")
    parser.add_argument("--heal-steps", type=int, default=300, help="distillation steps per plan")
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument("--heldout-chars", type=int, default=200_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny model and budgets: proves the script runs")
    args = parser.parse_args()
    if args.quick:
        args.plans, args.heal_steps, args.calibration_tokens = "25:width,50:mixed", 3, 2048
        args.heldout_chars, args.new_tokens, args.repeats, args.threads = 3_000, 8, 1, 1
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = train_quick_model(work) if args.quick else resolve_model_dir(args.model)
        heldout = heldout_sets(args.heldout_chars, args.quick)
        from fucina.data.readers import iter_texts

        calibration_source = builtin_prose_files() if args.quick else [args.calibration]
        results = {"unpruned": measure(model_dir, heldout, args)}
        print(f"unpruned: {results['unpruned']}", flush=True)
        config = load_pretrained(model_dir)[0].config
        for item in args.plans.split(","):
            percent, strategy = item.split(":")
            spec = plan(config, float(percent), strategy)
            pruned = work / f"pruned-{percent}-{strategy}"
            prune_model_dir(
                model_dir,
                pruned,
                spec,
                calibration=iter_texts(calibration_source),
                calibration_tokens=args.calibration_tokens,
            )
            entry = {"spec": dataclasses.asdict(spec), "pruned": measure(pruned, heldout, args)}
            entry["config"] = {
                k: getattr(load_pretrained(pruned)[0].config, k)
                for k in ("n_layers", "n_heads", "n_kv_heads", "d_ff")
            }
            entry["heal_seconds"] = heal(
                pruned, model_dir, work / f"heal-{item}", args.heal_steps, args.quick
            )
            entry["healed"] = measure(resolve_model_dir(work / f"heal-{item}"), heldout, args)
            base = results["unpruned"]
            entry["parameter_reduction"] = 1 - entry["pruned"]["parameters"] / base["parameters"]
            entry["healed_bpb_vs_unpruned"] = {
                name: entry["healed"][f"bpb_{name}"] / base[f"bpb_{name}"] - 1 for name in heldout
            }
            results[item] = entry
            print(f"{item}: {entry}", flush=True)

    report = {
        "model": "llama-tiny trained 20 steps (built-in prose)" if args.quick else str(args.model),
        "heal_config": str(HEAL_CONFIG.relative_to(ROOT)),
        "heal_steps": args.heal_steps,
        "importance": "activation",
        "calibration": "built-in prose" if args.quick else args.calibration,
        "calibration_tokens": args.calibration_tokens,
        "heldout": {name: f"first {args.heldout_chars} characters" for name in heldout},
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "quick": args.quick,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "target": "25% fewer parameters within 5% of the unpruned bits per byte after <= 30 min CPU healing",
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("prune_heal_quick.json" if args.quick else "prune_heal.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
