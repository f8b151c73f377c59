"""Decoding speed in every precision, side by side with llama.cpp, against the machine's bandwidth.

For one trained LLaMA-style model (--model, or the llama-30m shape trained briefly on the built-in prose,
as bench/quantize_speed.py does), in one run:
- the memory bandwidth of this machine, measured here (a large float32 tensor summed: bytes read / s);
- fucina batch-1 greedy tokens/s, prefill excluded, eager and `compile=True`, for fp32, bf16, int8 and
  int4, with the bytes of weights each token reads and the fraction of the bandwidth that makes;
- llama.cpp (llama-cpp-python on fucina's own GGUF exports) batch-1 tokens/s, prefill excluded as
  llama.cpp measures it, for f32, f16, q8_0 and q4_0, same threads, with bytes per token likewise;
- fucina tokens/s at batch 8 and 32 (all rows decoding, compiled and eager);
- what bounds a batch-1 step, per precision: the compiled weight products alone (the bytes each token
  must read, at the kernels' own speed) against the whole compiled step, and an eager step's time by op
  (torch.profiler);
- bits per byte on held-out ELTeC text of every fucina precision and of every GGUF level (the GGUF
  blocks dequantized into fucina, interop/gguf_weights.py: the weights llama.cpp reads).
llama.cpp is loaded with use_extra_bufts off: its AMX weight repacking crashes in llama-cpp-python
0.3.36 built on an AMX CPU (tests/interop/test_llama_cpp_interop.py); the JSON records it.

Full run (the lead, alone on the machine):
    python bench/decode_speed.py --preset llama-30m --train-steps 300 --threads 2
    python bench/decode_speed.py --model runs/reference/llama-30m-pretrain --threads 2
Quick check that the script works (about a minute, numbers meaningless): python bench/decode_speed.py --quick
Results go to bench/results/decode_speed.json (quick: decode_speed_quick.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from quantize_speed import heldout, train_model

from fucina.compress import quantize_model_dir
from fucina.compress.quantized_layers import Int4Linear, Int8Linear
from fucina.evaluate.intrinsic import evaluate_texts
from fucina.inference.cpu_kernels import PackedLinear, decoding_view
from fucina.inference.engine import Engine
from fucina.inference.generate import SamplingConfig
from fucina.interop.gguf import export_gguf
from fucina.interop.gguf_weights import load_gguf_weights
from fucina.interop.source import load_source
from fucina.model.transformer import Transformer
from fucina.model_dir import load_pretrained, resolve_model_dir

RESULTS = Path(__file__).parent / "results"
PAIRS = {"fp32": "f32", "bf16": "f16", "int8": "q8_0", "int4": "q4_0"}  # fucina -> llama.cpp counterpart
GGUF_LEVELS = ("f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")  # bits per byte of each


def bandwidth(megabytes: int, repeats: int = 5) -> dict[str, float]:
    """Bytes per second this machine moves through tensors far larger than its caches, two ways: a
    float32 sum (bytes read) and a copy (bytes read + written). The larger is the ceiling used."""
    data = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(data)
    data.sum(), target.copy_(data)
    read = data.nbytes / min(_timed(data.sum) for _ in range(repeats))
    copy = 2 * data.nbytes / min(_timed(lambda: target.copy_(data)) for _ in range(repeats))
    return {"sum_read": read, "copy_read_write": copy, "ceiling": max(read, copy)}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights one decoding step reads: every matrix and vector except the embedding table
    (one row of it per token), quantized layers by the buffers their kernels read."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            total += module.weight.nbytes + module.scale.nbytes
        elif isinstance(module, Int4Linear):
            total += module._packed.nbytes + module._scale_and_zero.nbytes
        else:
            for tensor_name, tensor in module.named_parameters(recurse=False):
                if f"{name}.{tensor_name}" != "token_embedding.weight" or model.config.tie_embeddings:
                    total += tensor.nbytes
    return total


def decode_rate(
    model,
    prompt: list[int],
    new_tokens: int,
    rows: int,
    compile: bool,
    repeats: int,
    max_length: int | None = None,
    window: bool = True,
) -> float:
    """Tokens/s of `rows` greedy rows decoding together, prefill (the first step) excluded.

    The cache holds `max_length` slots (default: what the rows need, rounded up to a power of two);
    `window=False` makes compiled steps of several rows attend every slot (the engine before its window).
    """
    sampling = SamplingConfig(max_new_tokens=new_tokens, greedy=True)
    needed = 1 << (len(prompt) + new_tokens - 1).bit_length()
    length = max_length or min(model.config.context_length, max(128, needed))
    best = 0.0
    for _ in range(repeats + 1):  # the first run warms up (and compiles)
        engine = Engine(model, max_batch=rows, max_length=length, compile=compile)
        if not window:
            engine.smallest_window = None
        for _ in range(rows):
            engine.add(prompt, sampling)
        engine.step()  # admits the rows (prefill) and decodes their first token
        produced, start = 0, time.perf_counter()
        while not engine.idle:
            produced += sum(event.token is not None for event in engine.step())
        best = max(best, produced / (time.perf_counter() - start))
    return best


@contextlib.contextmanager
def without_weight_repacking(llama_cpp):
    """use_extra_bufts off for the models loaded inside (see the module docstring)."""
    module = llama_cpp.llama.llama_cpp
    default = module.llama_model_default_params

    def params():
        value = default()
        value.use_extra_bufts = False
        return value

    module.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_model_default_params = default


def llama_cpp_rate(path: Path, prompt: list[int], new_tokens: int, threads: int, repeats: int) -> float | str:
    """llama.cpp's batch-1 greedy tokens/s, prefill excluded, or why it was not measured."""
    try:
        import llama_cpp
    except ImportError:
        return "llama-cpp-python not installed (make test-interop installs it)"
    with without_weight_repacking(llama_cpp):
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads, verbose=False
        )
    best = 0.0
    try:
        for _ in range(repeats + 1):  # the first run warms up
            llm.reset()
            llm.eval(prompt)
            start, produced = time.perf_counter(), 0
            for _token in llm.generate([], temp=0.0, reset=False):
                produced += 1
                if produced == new_tokens:
                    break
            best = max(best, new_tokens / (time.perf_counter() - start))
    finally:
        llm.close()
    return best


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of the GGUF tensors one token reads (all but the embedding table)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")


def weight_products(model: Transformer) -> list[torch.nn.Module]:
    """The decoding view's weight products (packed float, int8, int4 layers), in model order."""
    kinds = (PackedLinear, Int8Linear, Int4Linear)
    return [m for m in decoding_view(model).module.modules() if isinstance(m, kinds)]


@torch.inference_mode()
def step_profile(model: Transformer, prompt: list[int], compiled_rate: float, bytes_per_token: int) -> dict:
    """What bounds one batch-1 step: the compiled weight products alone against the whole compiled
    step, and where an eager step spends its time (torch.profiler, ops by self CPU time)."""
    layers = weight_products(model)
    dtype = next(model.parameters()).dtype
    rows = [torch.randn(1, 1, getattr(layer, "linear", layer).in_features, dtype=dtype) for layer in layers]
    products = torch.compile(lambda xs: [layer(x) for layer, x in zip(layers, xs)], dynamic=False)
    for _ in range(3):
        products(rows)
    products_s = min(_timed(lambda: products(rows)) for _ in range(30))
    step_s = 1 / compiled_rate

    length = model.config.context_length
    engine = Engine(model, max_batch=1, max_length=length)
    engine.add(prompt, SamplingConfig(max_new_tokens=min(40, length - len(prompt) - 1), greedy=True))
    engine.step()
    engine.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        steps = 0
        while not engine.idle:
            engine.step()
            steps += 1
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return {
        "compiled_step_ms": step_s * 1e3,
        "compiled_products_only_ms": products_s * 1e3,
        "products_share_of_step": products_s / step_s,
        "products_bytes_per_second": bytes_per_token / products_s,
        "eager_top_ops": [
            {
                "op": e.key,
                "ms_per_step": e.self_cpu_time_total / steps / 1e3,
                "share": e.self_cpu_time_total / total,
            }
            for e in events[:8]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a trained LLaMA-style model or run directory (default: train one)")
    parser.add_argument("--preset", default="llama-30m")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--heldout-chars", type=int, default=200_000)
    parser.add_argument("--bandwidth-mb", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="tiny model and budgets: proves the script runs")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.train_steps, args.context, args.batches = "llama-tiny", 3, 64, [8]
        args.heldout_chars, args.new_tokens, args.repeats, args.bandwidth_mb = 5_000, 16, 0, 256
    torch.set_num_threads(args.threads)
    bandwidths = bandwidth(args.bandwidth_mb)
    measured_bandwidth = bandwidths["ceiling"]
    print(f"bandwidth: {measured_bandwidth / 1e9:.1f} GB/s ({bandwidths})", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = (
            resolve_model_dir(args.model)
            if args.model
            else train_model(work, args.preset, args.train_steps, args.context)
        )
        source_name, texts = heldout(args.heldout_chars)
        paths = {"fp32": model_dir, "bf16": model_dir}
        for bits in (8, 4):
            paths[f"int{bits}"] = quantize_model_dir(model_dir, work / f"int{bits}", bits=bits).path
        fucina, prompt = {}, None
        for name, path in paths.items():
            model, tok = load_pretrained(path, dtype=torch.bfloat16 if name == "bf16" else torch.float32)
            prompt = prompt or tok.encode(" ".join(texts)[:400])[:32]
            entry = {"bytes_per_token": weight_bytes_per_token(model)}
            entry["bits_per_byte"] = evaluate_texts(
                model, tok, texts, name=name, show_progress=False
            ).bits_per_byte
            for compile in (False, True):
                mode = "compiled" if compile else "eager"
                rate = decode_rate(model, prompt, args.new_tokens, 1, compile, args.repeats)
                entry[f"tokens_per_second_{mode}"] = rate
                entry[f"bandwidth_fraction_{mode}"] = rate * entry["bytes_per_token"] / measured_bandwidth
                for rows in args.batches:
                    entry[f"tokens_per_second_batch{rows}_{mode}"] = decode_rate(
                        model, prompt, args.new_tokens, rows, compile, max(args.repeats - 1, 0)
                    )
            entry["profile"] = step_profile(
                model, prompt, entry["tokens_per_second_compiled"], entry["bytes_per_token"]
            )
            fucina[name] = entry
            print(f"fucina {name}: {entry}", flush=True)

        source, llama_cpp_results = load_source(model_dir), {}
        for level in GGUF_LEVELS:
            path = export_gguf(source, work / f"model-{level}.gguf", quant=level).path
            restored = load_gguf_weights(Transformer(source.model.config), path).eval()
            entry = {
                "bytes_per_token": gguf_bytes_per_token(path),
                "bits_per_byte": evaluate_texts(
                    restored, source.tokenizer, texts, name=level, show_progress=False
                ).bits_per_byte,
            }
            if level in PAIRS.values():
                rate = llama_cpp_rate(path, prompt, args.new_tokens, args.threads, args.repeats)
                entry["tokens_per_second"] = rate
                if isinstance(rate, float):
                    entry["bandwidth_fraction"] = rate * entry["bytes_per_token"] / measured_bandwidth
            llama_cpp_results[level] = entry
            print(f"llama.cpp {level}: {entry}", flush=True)
        config = source.model.config

    side_by_side = {}
    fp32_bpb = fucina["fp32"]["bits_per_byte"]
    for ours, theirs in PAIRS.items():
        best = max(fucina[ours]["tokens_per_second_eager"], fucina[ours]["tokens_per_second_compiled"])
        rate = llama_cpp_results[theirs].get("tokens_per_second")
        side_by_side[f"{ours} / {theirs}"] = {
            "fucina_best_tokens_per_second": best,
            "llama_cpp_tokens_per_second": rate,
            "ratio": best / rate if isinstance(rate, float) else None,
            "fucina_bpb_vs_fp32": fucina[ours]["bits_per_byte"] / fp32_bpb - 1,
        }
    report = {
        "model": str(args.model) if args.model else f"{args.preset} trained {args.train_steps} steps",
        "config": {k: getattr(config, k) for k in ("n_layers", "d_model", "vocab_size", "context_length")},
        "heldout": source_name,
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "quick": args.quick,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "bandwidth_bytes_per_second": measured_bandwidth,
        "bandwidth_measures": bandwidths,
        "llama_cpp_weight_repacking": False,
        "targets": {"int8 / q8_0": 1.0, "int4 / q4_0": 1.0, "fp32 / f32": 0.9},
        "side_by_side": side_by_side,
        "fucina": fucina,
        "llama_cpp": llama_cpp_results,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("decode_speed_quick.json" if args.quick else "decode_speed.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(side_by_side, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
