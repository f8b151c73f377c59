"""Post-training quantization: accuracy and batch-1 speed of fp32, int8 and int4, beside llama.cpp.

For one trained model (--model, or one this script trains briefly on the built-in prose), it measures:
- validation bits per byte on held-out text (the held-out ELTeC novels of ../shared/data, or the last
  built-in prose documents when that is absent) of the fp32 model and of its int8 and int4 quantizations;
- batch-1 greedy generation tokens/s of each (prompt of 32 tokens, new tokens timed, best of 3 runs);
- llama.cpp's batch-1 tokens/s on the GGUF export (f16 and q8_0), when llama-cpp-python is installed and
  the architecture has a GGUF counterpart (LLaMA or GPT-2 style), with the same number of threads.
Targets (issue 5): int8 bits per byte within 2% of fp32; int8 >= 1.5x fp32 tokens/s at batch 1. Batch-1
decoding is bound by reading the weights, so use a model where the weights dominate: llama-30m (the
default when training; 12 layers, d 384, vocab 16000 -> ~30M parameters, 120 MB in fp32).

Full run (the lead, on a quiet machine):
    python bench/quantize_speed.py --preset llama-30m --train-steps 300 --threads 4
    python bench/quantize_speed.py --model runs/llama-30m-it --threads 4     # an existing trained model
Quick check that the script works (seconds, numbers meaningless): python bench/quantize_speed.py --quick
Results go to bench/results/quantize_speed.json (quick: quantize_speed_quick.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from fucina.compress import quantize_model_dir
from fucina.evaluate.intrinsic import evaluate_texts
from fucina.inference.generate import SamplingConfig, generate
from fucina.model_dir import load_pretrained, resolve_model_dir
from fucina.resources import builtin_prose_files

RESULTS = Path(__file__).parent / "results"


def train_model(work: Path, preset: str, steps: int, context: int) -> Path:
    """Train `preset` briefly on the built-in prose with `fucina train` (the demo recipe); its model dir."""
    from fucina.cli.main import main

    recipe = Path(__file__).parents[1] / "src" / "fucina" / "train" / "recipes" / "demo-pretrain.yaml"
    run = work / "run"
    overrides = [
        f"model.preset={preset}",
        f"model.context_length={context}",
        "tokenizer.vocab_size=4000",
        "tokenizer.template=chatml",
        "train.batch_size=8",
        "schedule.warmup_steps=10",
        f"eval.every={steps}",
        f"checkpoint.every={steps}",
    ]
    argv = ["train", str(recipe), "--out", str(run), "--steps", str(steps), "--no-resume"]
    for override in overrides:
        argv += ["--set", override]
    if main(argv) != 0:
        raise SystemExit("training the benchmark model failed")
    return resolve_model_dir(run)


def heldout(max_chars: int) -> tuple[str, list[str]]:
    """(source name, texts) to score: held-out novels of the shared data, else built-in prose."""
    try:
        from fucina.evaluate.heldout import heldout_texts

        texts, source = heldout_texts(None, "eltec"), "shared held-out eltec"
    except Exception:  # no shared data on this machine: the last built-in documents
        texts = [path.read_text(encoding="utf-8") for path in builtin_prose_files()[-3:]]
        source = "built-in prose (last 3 documents)"
    kept, total = [], 0
    for text in texts:
        kept.append(text[: max_chars - total])
        total += len(kept[-1])
        if total >= max_chars:
            break
    return source, kept


def tokens_per_second(model, prompt: list[int], new_tokens: int, repeats: int) -> float:
    sampling = SamplingConfig(max_new_tokens=new_tokens, greedy=True)
    generate(model, [prompt], SamplingConfig(max_new_tokens=4, greedy=True))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate(model, [prompt], sampling)[0]
        best = min(best, (time.perf_counter() - start) / max(len(out), 1))
    return 1.0 / best


def llama_cpp_tokens_per_second(
    model_dir: Path, work: Path, quant: str, prompt: list[int], new_tokens: int, threads: int, repeats: int
) -> float | str:
    """llama.cpp's batch-1 greedy tokens/s on the GGUF export, or the reason it was not measured."""
    try:
        import llama_cpp
    except ImportError:
        return "llama-cpp-python not installed (make test-interop installs it)"
    from fucina.errors import FucinaError
    from fucina.interop.gguf import export_gguf
    from fucina.interop.source import load_source

    try:
        path = export_gguf(load_source(model_dir), work / f"model-{quant}.gguf", quant=quant).path
    except FucinaError as err:
        return f"no GGUF: {err}"
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads, verbose=False
    )
    best = float("inf")
    try:
        for _ in range(repeats + 1):  # the first run warms up
            llm.reset()
            llm.eval(prompt)
            start, produced = time.perf_counter(), 0
            for _token in llm.generate([], temp=0.0, reset=False):
                produced += 1
                if produced == new_tokens:
                    break
            best = min(best, (time.perf_counter() - start) / new_tokens)
    finally:
        llm.close()
    return 1.0 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a trained model or run directory (default: train one briefly)")
    parser.add_argument("--preset", default="llama-30m", help="model preset to train (default llama-30m)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--context", type=int, default=256, help="context length of the trained model")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--heldout-chars", type=int, default=200_000)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny model and budgets: proves the script runs")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.train_steps, args.context = "llama-tiny", 3, 64
        args.heldout_chars, args.new_tokens, args.repeats, args.threads = 5_000, 16, 1, 1
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = (
            resolve_model_dir(args.model)
            if args.model
            else train_model(work, args.preset, args.train_steps, args.context)
        )
        variants = {"fp32": model_dir}
        for bits in (8, 4):
            variants[f"int{bits}"] = quantize_model_dir(model_dir, work / f"int{bits}", bits=bits).path
        source, texts = heldout(args.heldout_chars)
        results: dict = {}
        prompt = None
        for name, path in variants.items():
            model, tok = load_pretrained(path)
            if prompt is None:
                prompt = tok.encode(" ".join(texts)[:400])[:32]
            scored = evaluate_texts(model, tok, texts, name=name, show_progress=False)
            results[name] = {
                "bits_per_byte": scored.bits_per_byte,
                "tokens_per_second": tokens_per_second(model, prompt, args.new_tokens, args.repeats),
                "weights_mb": (Path(path) / "model.safetensors").stat().st_size / 1e6,
            }
            print(f"{name}: {results[name]}", flush=True)
        fp32 = results["fp32"]
        for name in ("int8", "int4"):
            results[name]["bpb_vs_fp32"] = results[name]["bits_per_byte"] / fp32["bits_per_byte"] - 1
            results[name]["speedup_vs_fp32"] = results[name]["tokens_per_second"] / fp32["tokens_per_second"]
        for quant in ("f16", "q8_0"):
            results[f"llama.cpp {quant}"] = {
                "tokens_per_second": llama_cpp_tokens_per_second(
                    model_dir, work, quant, prompt, args.new_tokens, args.threads, args.repeats
                )
            }
            print(f"llama.cpp {quant}: {results[f'llama.cpp {quant}']}", flush=True)
        fp32_model = load_pretrained(model_dir)[0]
        config, parameters = fp32_model.config, sum(p.numel() for p in fp32_model.parameters())

    report = {
        "model": str(args.model)
        if args.model
        else f"{args.preset} trained {args.train_steps} steps (built-in prose)",
        "parameters": parameters,
        "config": {
            k: getattr(config, k) for k in ("n_layers", "d_model", "vocab_size", "context_length", "mlp")
        },
        "heldout": source,
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "quick": args.quick,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "targets": {"int8 bpb within": 0.02, "int8 speedup at least": 1.5},
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("quantize_speed_quick.json" if args.quick else "quantize_speed.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
