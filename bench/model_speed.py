"""Speed of fucina's model against Hugging Face transformers models of the same shape, same machine, same run.

Measures, for the `picodac` and `llama-30m` presets (random weights):
- training step (forward, backward, AdamW step) tokens/s, in fp32 and under bf16 autocast;
- greedy generation tokens/s at batch 1 with a KV cache (128 new tokens after a 16-token prompt),
  fucina's `generate` (eager, and with compile=True) against transformers' `model.generate(do_sample=
  False, min/max_new_tokens=128)`, with fp32 weights and with both models cast to bf16;
- achieved FLOP/s (fucina.model.info.flops_per_token: 6N + attention per token for training, 2N +
  attention for generation) as a fraction of this machine's matmul ceiling, measured here with large
  fp32 and bf16 matmuls; for generation also the weight bytes streamed per second (batch 1 reads every
  weight matrix once per token, and one row of each embedding table).
fucina and HF runs are interleaved round by round (median of the rounds) so that drift in the machine's
load hits both alike. Each side computes the token-mean cross-entropy its own way, as its training code
does (transformers: float32 logits -> cross_entropy; fucina: `model(ids, labels=...)`, the LM head fused
with the loss, fucina/model/loss.py); both use the same optimizer (torch AdamW, fused when torch supports
it on the device) and the same thread count.

HF peers: llama-30m -> LlamaForCausalLM of identical shape (same parameter count). picodac (RMSNorm,
learned positions, non-gated SiLU MLP, tied head, no biases) has no exact HF class; its peer is a
LlamaForCausalLM of the same width, depth, heads, vocabulary and tied head with intermediate size
2/3 * 960 = 640, so its SwiGLU has the same weights and FLOPs as picodac's MLP (it uses RoPE instead of
learned positions). For generation picodac's context is raised to 256 so that 128 new tokens fit.
On a CUDA machine everything is measured there as well (MFU against the GPU's measured ceiling).

    .venv/bin/python bench/model_speed.py [--quick] [--threads N] [--models picodac llama-30m]
        [--parts training generation] [--out bench/results/model_speed.json]

--quick (seconds, numbers meaningless) writes bench/results/model_speed_quick.json instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fucina.inference.generate import SamplingConfig, generate
from fucina.model.config import ModelConfig
from fucina.model.info import flops_per_token
from fucina.model.transformer import Transformer
from fucina.presets import get_preset

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT_LENGTH = 16
NEW_TOKENS = 128
TRAIN_SHAPES = {"picodac": (32, 64), "llama-30m": (8, 256)}  # batch, sequence length


# Peers -----------------------------------------------------------------------------------------------
def hf_peer(config: ModelConfig):
    """A transformers LlamaForCausalLM with the same shape as `config` (see the module docstring)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    gated = config.mlp == "swiglu"
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ff_size if gated else 2 * config.ff_size // 3,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_size,
        max_position_embeddings=config.context_length,
        rope_theta=config.rope_base,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=config.bias,
        mlp_bias=config.bias,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(hf_config)


def hf_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' own training loss: float32 logits, mean cross-entropy (labels already shifted)."""
    return model(input_ids=input_ids, labels=labels, shift_labels=labels, use_cache=False).loss


def fucina_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fucina's training loss, as the training loop asks for it (fused LM head + cross-entropy)."""
    return model(input_ids, labels=labels) / labels.numel()


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Timing ----------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    runs: dict[str, Callable[[], int]], rounds: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """Time each run once per round, alternating; tokens/s per round -> median and spread."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(rounds):
        order = list(runs) if round_index % 2 == 0 else list(reversed(runs))
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            tokens = runs[name]()
            synchronize(device)
            rates[name].append(tokens / (time.perf_counter() - start))
    return {
        name: {"tokens_per_s": statistics.median(r), "min": min(r), "max": max(r), "rounds": len(r)}
        for name, r in rates.items()
    }


def matmul_ceiling(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    """FLOP/s of a large square matmul (the best of several), the practical peak for dense layers."""
    n = 1024 if quick or device.type == "cpu" and dtype == torch.float32 else 2048
    if device.type == "cuda":
        n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(3 if quick else 6):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# Training --------------------------------------------------------------------------------------------
def optimizer_for(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as a training run would use it; fused where torch has the kernel for the device."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)


def training_run(
    model: torch.nn.Module,
    loss_of: Callable,
    batch: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    autocast_dtype: torch.dtype | None,
) -> Callable[[], int]:
    """A closure doing `steps` training steps on `batch`; returns the tokens processed."""
    inputs, labels = batch
    device = inputs.device
    optimizer = optimizer_for(model, device)
    model.train()

    def run() -> int:
        for _ in range(steps):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = loss_of(model, inputs, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return steps * inputs.numel()

    return run


def bench_training(name: str, device: torch.device, quick: bool, ceilings: dict[str, float]) -> list[dict]:
    config = get_preset(name)
    batch_size, length = TRAIN_SHAPES[name]
    if quick:
        batch_size = max(1, batch_size // 4)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch_size, length + 1), generator=generator).to(device)
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    torch.manual_seed(0)
    ours = Transformer(config).to(device)
    peer = hf_peer(config).to(device)
    flops = flops_per_token(config, length).training
    results = []
    for label, autocast_dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        steps = 1 if quick else 2
        runs = {
            "fucina": training_run(ours, fucina_loss, batch, steps, autocast_dtype),
            "hf": training_run(peer, hf_loss, batch, steps, autocast_dtype),
        }
        for run in runs.values():  # warm-up: allocator, kernels, optimizer state
            run()
        timing = interleaved(runs, 2 if quick else 4, device)
        ceiling = ceilings[label]
        results.append(
            {
                "model": name,
                "device": device.type,
                "dtype": label,
                "batch": [batch_size, length],
                "fucina_tokens_per_s": timing["fucina"]["tokens_per_s"],
                "hf_tokens_per_s": timing["hf"]["tokens_per_s"],
                "ratio": timing["fucina"]["tokens_per_s"] / timing["hf"]["tokens_per_s"],
                "spread": timing,
                "training_flops_per_token": flops,
                "fucina_flops_per_s": flops * timing["fucina"]["tokens_per_s"],
                "fraction_of_matmul_ceiling": flops * timing["fucina"]["tokens_per_s"] / ceiling,
                "fucina_parameters": n_parameters(ours),
                "hf_parameters": n_parameters(peer),
            }
        )
    return results


# Generation ------------------------------------------------------------------------------------------
def weights_read_per_token(model: Transformer) -> int:
    """Weights one batch-1 decoding step reads: every matrix but the embedding tables, of which it
    reads one row (a tied head reads the whole token table, as the head)."""
    tables = {id(model.token_embedding.weight)}
    if model.position_embedding is not None:
        tables.add(id(model.position_embedding.weight))
    tables.discard(id(model.lm_head.weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in tables)


def bench_generation(name: str, device: torch.device, quick: bool, ceilings: dict[str, float]) -> list[dict]:
    """Batch-1 greedy generation, fp32 and bf16 weights (both sides cast alike), eager and compiled."""
    config = get_preset(name)
    new_tokens = 32 if quick else NEW_TOKENS
    if config.context_length < PROMPT_LENGTH + new_tokens:
        config = dataclasses.replace(config, context_length=256)
    prompt = torch.randint(0, config.vocab_size, (PROMPT_LENGTH,), generator=torch.Generator().manual_seed(1))
    sampling = SamplingConfig(max_new_tokens=new_tokens, greedy=True)
    hf_inputs = prompt.unsqueeze(0).to(device)
    hf_mask = torch.ones_like(hf_inputs)
    rows = []
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        ours = Transformer(config).to(device, dtype).eval()
        peer = hf_peer(config).to(device, dtype).eval()

        def fucina_run(compile: bool = False, model: Transformer = ours) -> int:
            return len(generate(model, [prompt.tolist()], sampling, compile=compile)[0])

        def hf_run(model=peer) -> int:
            with torch.inference_mode():
                out = model.generate(
                    hf_inputs,
                    attention_mask=hf_mask,
                    do_sample=False,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=0,
                )
            return out.size(1) - PROMPT_LENGTH

        runs = {"fucina": fucina_run, "fucina_compiled": lambda: fucina_run(True), "hf": hf_run}
        fucina_run()
        hf_run()
        compile_started = time.perf_counter()
        runs["fucina_compiled"]()  # compiles (inductor's disk cache may shorten it on later runs)
        compile_seconds = time.perf_counter() - compile_started
        timing = interleaved(runs, 2 if quick else 4, device)
        # Forward FLOPs at the average attended span; at batch 1 every weight is read once per token, so
        # the weight bytes per token times tokens/s is the memory traffic the matmuls need (the usual limit).
        flops = flops_per_token(config, PROMPT_LENGTH + new_tokens // 2).forward
        weight_bytes = dtype.itemsize * weights_read_per_token(ours)
        best = max(timing["fucina"]["tokens_per_s"], timing["fucina_compiled"]["tokens_per_s"])
        hf_rate = timing["hf"]["tokens_per_s"]
        rows.append(
            {
                "model": name,
                "device": device.type,
                "dtype": label,
                "forward_flops_per_token": flops,
                "fraction_of_matmul_ceiling": flops * best / ceilings[label],
                "weight_bytes_per_token": weight_bytes,
                "weight_gb_per_s": weight_bytes * best / 1e9,
                "prompt_tokens": PROMPT_LENGTH,
                "new_tokens": new_tokens,
                "context_length": config.context_length,
                "fucina_tokens_per_s": timing["fucina"]["tokens_per_s"],
                "fucina_compiled_tokens_per_s": timing["fucina_compiled"]["tokens_per_s"],
                "compile_seconds": round(compile_seconds, 1),
                "hf_tokens_per_s": hf_rate,
                "ratio": timing["fucina"]["tokens_per_s"] / hf_rate,
                "compiled_ratio": timing["fucina_compiled"]["tokens_per_s"] / hf_rate,
                "spread": timing,
            }
        )
    return rows


# Report ----------------------------------------------------------------------------------------------
def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def table(results: dict) -> str:
    lines = [f"{'measure':40s} {'fucina':>12s} {'HF':>12s} {'ratio':>7s} {'of peak':>8s}"]
    for row in results["training"]:
        label = f"train {row['model']} {row['dtype']} {row['batch'][0]}x{row['batch'][1]} ({row['device']})"
        lines.append(
            f"{label:40s} {row['fucina_tokens_per_s']:10,.0f}/s {row['hf_tokens_per_s']:10,.0f}/s "
            f"{row['ratio']:6.2f}x {100 * row['fraction_of_matmul_ceiling']:7.1f}%"
        )
    for row in results["generation"]:
        for mode, key, ratio in (
            ("eager", "fucina_tokens_per_s", "ratio"),
            ("compiled", "fucina_compiled_tokens_per_s", "compiled_ratio"),
        ):
            label = f"generate {row['model']} {row['dtype']} b1 {mode} ({row['device']})"
            lines.append(
                f"{label:40s} {row[key]:10,.1f}/s {row['hf_tokens_per_s']:10,.1f}/s {row[ratio]:6.2f}x"
            )
        lines.append(
            f"{'':40s} best: {100 * row['fraction_of_matmul_ceiling']:.1f}% of matmul peak, weights "
            f"{row['weight_gb_per_s']:.1f} GB/s; compiling took {row['compile_seconds']} s"
        )
    for device, ceilings in results["matmul_ceiling_flops"].items():
        lines.append(
            f"matmul ceiling {device}: "
            + ", ".join(f"{dtype} {value / 1e9:,.0f} GFLOP/s" for dtype, value in ceilings.items())
        )
    lines.append(
        f"load average before/after: {results['load_average_before']} / {results['load_average_after']}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps and tokens: a smoke test")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default bench/results/model_speed.json (--quick: _quick.json)"
    )
    parser.add_argument("--models", nargs="+", default=list(TRAIN_SHAPES), choices=list(TRAIN_SHAPES))
    parser.add_argument(
        "--parts", nargs="+", default=["training", "generation"], choices=["training", "generation"]
    )
    args = parser.parse_args()
    if args.out is None:
        name = "model_speed_quick.json" if args.quick else "model_speed.json"
        args.out = REPO_ROOT / "bench" / "results" / name

    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    started = time.perf_counter()
    results: dict = {
        "benchmark": "model_speed",
        "quick": args.quick,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_before": load_average(),
        "hf_peers": {
            "llama-30m": "LlamaForCausalLM, identical shape",
            "picodac": "LlamaForCausalLM, same width/depth/heads/vocab, SwiGLU intermediate 640 (= picodac's "
            "MLP weights and FLOPs), RoPE instead of learned positions",
        },
        "matmul_ceiling_flops": {},
        "training": [],
        "generation": [],
    }
    for device in devices:
        ceilings = {
            "fp32": matmul_ceiling(device, torch.float32, args.quick),
            "bf16": matmul_ceiling(device, torch.bfloat16, args.quick),
        }
        results["matmul_ceiling_flops"][device.type] = ceilings
        for name in args.models if "training" in args.parts else []:
            results["training"] += bench_training(name, device, args.quick, ceilings)
            print(
                f"[{time.perf_counter() - started:5.0f}s] training {name} on {device.type} done", flush=True
            )
        for name in args.models if "generation" in args.parts else []:
            results["generation"] += bench_generation(name, device, args.quick, ceilings)
            print(
                f"[{time.perf_counter() - started:5.0f}s] generation {name} on {device.type} done", flush=True
            )
    results["load_average_after"] = load_average()
    results["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(table(results))
    print(f"wrote {args.out} in {results['seconds']} s")


if __name__ == "__main__":
    main()
