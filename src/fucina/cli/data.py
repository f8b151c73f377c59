"""`fucina data` commands: pack a pretraining corpus into token shards, show a chat example's loss mask."""

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
