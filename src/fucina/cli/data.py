"""`fucina data` commands: pack a pretraining corpus into token shards, show a chat example's loss mask,
build on-policy preference pairs and show what a pair scores."""

from __future__ import annotations

import argparse
import os
import sys

from fucina.errors import DataError


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare training data", description="Prepare training data.")
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    pack = commands.add_parser(
        "pack",
        help="tokenize documents into train/val token shards",
        description=(
            "Tokenize documents, separate them with EOS and write train/val token shards plus meta.json. "
            "Inputs: .txt (one file = one document), .jsonl with 'text', 'messages' or 'prompt'/'response' "
            "(optionally .xz/.gz), directories of those, or hf:NAME[:SPLIT] (downloads a Hugging Face "
            "dataset, e.g. hf:Mattimax/Little_ITA_60k)."
        ),
    )
    pack.add_argument(
        "--tokenizer", required=True, help="tokenizer directory (from `fucina tokenizer train`)"
    )
    pack.add_argument("--input", required=True, nargs="+", metavar="FILE", help="corpus files or directories")
    pack.add_argument("--out", required=True, help="output directory for the shards and meta.json")
    pack.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for validation")
    pack.add_argument(
        "--min-val-docs",
        type=int,
        default=1000,
        help="at least this many validation documents when the corpus has twice as many",
    )
    pack.add_argument(
        "--skip-bad", action="store_true", help="skip malformed records (counted) instead of failing"
    )
    pack.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    pack.add_argument(
        "--shard-tokens", type=int, default=100_000_000, help="tokens per shard file before starting the next"
    )
    pack.set_defaults(func=_pack)

    show = commands.add_parser(
        "show-mask",
        help="print a chat example with its trained tokens highlighted",
        description="Print one conversation token by token, highlighting the tokens the loss trains on.",
    )
    show.add_argument("--tokenizer", required=True, help="tokenizer directory")
    show.add_argument("--input", required=True, help="chat JSONL file ('messages' or 'prompt'/'response')")
    show.add_argument("--index", type=int, default=0, help="which conversation (0-based)")
    show.add_argument(
        "--train-on", choices=("all", "last"), default="all", help="train on all assistant turns or the last"
    )
    show.add_argument(
        "--no-color", action="store_true", help="mark trained tokens with ⟦ ⟧ instead of colors"
    )
    show.set_defaults(func=_show_mask)

    prefs = commands.add_parser(
        "make-preferences",
        help="build on-policy preference pairs: reference answer chosen, the model's sample rejected",
        description=(
            "For each conversation, the prompt is everything before its last assistant turn; chosen is "
            "that turn, rejected is the model's own sampled answer (seeded). Pairs whose answers "
            "coincide are skipped. Writes TRL-format JSONL for `stage: dpo`."
        ),
    )
    prefs.add_argument("--model", required=True, help="model or run directory that samples the answers")
    prefs.add_argument("--input", required=True, help="chat JSONL file ('messages' or 'prompt'/'response')")
    prefs.add_argument("--out", required=True, help="preference JSONL to write")
    prefs.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    prefs.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    prefs.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold")
    prefs.add_argument("--max-new-tokens", type=int, default=128, help="longest sampled answer")
    prefs.set_defaults(func=_make_preferences)

    pair = commands.add_parser(
        "show-pair",
        help="print a preference pair with the scored tokens of each side marked",
        description="Print both sides of one preference pair token by token, scored tokens within ⟦ ⟧.",
    )
    pair.add_argument("--tokenizer", required=True, help="tokenizer, model or run directory")
    pair.add_argument("--input", required=True, help="preference JSONL file")
    pair.add_argument("--index", type=int, default=0, help="which pair (0-based)")
    pair.set_defaults(func=_show_pair)


def _pack(args: argparse.Namespace) -> int:
    from fucina.data.packing import pack_corpus
    from fucina.data.readers import ReadStats, iter_texts
    from fucina.tokenizer import FucinaTokenizer

    tokenizer = FucinaTokenizer.load(args.tokenizer)
    stats = ReadStats()
    texts = iter_texts(args.input, skip_bad=args.skip_bad, stats=stats)
    info = pack_corpus(
        texts,
        tokenizer,
        args.out,
        val_fraction=args.val_fraction,
        min_val_docs=args.min_val_docs,
        seed=args.seed,
        shard_tokens=args.shard_tokens,
        show_progress=sys.stderr.isatty(),
    )
    print(f"packed {args.out} ({info.dtype}, vocab {info.vocab_size})")
    for name, split in info.splits.items():
        per_byte = split.tokens / split.bytes if split.bytes else 0.0
        print(
            f"  {name:5s} {split.documents:>10,d} documents {split.tokens:>14,d} tokens "
            f"{split.bytes:>15,d} bytes  ({per_byte:.3f} tokens/byte, {len(split.shards)} shard(s))"
        )
    if stats.skipped:
        print(f"  skipped {stats.skipped:,d} bad record(s); first: {stats.first_error}")
    return 0


def _show_mask(args: argparse.Namespace) -> int:
    from fucina.data.mask_view import render_mask
    from fucina.data.readers import read_conversations
    from fucina.tokenizer import FucinaTokenizer

    tokenizer = FucinaTokenizer.load(args.tokenizer)
    conversations = read_conversations(args.input)
    if not 0 <= args.index < len(conversations):
        raise DataError(
            f"--index {args.index} is out of range: the file has {len(conversations)} conversations",
            args.input,
        )
    color = not args.no_color and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    print(render_mask(tokenizer, conversations[args.index], train_on=args.train_on, color=color))
    return 0


def _make_preferences(args: argparse.Namespace) -> int:
    from fucina.data.readers import read_conversations
    from fucina.inference.sampling import SamplingConfig
    from fucina.model_dir import load_pretrained
    from fucina.train.on_policy_pairs import make_preference_pairs, write_preference_pairs

    model, tokenizer = load_pretrained(args.model)
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    result = make_preference_pairs(model, tokenizer, read_conversations(args.input), sampling)
    write_preference_pairs(args.out, result.pairs)
    print(
        f"wrote {len(result.pairs)} pairs to {args.out}; skipped {result.coincide} with coinciding answers, "
        f"{result.no_prompt} without a user-assistant turn, {result.too_long} too long"
    )
    return 0


def _show_pair(args: argparse.Namespace) -> int:
    from fucina.data.preferences import read_preference_pairs, render_pair
    from fucina.tokenizer import FucinaTokenizer

    tokenizer = FucinaTokenizer.load(args.tokenizer)
    pairs = list(read_preference_pairs([args.input]))
    if not 0 <= args.index < len(pairs):
        raise DataError(f"--index {args.index} is out of range: the file has {len(pairs)} pairs", args.input)
    print(render_pair(tokenizer, pairs[args.index]))
    return 0
