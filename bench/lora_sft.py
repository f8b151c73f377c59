"""LoRA against full fine-tuning (issue 16, results 6a): chat SFT of a pretrained model at equal steps.

Three runs from the same pretrained model, on the same chat data, split, order and step count: full SFT
(every weight trains), and LoRA on all linear projections at rank 8 and 16 (alpha = 2 * rank, the base
frozen). Reported per run: trainable parameters, the size of the last checkpoint (weights or adapters
plus optimizer state), the size of the published model directory's weights, training tokens/s, and
the held-out assistant bits per byte of the final weights (the SFT validation split: user turns and
chat headers masked, so only the assistant's answers count).

    python bench/lora_sft.py --model runs/reference/llama-30m-pretrain --steps 300
    python bench/lora_sft.py --model ... --steps 300 --ranks 16 --targets all-linear lm_head --no-full
    python bench/lora_sft.py --quick      # seconds: a tiny base pretrained on the spot, 6 steps each
Results: bench/results/lora_sft.json (quick: lora_sft_quick.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from fucina.adapt.lora import adapter_state_dict
from fucina.model_dir import load_pretrained, resolve_model_dir
from fucina.train.config import config_from_dict
from fucina.train.loop import train

RESULTS = Path(__file__).parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_DATA = [  # the reference chat model's SFT data (configs/reference-llama-30m-sft.yaml)
    SHARED / "xpersona-it" / "xpersona_it_valid.chat.jsonl",
    SHARED / "jilda" / "jilda.chat.jsonl",
    SHARED / "chatterbot-it" / "chatterbot_it.chat.jsonl",
]


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _run_config(model: Path, data: list[str], steps: int, lr: float, lora: dict | None, quick: bool) -> dict:
    config = {
        "stage": "sft",
        "init_from": str(model),
        "data": {"train": data, "val_fraction": 0.05, "train_on": "all"},
        "optim": {"lr": lr, "weight_decay": 0.0 if lora else 0.1},
        "schedule": {"name": "cosine", "warmup_steps": max(1, steps // 10), "min_lr": lr / 10},
        "train": {"max_steps": steps, "batch_size": 8, "precision": "fp32" if quick else "bf16", "seed": 0},
        "eval": {"every": 0, "max_batches": 2 if quick else None},
        "checkpoint": {"every": steps, "keep_last": 1},
        "log": {"every": max(1, steps // 10), "progress": False, "tensorboard": False, "plot": False},
    }
    if lora is not None:
        config["lora"] = lora
    return config


def run_one(
    name: str, model: Path, data: list[str], steps: int, lr: float, lora: dict | None, out: Path, quick: bool
) -> dict:
    run = out / name
    started = time.perf_counter()
    result = train(config_from_dict(_run_config(model, data, steps, lr, lora, quick)), run, overwrite=True)
    loaded, _ = load_pretrained(run / "final")
    trainable = sum(t.numel() for t in adapter_state_dict(loaded).values()) if lora else _count(loaded)
    checkpoints = sorted((run / "checkpoints").iterdir())
    return {
        "run": name,
        "lora": lora,
        "lr": lr,
        "steps": result.steps,
        "trainable_parameters": trainable,
        "total_parameters": _count(loaded),
        "checkpoint_bytes": _directory_bytes(checkpoints[-1]),
        "published_weights_bytes": (run / "final" / "model.safetensors").stat().st_size,
        "tokens_per_second": round(result.tokens_per_second, 1),
        "train_seconds": round(result.train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "heldout_assistant_bpb": result.last_eval.val_bpb if result.last_eval else None,
        "heldout_assistant_loss": result.last_eval.val_loss if result.last_eval else None,
    }


def _count(model: torch.nn.Module) -> int:
    """Parameters of a model, a tied matrix once."""
    return sum(p.numel() for p in model.parameters())


def _quick_base(directory: Path) -> Path:
    """A tiny LLaMA-style model pretrained for a few steps on the built-in prose (the --quick base)."""
    config = {
        "model": {
            "preset": "gpt2-tiny",
            "context_length": 64,
            "positions": "rope",
            "norm": "rmsnorm",
            "mlp": "swiglu",
        },
        "tokenizer": {"vocab_size": 400},
        "data": {"train": ["builtin"]},
        "train": {"max_steps": 10, "batch_size": 8},
        "eval": {"every": 0, "max_batches": 1},
        "log": {"progress": False, "tensorboard": False, "plot": False},
    }
    train(config_from_dict(config), directory / "base")
    return directory / "base"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="the pretrained model or run directory (the frozen base)")
    parser.add_argument("--data", nargs="+", help="chat JSONL files (default: the reference SFT data)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every run")
    parser.add_argument("--full-lr", type=float, default=3e-4, help="peak rate of full SFT")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="peak rate of the LoRA runs")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument(
        "--targets", nargs="+", default=["all-linear"], help="lora.targets, e.g. all-linear lm_head"
    )
    parser.add_argument(
        "--no-full", action="store_true", help="LoRA runs only, added to the runs already in the JSON"
    )
    parser.add_argument("--out", help="where the runs go (default: a temporary directory)")
    parser.add_argument("--quick", action="store_true", help="a tiny base and 6 steps: checks the script")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        if args.quick:
            model, data, steps = _quick_base(out), ["builtin:chat"], 6
        else:
            if not args.model:
                parser.error("--model is required (or --quick)")
            model, steps = resolve_model_dir(args.model), args.steps
            data = [str(p) for p in (args.data or DEFAULT_DATA)]
        runs = (
            [] if args.no_full else [run_one("full", model, data, steps, args.full_lr, None, out, args.quick)]
        )
        extra = "".join(f"+{t}" for t in args.targets if t != "all-linear")
        for rank in args.ranks:
            lora = {"rank": rank, "alpha": 2 * rank, "targets": args.targets}
            name = f"lora-r{rank}{extra}"
            runs.append(run_one(name, model, data, steps, args.lora_lr, lora, out, args.quick))
    path = RESULTS / ("lora_sft_quick.json" if args.quick else "lora_sft.json")
    command = " ".join(["python", "bench/lora_sft.py", *(argv if argv is not None else sys.argv[1:])])
    if args.no_full and path.exists():  # keep the earlier runs, replacing any of the same name
        earlier = json.loads(path.read_text())
        names = {run["run"] for run in runs}
        runs = [r for r in earlier["runs"] if r["run"] not in names] + runs
        command = f"{earlier['command']}; {command}"
    report = {
        "benchmark": "LoRA vs full SFT at equal steps (issue 16, 6a)",
        "model": str(model) if not args.quick else "tiny base (--quick)",
        "data": data,
        "steps": steps,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "command": command,
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for run in runs:
        print(
            f"{run['run']:>9}: {run['trainable_parameters']:>11,} trainable, checkpoint "
            f"{run['checkpoint_bytes'] / 2**20:7.2f} MiB, {run['tokens_per_second']:>8.0f} tok/s, "
            f"held-out assistant bpb {run['heldout_assistant_bpb']:.4f}"
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
