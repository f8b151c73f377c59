"""The architectures side by side at small scale: dense, MoE, MLA, Mamba hybrid, BitNet, Elleci-style.

For each variant, of about the same ACTIVE size (parameters used per token), the same CPU budget:
- train from scratch for `--seconds` of wall time on the built-in Italian prose (fucina.resources), with
  a BPE tokenizer trained here on the training documents, AdamW at one learning rate for all, the LM
  loss plus the model's `auxiliary_loss()` (MoE load balance);
- report training tokens/s (tokens of the batches over the time spent in training steps) and
  validation bits per byte on held-out prose documents (never trained on) after the budget;
- report the generation memory each variant's mixers need, from fucina.model.info: KV-cache bytes per
  token (bf16) and the fixed recurrent state per sequence (Mamba).
Also printed: the cache per token and layer of every mixer at the Elleci preset's width (d 2048, 16 heads
of 128), where the differences matter.

Design choices: a minimal direct loop (model forward, cross entropy, backward, AdamW) rather than the
full trainer: nothing here but the architecture differs between rows, and no run directories are
written. The variants share d_model 128, 4 layers, 4 heads, context 128, SwiGLU, RMSNorm, RoPE, tied
head; each swaps one part (see VARIANTS). Same seed, same batches in the same order for every variant.
The number of steps differs (the budget is time, not steps): that is the trade-off being measured.
Small models on a tiny corpus: the ranking says what is cheap and what learns fast early on, not which
architecture wins at scale.

    .venv/bin/python bench/architectures.py [--seconds 120] [--threads N] [--quick]
        [--out bench/results/architectures.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fucina.errors import DataError
from fucina.model.config import ModelConfig
from fucina.model.info import attention_cache_comparison, cache_bytes_per_token, count_parameters, state_bytes
from fucina.model.transformer import Transformer
from fucina.presets import get_preset
from fucina.resources import builtin_prose_files
from fucina.tokenizer import train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 1024
CONTEXT = 128
BATCH_SIZE = 16
LEARNING_RATE = 3e-3
WARMUP_STEPS = 10
VAL_DOCUMENTS = 4  # the last prose documents by name are held out
SHARED_TRAIN_CHARS = 8_000_000  # ~2M tokens: more than the fastest variant reads in 60 s
SHARED_VAL_PASSAGES = 200

BASE = ModelConfig(
    vocab_size=VOCAB_SIZE,
    context_length=CONTEXT,
    n_layers=4,
    d_model=128,
    n_heads=4,
    d_ff=352,  # SwiGLU at ~8/3 d
    positions="rope",
    norm="rmsnorm",
    mlp="swiglu",
    bias=False,
    tie_embeddings=True,
)
# Each variant changes one part of BASE, sized so that the parameters used per token stay close.
VARIANTS: dict[str, dict] = {
    "dense": {},
    # 4 experts of half the dense FFN, top-2: the same FFN work per token, twice the FFN parameters.
    "moe": dict(ffn="moe", moe_num_experts=4, moe_top_k=2, moe_d_ff=176, moe_aux_loss_weight=0.01),
    # kv latent 64 + rope 16 keeps the projections near MHA's; the cache shrinks from 256 to 80 values.
    "mla": dict(mixer="mla", mla_kv_lora_rank=64, mla_qk_rope_head_dim=16),
    # Mamba-1 (expand 2, d_state 16) alternating with attention.
    "mamba-hybrid": dict(layer_mixers=["mamba", "attention"]),
    "bitnet": dict(linear="bitnet"),
    # Elleci's parts: Mamba and MLA layers, BitNet projections.
    "elleci-style": dict(
        layer_mixers=["mamba", "mla"], mla_kv_lora_rank=64, mla_qk_rope_head_dim=16, linear="bitnet"
    ),
}


def variant_config(name: str) -> ModelConfig:
    return dataclasses.replace(BASE, **VARIANTS[name])


# Data ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Corpus:
    """Token streams of the training and held-out documents (EOS between documents)."""

    train: torch.Tensor  # (tokens,) int64
    val: torch.Tensor
    val_bytes: int  # UTF-8 bytes of the held-out text the val tokens encode
    train_documents: int
    val_documents: int


def corpus_texts(source: str) -> tuple[str, list[str], list[str]]:
    """(description, training documents, held-out documents) of `source`.

    "wikipedia": Italian Wikipedia passages from ../shared/data, SHARED_TRAIN_CHARS of the trainable ones
    (enough that no variant sees a passage twice within a few minutes, so the fastest variant is not
    penalised for overfitting) and SHARED_VAL_PASSAGES of the held-out ones. "builtin": the built-in prose,
    the last VAL_DOCUMENTS held out (tiny: minutes of training repeat it many times over).
    """
    if source == "wikipedia":
        from fucina.evaluate.heldout import heldout_texts, training_texts

        train_texts, chars = [], 0
        for text in training_texts(None, "wikipedia"):
            train_texts.append(text)
            chars += len(text)
            if chars >= SHARED_TRAIN_CHARS:
                break
        val_texts = heldout_texts(None, "wikipedia")[:SHARED_VAL_PASSAGES]
        return "Wikipedia passages (shared data)", train_texts, val_texts
    texts = [path.read_text(encoding="utf-8") for path in builtin_prose_files()]
    return "built-in prose", texts[:-VAL_DOCUMENTS], texts[-VAL_DOCUMENTS:]


def load_corpus(vocab_size: int, source: str = "builtin") -> Corpus:
    """Training and held-out token streams of `source`; a BPE trained on the training documents only."""
    _, train_texts, val_texts = corpus_texts(source)
    tokenizer = train_tokenizer(train_texts, vocab_size=vocab_size, show_progress=False)

    def stream(documents: list[str]) -> torch.Tensor:
        ids: list[int] = []
        for text in documents:
            ids += tokenizer.encode(text) + [tokenizer.eos_id]
        return torch.tensor(ids, dtype=torch.long)

    return Corpus(
        train=stream(train_texts),
        val=stream(val_texts),
        val_bytes=sum(len(text.encode("utf-8")) for text in val_texts),
        train_documents=len(train_texts),
        val_documents=len(val_texts),
    )


def batch_at(
    tokens: torch.Tensor, step: int, batch_size: int, context: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step-th batch of random windows (same for every variant: the generator is seeded by step)."""
    generator = torch.Generator().manual_seed(step)
    starts = torch.randint(0, tokens.numel() - context - 1, (batch_size,), generator=generator)
    windows = torch.stack([tokens[s : s + context + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


# Training and evaluation -----------------------------------------------------------------------------
def learning_rate(step: int) -> float:
    return LEARNING_RATE * min(1.0, (step + 1) / WARMUP_STEPS)


def train_for(model: Transformer, corpus: Corpus, seconds: float, batch_size: int) -> dict:
    """Train until `seconds` of step time have passed; tokens/s over the steps after the first."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    context = model.config.context_length
    step, elapsed, timed, timed_tokens, loss_value = 0, 0.0, 0.0, 0, float("nan")
    while elapsed < seconds or step < 2:  # at least one timed step
        inputs, targets = batch_at(corpus.train, step, batch_size, context)
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        (loss + model.auxiliary_loss()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()  # also waits for the step to finish
        spent = time.perf_counter() - started
        elapsed += spent
        if step > 0:  # the first step pays one-off allocation costs
            timed += spent
            timed_tokens += inputs.numel()
        step += 1
    return {
        "steps": step,
        "train_tokens": step * batch_size * context,
        "train_seconds": round(elapsed, 2),
        "tokens_per_second": round(timed_tokens / timed, 1) if timed else None,
        "final_train_loss": round(loss_value, 4),
    }


@torch.no_grad()
def bits_per_byte(model: Transformer, corpus: Corpus, max_windows: int | None = None) -> float:
    """Held-out bits per byte: summed nats over non-overlapping windows / ln 2 / the bytes they cover."""
    model.eval()
    context = model.config.context_length
    tokens = corpus.val
    starts = list(range(0, tokens.numel() - 1, context))[:max_windows]
    nats, predicted = 0.0, 0
    for start in starts:
        window = tokens[start : start + context + 1].unsqueeze(0)
        logits = model(window[:, :-1])
        nats += F.cross_entropy(logits.flatten(0, 1), window[0, 1:], reduction="sum").item()
        predicted += window.size(1) - 1
    covered_bytes = corpus.val_bytes * predicted / (tokens.numel() - 1)
    return nats / math.log(2) / covered_bytes


# Memory of the mixers --------------------------------------------------------------------------------
def generation_memory(config: ModelConfig) -> dict:
    """KV cache per token (bf16, all layers) and fixed state per sequence, by kind of mixer."""
    per_layer = cache_bytes_per_token(config, 2)
    states = state_bytes(config, 2)
    kinds: dict[str, dict] = {}
    for i in range(config.n_layers):
        kind = kinds.setdefault(
            config.mixer_name(i), {"layers": 0, "cache_bytes_per_token": 0, "state_bytes": 0}
        )
        kind["layers"] += 1
        kind["cache_bytes_per_token"] += per_layer[i]
        kind["state_bytes"] += states[i]
    return {
        "cache_bytes_per_token_bf16": sum(per_layer),
        "state_bytes_per_sequence_bf16": sum(states),
        "by_mixer": kinds,
    }


def mixers_at_elleci_width() -> dict[str, int]:
    """Generation memory per layer of each mixer with Elleci's width (bf16 cache, fp32 SSM state)."""
    elleci = get_preset("elleci")
    sizes = {
        f"{name} cache bytes/token": size for name, size in attention_cache_comparison(elleci, 2).items()
    }
    mamba_layer = next(i for i in range(elleci.n_layers) if elleci.mixer_name(i) == "mamba")
    sizes["Mamba cache bytes/token"] = 0
    sizes["Mamba state bytes/sequence"] = state_bytes(elleci, 2)[mamba_layer]
    return sizes


# Report ----------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    header = (
        f"{'variant':14s} {'active':>8s} {'total':>8s} {'tok/s':>8s} {'steps':>6s} {'val bpb':>8s} "
        f"{'KV B/tok':>9s} {'state B':>8s}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        memory = row["generation_memory"]
        lines.append(
            f"{row['variant']:14s} {row['active_parameters'] / 1e6:7.2f}M {row['total_parameters'] / 1e6:7.2f}M "
            f"{row['tokens_per_second'] or 0:8.0f} {row['steps']:6d} {row['val_bits_per_byte']:8.3f} "
            f"{memory['cache_bytes_per_token_bf16']:9,d} {memory['state_bytes_per_sequence_bf16']:8,d}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=120.0, help="training budget per variant (wall time)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument(
        "--quick", action="store_true", help="to check the script runs: 1 s, batch 4, 4 val windows each"
    )
    parser.add_argument(
        "--corpus",
        choices=("auto", "wikipedia", "builtin"),
        default="auto",
        help="wikipedia (../shared/data; default when present) or the built-in prose",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default bench/results/...)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seconds = 1.0 if args.quick else args.seconds
    batch_size = 4 if args.quick else args.batch_size
    val_windows = 4 if args.quick else None
    out = args.out or REPO_ROOT / "bench" / "results" / (
        "architectures-quick.json" if args.quick else "architectures.json"
    )

    source = args.corpus
    if source == "auto":
        from fucina.evaluate.heldout import resolve_data_dir

        try:
            resolve_data_dir(None)
            source = "builtin" if args.quick else "wikipedia"
        except DataError:  # no shared data here
            source = "builtin"
    corpus = load_corpus(VOCAB_SIZE, source)
    print(
        f"{source}: {corpus.train_documents} training documents ({corpus.train.numel():,} tokens), "
        f"{corpus.val_documents} held out ({corpus.val.numel():,} tokens, {corpus.val_bytes:,} bytes); "
        f"{seconds:g} s of training per variant, batch {batch_size} x {CONTEXT}, "
        f"{torch.get_num_threads()} threads"
    )
    rows = []
    for name in args.variants:
        config = variant_config(name)
        torch.manual_seed(0)
        model = Transformer(config)
        counts = count_parameters(config)
        before = bits_per_byte(model, corpus, max_windows=val_windows)
        trained = train_for(model, corpus, seconds, batch_size)
        row = {
            "variant": name,
            "changes": VARIANTS[name],
            "total_parameters": counts.total,
            "active_parameters": counts.active,
            "non_embedding_active_parameters": counts.active - counts.embeddings,
            **trained,
            "val_bits_per_byte_at_init": round(before, 4),
            "val_bits_per_byte": round(bits_per_byte(model, corpus, max_windows=val_windows), 4),
            "generation_memory": generation_memory(config),
        }
        rows.append(row)
        print(
            f"  {name}: {row['steps']} steps, {row['tokens_per_second']} tokens/s, "
            f"val bpb {row['val_bits_per_byte_at_init']} -> {row['val_bits_per_byte']}"
        )
    print()
    print(table(rows))
    elleci = mixers_at_elleci_width()
    print("\nper layer at the Elleci width (d 2048, 16 heads of 128), bf16 cache:")
    for label, size in elleci.items():
        print(f"  {label:36s} {size:8,d}")

    results = {
        "benchmark": "architectures",
        "quick": args.quick,
        "seconds_per_variant": seconds,
        "batch_size": batch_size,
        "context_length": CONTEXT,
        "vocab_size": VOCAB_SIZE,
        "learning_rate": LEARNING_RATE,
        "base_config": BASE.to_dict(),
        "corpus": {
            "source": source,
            "train_documents": corpus.train_documents,
            "train_tokens": corpus.train.numel(),
            "val_documents": corpus.val_documents,
            "val_tokens": corpus.val.numel(),
            "val_bytes": corpus.val_bytes,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "variants": rows,
        "per_layer_memory_at_elleci_width": elleci,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
