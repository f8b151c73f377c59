"""`fucina tokenizer train|show`: train a byte-level BPE on text files, or look at how one splits a text."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fucina.chat_template import CHAT_TEMPLATE_NAMES
from fucina.errors import TokenizerError
from fucina.tokenizer import (
    CONFIG_FILE,
    DEFAULT_PRETOKENIZER,
    PRETOKENIZER_NAMES,
    TOKENIZER_FILE,
    FucinaTokenizer,
    train_tokenizer,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("tokenizer", help="train or inspect a BPE tokenizer")
    commands = parser.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train",
        help="train a byte-level BPE with a chat template's special tokens",
        description="Train a byte-level BPE on text files (.txt, .jsonl, optionally .xz/.gz, hf:NAME) and "
        "save tokenizer.json + tokenizer_config.json (with the chat template) into --out.",
    )
    train.add_argument(
        "--input", nargs="+", required=True, metavar="FILE", help="training text files or hf:NAME"
    )
    train.add_argument("--vocab-size", type=int, required=True, help="ids in all, special tokens included")
    train.add_argument("--template", choices=CHAT_TEMPLATE_NAMES, default="chatml", help="chat template")
    train.add_argument(
        "--pretokenizer",
        choices=PRETOKENIZER_NAMES,
        default=DEFAULT_PRETOKENIZER,
        help=f"pre-tokenization before BPE (default {DEFAULT_PRETOKENIZER}; see docs/tokenizer.md)",
    )
    train.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge it")
    train.add_argument("--skip-bad", action="store_true", help="skip malformed records instead of stopping")
    train.add_argument("--out", type=Path, required=True, help="output directory")
    train.add_argument("--force", action="store_true", help="overwrite a tokenizer already in --out")
    train.set_defaults(func=run_train)

    show = commands.add_parser(
        "show",
        help="print the tokens of a text",
        description="Print each token of TEXT (as readable text) with its id, and the token count.",
    )
    show.add_argument("tokenizer", type=Path, help="tokenizer directory (or its tokenizer.json)")
    show.add_argument("text", help="text to tokenize")
    show.set_defaults(func=run_show)


def run_train(args: argparse.Namespace) -> int:
    from fucina.data.readers import ReadStats, iter_texts

    existing = [args.out / name for name in (TOKENIZER_FILE, CONFIG_FILE) if (args.out / name).exists()]
    if existing and not args.force:
        raise TokenizerError(f"{existing[0]} already exists; choose another --out or pass --force")
    stats = ReadStats()
    start = time.perf_counter()
    tokenizer = train_tokenizer(
        iter_texts(args.input, skip_bad=args.skip_bad, stats=stats),
        args.vocab_size,
        template=args.template,
        pretokenizer=args.pretokenizer,
        min_frequency=args.min_frequency,
    )
    seconds = time.perf_counter() - start
    tokenizer.save(args.out)
    skipped = f", {stats.skipped} skipped" if stats.skipped else ""
    print(f"trained on {stats.records} documents{skipped} in {seconds:.1f} s")
    print(f"vocab size {tokenizer.vocab_size} ({args.template} template, {args.pretokenizer} pre-tokenizer)")
    print(f"saved to {args.out}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    tokenizer = FucinaTokenizer.load(args.tokenizer)
    pieces = tokenizer.pieces(args.text)
    width = len(str(tokenizer.vocab_size))
    for token_id, piece in pieces:
        print(f"{token_id:>{width}}  {piece!r}")
    print(f"{len(pieces)} tokens, {len(args.text)} characters")
    return 0
