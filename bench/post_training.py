"""Post-training results (issue 15, part 5): DPO on the reference chat model, distillation vs plain training.

dpo: on-policy pairs from the SFT model's own training conversations (XPersona-it valid, JILDA): chosen =
the dataset's answer, rejected = the model's seeded sample. Some conversations are held out. Reported
before and after DPO on the held-out pairs: log-probability preference accuracy and mean margin
(log p(chosen) - log p(rejected)), DPO's implicit reward accuracy and margin, bits per byte of the
reference (chosen) answers; plus three verbatim greedy answers of each model.

distill: a PicoDAC-shape student (the teacher's tokenizer) trained on ELTeC + Wikipedia from the LLaMA-30M
teacher (alpha 0.5, T 2, forward KL), against the same student without the teacher (a) on the same
tokens (same steps) and (b) for the same wall-clock time (more steps, same data order). Held-out ELTeC and
Wikipedia bits per byte of each.

    python bench/post_training.py dpo --sft runs/reference/llama-30m-sft
    python bench/post_training.py distill --teacher runs/reference/llama-30m-pretrain --steps 300
    python bench/post_training.py dpo --sft DIR --quick          # seconds: the script works
Results: bench/results/post_training_{dpo,distill}.json (quick: *_quick.json).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch

from fucina.data.preferences import PreferenceDataset, collate_pairs, read_preference_pairs
from fucina.data.readers import read_conversations
from fucina.evaluate.heldout import heldout_texts, resolve_data_dir
from fucina.evaluate.intrinsic import evaluate_texts
from fucina.inference.chat import chat_prompt
from fucina.inference.generate import generate
from fucina.inference.sampling import SamplingConfig
from fucina.model.io import load_config
from fucina.model_dir import load_pretrained, resolve_model_dir
from fucina.train.config import config_from_dict
from fucina.train.loop import train
from fucina.train.objectives import token_logprobs
from fucina.train.on_policy_pairs import make_preference_pairs, write_preference_pairs

RESULTS = Path(__file__).parent / "results"


def _machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


@torch.no_grad()
def _pair_scores(model, dataset: PreferenceDataset, pad_id: int) -> torch.Tensor:
    """(N, 2): summed log-probability of each held-out pair's chosen and rejected answer."""
    model.eval()
    scores = []
    for start in range(0, len(dataset), 8):
        examples = [dataset[i] for i in range(start, min(start + 8, len(dataset)))]
        batch = collate_pairs(examples, pad_id)
        both = token_logprobs(model(batch["input_ids"]), batch["labels"]).sum(-1)
        scores.append(torch.stack([both[: len(examples)], both[len(examples) :]], dim=-1))
    return torch.cat(scores)


def _chosen_bpb(scores: torch.Tensor, chosen_bytes: list[int]) -> float:
    return float(-scores[:, 0].sum() / math.log(2) / sum(chosen_bytes))


def _greedy_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 60) -> list[str]:
    ids = [chat_prompt(tokenizer, p, model.config.context_length, max_new_tokens) for p in prompts]
    stops = tuple(tokenizer.template.stop_token_ids(tokenizer))
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stops)
    return [tokenizer.decode(out).strip() for out in generate(model.eval(), ids, sampling)]


def _cut(messages: list[dict], rng: random.Random) -> list[dict]:
    ends = [
        i
        for i, m in enumerate(messages)
        if m["role"] == "assistant" and i > 0 and messages[i - 1]["role"] == "user"
    ]
    return messages[: rng.choice(ends[:3]) + 1] if ends else messages


def run_dpo(args: argparse.Namespace) -> dict:
    data_dir = resolve_data_dir(args.data_dir)
    sft = resolve_model_dir(args.sft)
    model, tokenizer = load_pretrained(sft)
    conversations = [
        c
        for name in ("xpersona-it/xpersona_it_valid.chat.jsonl", "jilda/jilda.chat.jsonl")
        for c in read_conversations(data_dir / name)
    ]
    rng = random.Random(0)
    rng.shuffle(conversations)
    # Each conversation ends at one of its first three answers (seeded), so prompt + answer fit the context.
    conversations = [_cut(c, rng) for c in conversations[: args.conversations]]
    sampling = SamplingConfig(max_new_tokens=96, temperature=1.0, top_p=0.95, seed=0)
    started = time.perf_counter()
    made = make_preference_pairs(model, tokenizer, conversations, sampling)
    pairs_seconds = time.perf_counter() - started
    held = max(8, len(made.pairs) // 6)
    train_pairs, heldout_pairs = made.pairs[:-held], made.pairs[-held:]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    write_preference_pairs(work / "train_pairs.jsonl", train_pairs)
    write_preference_pairs(work / "heldout_pairs.jsonl", heldout_pairs)

    context = model.config.context_length
    heldout = PreferenceDataset(
        list(read_preference_pairs([work / "heldout_pairs.jsonl"])), tokenizer, context
    )
    chosen_bytes = [
        len(
            tokenizer.decode(
                [t for t in heldout[i]["chosen_labels"] if t >= 0], skip_special_tokens=True
            ).encode()
        )
        for i in range(len(heldout))
    ]
    pad = tokenizer.pad_id
    before = _pair_scores(model, heldout, pad)
    prompts = [list(p.prompt) for p in heldout_pairs[:3]]
    answers_before = _greedy_answers(model, tokenizer, prompts)

    config = {
        "stage": "dpo",
        "init_from": str(sft),
        "data": {"train": [str(work / "train_pairs.jsonl")], "val": [str(work / "heldout_pairs.jsonl")]},
        "dpo": {"loss": "sigmoid", "beta": args.beta},
        "optim": {"lr": args.lr, "weight_decay": 0.0},
        "schedule": {"warmup_ratio": 0.1},
        "train": {"batch_size": 8, "epochs": args.epochs, "seed": 0},
        "eval": {"every": 25},
        "checkpoint": {"every": 1000},
        "log": {"every": 5, "progress": False, "tensorboard": False, "plot": True},
    }
    run = work / "dpo-run"
    started = time.perf_counter()
    train(config_from_dict(config), run)
    train_seconds = time.perf_counter() - started
    policy, _ = load_pretrained(run / "final")
    after = _pair_scores(policy, heldout, pad)
    answers_after = _greedy_answers(policy, tokenizer, prompts)

    def summary(scores: torch.Tensor) -> dict:
        margin = scores[:, 0] - scores[:, 1]
        return {
            "logp_accuracy": round(float((margin > 0).float().mean()), 4),
            "logp_margin": round(float(margin.mean()), 3),
            "chosen_bits_per_byte": round(_chosen_bpb(scores, chosen_bytes), 4),
        }

    rewards = args.beta * ((after[:, 0] - before[:, 0]) - (after[:, 1] - before[:, 1]))
    return {
        "sft_model": str(sft),
        "conversations": len(conversations),
        "pairs": {
            "made": len(made.pairs),
            "skipped_coinciding": made.coincide,
            "skipped_too_long": made.too_long,
            "skipped_no_prompt": made.no_prompt,
            "train": len(train_pairs),
            "heldout": len(heldout),
            "seconds_to_make": round(pairs_seconds, 1),
        },
        "dpo": {"loss": "sigmoid", "beta": args.beta, "lr": args.lr, "epochs": args.epochs},
        "train_seconds": round(train_seconds, 1),
        "before": summary(before),
        "after": {
            **summary(after),
            "implicit_reward_accuracy": round(float((rewards > 0).float().mean()), 4),
            "implicit_reward_margin": round(float(rewards.mean()), 4),
        },
        "answers": [
            {"prompt": p[-1]["content"], "before": b, "after": a}
            for p, b, a in zip(prompts, answers_before, answers_after, strict=True)
        ],
    }


def _heldout_bpb(model_dir: Path, tokenizer_texts: dict[str, list[str]]) -> dict[str, float]:
    model, tokenizer = load_pretrained(model_dir)
    return {
        name: round(evaluate_texts(model, tokenizer, texts, name=name, show_progress=False).bits_per_byte, 4)
        for name, texts in tokenizer_texts.items()
    }


def _student_config(teacher: Path, data: list[str], steps: int, distill: bool, args) -> dict:
    config = {
        "stage": "distill" if distill else "pretrain",
        "model": {"preset": "picodac", "context_length": min(256, load_config(teacher).context_length)},
        "tokenizer": {"path": str(teacher)},
        "data": {"train": data, "val_fraction": 0.01, "min_val_docs": 20},
        "optim": {"lr": 2.0e-3, "weight_decay": 0.1, "grad_clip": 1.0},
        "schedule": {"name": "cosine", "warmup_ratio": 0.05, "min_lr": 1.0e-4},
        "train": {"batch_size": 16, "max_steps": steps, "precision": "bf16", "seed": 0},
        "eval": {"every": max(steps // 4, 1), "max_batches": 20},
        "checkpoint": {"every": 10_000},
        "log": {"every": 10, "progress": False, "tensorboard": False, "plot": False},
    }
    if distill:
        config["distill"] = {
            "teacher": str(teacher),
            "alpha": 0.5,
            "temperature": 2.0,
            "divergence": "forward_kl",
        }
    return config


def _train_seconds(run: Path) -> float:
    return json.loads((run / "train_stats.json").read_text())["train_seconds"]


def run_distill(args: argparse.Namespace) -> dict:
    teacher = resolve_model_dir(args.teacher)
    data = [str(Path(p).resolve()) for p in args.data]
    texts = {
        source: heldout_texts(args.data_dir, source)[: args.heldout_docs] for source in ("eltec", "wikipedia")
    }
    work = args.work
    runs = {}

    def run(name: str, steps: int, distill: bool) -> Path:
        path = work / name
        train(config_from_dict(_student_config(teacher, data, steps, distill, args)), path)
        runs[name] = {"steps": steps, "train_seconds": round(_train_seconds(path), 1)}
        runs[name]["heldout_bits_per_byte"] = _heldout_bpb(path / "final", texts)
        print(name, json.dumps(runs[name]), flush=True)
        return path

    distilled = run("distilled", args.steps, True)
    plain = run("plain-same-tokens", args.steps, False)
    seconds_per_step = _train_seconds(plain) / args.steps
    equal_time_steps = max(args.steps, round(_train_seconds(distilled) / seconds_per_step))
    run("plain-same-time", equal_time_steps, False)
    return {
        "teacher": str(teacher),
        "student": "picodac preset, teacher's tokenizer, context min(256, teacher's), batch 16, bf16",
        "distill": {"alpha": 0.5, "temperature": 2.0, "divergence": "forward_kl"},
        "heldout_documents_per_source": args.heldout_docs,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    dpo = commands.add_parser("dpo")
    dpo.add_argument("--sft", required=True, help="the reference chat model (run or model directory)")
    dpo.add_argument("--conversations", type=int, default=720)
    dpo.add_argument("--beta", type=float, default=0.1)
    dpo.add_argument("--lr", type=float, default=2.0e-5)
    dpo.add_argument("--epochs", type=float, default=2)
    distill = commands.add_parser("distill")
    distill.add_argument("--teacher", required=True, help="the reference pretrained model")
    distill.add_argument(
        "--data",
        nargs="+",
        default=["runs/reference/data/eltec_train.jsonl", "runs/reference/data/wikipedia_train.jsonl"],
    )
    distill.add_argument("--steps", type=int, default=300, help="steps of the distilled student")
    distill.add_argument("--heldout-docs", type=int, default=40)
    for command in (dpo, distill):
        command.add_argument("--data-dir", default=None, help="shared data (default ../shared/data)")
        command.add_argument("--work", type=Path, default=None, help="where runs go (default runs/bench-...)")
        command.add_argument("--quick", action="store_true", help="tiny sizes: checks the script works")
    args = parser.parse_args()
    if args.quick:
        if args.command == "dpo":
            args.conversations, args.epochs = 48, 1
        else:
            args.steps, args.heldout_docs = 4, 2
    args.work = (
        args.work or Path("runs") / f"bench-post-training-{args.command}{'-quick' if args.quick else ''}"
    )
    result = run_dpo(args) if args.command == "dpo" else run_distill(args)
    result = {"machine": _machine(), "command": " ".join(sys.argv), **result}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"post_training_{args.command}{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
