"""Batched decoding with a server's cache: compiled against eager, the attention window on and off.

A server's engine sizes its cache to the model's context, so most slots are empty while replies are
short. Eager steps attend only the filled slots; a compiled step keeps one shape, and before the
attention window (inference/engine.py) it attended every slot, which at 32 rows read more keys and
values than a small model's weights and made `compile=True` slower than eager. For each precision this
measures, in one run, tokens/s of `--rows` greedy rows decoding `--new-tokens` each (prefill excluded)
with the cache at the model's full context:
- eager;
- compiled, attending every slot (the window turned off: the step before the change);
- compiled, attending the window (the default).

    python bench/batched_decode.py --model runs/reference/llama-30m-pretrain --threads 2
    python bench/batched_decode.py --quick      # the script works (a tiny random model, seconds)
Results: bench/results/batched_decode.json (quick: batched_decode_quick.json).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from decode_speed import decode_rate

from fucina.compress.quantize import quantize_model
from fucina.model.config import ModelConfig
from fucina.model.transformer import Transformer
from fucina.model_dir import load_pretrained

RESULTS = Path(__file__).parent / "results"
MODES = {"eager": (False, True), "compiled, every slot": (True, False), "compiled, window": (True, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a trained model or run directory")
    parser.add_argument("--precisions", default="fp32,bf16,int8,int4")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny random model: proves the script runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.rows, args.new_tokens, args.repeats, args.precisions = 4, 80, 1, "fp32,int8"
    elif not args.model:
        parser.error("--model is required (or --quick)")
    results: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "torch": torch.__version__,
        "rows": args.rows,
        "new_tokens": args.new_tokens,
        "tokens_per_second": {},
    }
    results["model"] = str(args.model or "tiny random model")
    for name in args.precisions.split(","):
        if args.quick:
            torch.manual_seed(0)
            config = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, context_length=256)
            model = Transformer(config).eval()
        else:
            dtype = torch.bfloat16 if name == "bf16" else torch.float32
            model, _ = load_pretrained(args.model, dtype=dtype)
        if name.startswith("int"):
            quantize_model(model, bits=int(name[3:]))
        results["context"] = model.config.context_length
        prompt = list(range(1, 33))
        entry = {
            mode: round(
                decode_rate(
                    model,
                    prompt,
                    args.new_tokens,
                    args.rows,
                    compile,
                    args.repeats,
                    max_length=model.config.context_length,  # a server's cache: the whole context
                    window=window,
                ),
                1,
            )
            for mode, (compile, window) in MODES.items()
        }
        results["tokens_per_second"][name] = entry
        print(name, entry, flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"batched_decode{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
