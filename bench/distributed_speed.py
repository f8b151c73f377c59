"""Training tokens/s of one process against two (DDP and FSDP under torchrun, gloo) on this CPU.

The same model, data and global batch (16 x 256 tokens per step): one process with every core's
threads, and two processes with the threads split between them. On a 2-core machine two processes can
at best match one; the point is the cost of the distributed machinery, measured honestly.

    python bench/distributed_speed.py --preset llama-30m --steps 30
    python bench/distributed_speed.py --quick        # seconds, numbers meaningless
Results: bench/results/distributed_speed.json (quick: distributed_speed_quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

RESULTS = Path(__file__).parent / "results"


def run(config: dict, processes: int, threads: int, work: Path, name: str) -> dict:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    launcher = [sys.executable, "-m", "fucina"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(processes), "-m", "fucina"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [
        *launcher,
        "train",
        str(path),
        "--out",
        str(work / name),
        "--set",
        f"train.num_threads={threads}",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if r["kind"] == "train"][1:]  # the first holds warm-up
    return {
        "processes": processes,
        "threads_each": threads,
        "tokens_per_s": round(statistics.median(speeds), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-30m")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data", default=None, help="training text (default: the built-in corpus)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    preset, steps, batch, context = args.preset, args.steps, 16, 256
    if args.quick:
        preset, steps, batch, context = "gpt2-tiny", 6, 4, 64
    base = {
        "stage": "pretrain",
        "model": {"preset": preset, "context_length": context},
        "tokenizer": {"vocab_size": 2000},
        "data": {
            "train": [str(Path(args.data).resolve())] if args.data else ["builtin"],
            "val_fraction": 0.05,
        },
        "train": {"max_steps": steps, "batch_size": batch, "seed": 0},
        "eval": {"every": 0, "max_batches": 4},
        "checkpoint": {"every": 100000},
        "log": {"every": 2, "progress": False, "tensorboard": False, "plot": False},
    }
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results.append({"strategy": "none", **run(base, 1, cores, work, "single")})
        for strategy in ("ddp", "fsdp"):
            config = {
                **base,
                "train": {**base["train"], "batch_size": batch // 2},
                "dist": {"strategy": strategy},
            }
            results.append({"strategy": strategy, **run(config, 2, max(cores // 2, 1), work, strategy)})
    single = results[0]["tokens_per_s"]
    for row in results:
        row["vs_single"] = round(row["tokens_per_s"] / single, 3)
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores},
        "preset": preset,
        "global_batch": f"{batch} x {context} tokens",
        "steps": steps,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"distributed_speed{'_quick' if args.quick else ''}.json").write_text(
        json.dumps(report, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
