"""Training throughput of fucina's own loop on one GPU: tokens/s, ms per step and MFU.

Each case runs `fucina train` (the one training loop: bf16 autocast, torch.compile, attention through
SDPA, which picks flash attention for causal bf16 on CUDA) for a few steps on real text, reads tokens/s
from the run's metrics.jsonl after the compile warm-up, and turns it into MFU with model/info.py's FLOP
count (training = 3 x forward, attention over the full context as nanoGPT and PaLM count it) against the
device's peak dense bf16 rate (`--peak-tflops`; 989 for H100/H200 SXM, nanoGPT's A100 figure uses 312).

    python bench/gpu_train_speed.py --data DATA.jsonl.xz \
        --case gpt2-real:12:1024:TOKENIZER_DIR --case microdac:8:1024:TOKENIZER_DIR --out bench/results/gpu_train_speed.json

Needs a CUDA device; the tests never run it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from fucina.cli.main import main as fucina_main
from fucina.model.info import count_parameters, flops_per_token
from fucina.model.io import load_config


def run_case(
    preset: str, batch: int, context: int, tokenizer: str, data: str, steps: int, work: Path
) -> dict:
    """Train `steps` steps of `preset` and measure the steady-state speed of the loop."""
    run = work / f"{preset}-{batch}x{context}"
    config = {
        "stage": "pretrain",
        "model": {"preset": preset, "context_length": context},
        "tokenizer": {"path": str(Path(tokenizer).resolve())},
        "data": {"train": [str(Path(data).resolve())], "val_fraction": 0.002, "min_val_docs": 4},
        "train": {"batch_size": batch, "max_steps": steps, "precision": "bf16", "compile": True, "seed": 0},
        "eval": {"every": 0, "max_batches": 2},
        "checkpoint": {"every": steps * 10},
        "log": {"every": 5, "progress": False, "tensorboard": False, "plot": False},
    }
    path = work / f"{preset}.yaml"
    path.write_text(yaml.safe_dump(config))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    code = fucina_main(["train", str(path), "--out", str(run)])
    wall = time.perf_counter() - started
    if code:
        raise SystemExit(f"fucina train failed for {preset} (exit {code})")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if r.get("kind") == "train" and r["step"] > steps // 3]
    tokens_per_s = statistics.median(speeds)
    model_config = load_config(run)
    flops = flops_per_token(model_config, context)
    return {
        "preset": preset,
        "batch_size": batch,
        "context_length": context,
        "tokens_per_step": batch * context,
        "parameters": count_parameters(model_config).total,
        "training_flops_per_token": flops.training,
        "tokens_per_s": round(tokens_per_s, 1),
        "ms_per_step": round(1000 * batch * context / tokens_per_s, 2),
        "achieved_tflops": round(flops.training * tokens_per_s / 1e12, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if torch.cuda.is_available()
        else None,
        "wall_seconds_with_compile": round(wall, 1),
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="training text (.jsonl, .xz)")
    parser.add_argument("--case", action="append", required=True, help="PRESET:BATCH:CONTEXT:TOKENIZER_DIR")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device's dense bf16 peak")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_train_speed needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    results = []
    with tempfile.TemporaryDirectory() as work:
        for case in args.case:
            preset, batch, context, tokenizer = case.split(":", 3)
            result = run_case(preset, int(batch), int(context), tokenizer, args.data, args.steps, Path(work))
            result["mfu"] = round(result["achieved_tflops"] / args.peak_tflops, 4)
            print(json.dumps(result), flush=True)
            results.append(result)
    report = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "peak_tflops_bf16": args.peak_tflops,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
