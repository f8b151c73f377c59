"""Compression of fucina's BPE: "italian" vs plain "bytelevel" pre-tokenization, at several vocab sizes.

Trains on a slice of ELTeC novels + Italian Wikipedia passages (../shared/data, held-out documents of
splits.json excluded) and measures characters and UTF-8 bytes per token on the held-out ELTeC novels and
held-out Wikipedia passages. Also times one training run on the whole ELTeC training corpus.
Writes bench/results/tokenizer_compression.json and prints a table.

    .venv/bin/python bench/tokenizer_compression.py [--data ../shared/data] [--train-chars 30000000]
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tokenizers

from fucina.tokenizer import PRETOKENIZER_NAMES, FucinaTokenizer, train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
ELTEC = "eltec-ita/eltec_ita.jsonl.xz"
WIKI = "exams-it/exams_it_wikipedia_snippets.jsonl.xz"
VOCAB_SIZES = (1920, 8000, 32000)  # PicoDAC size too, for reference
TEMPLATE = "chatml"


@dataclass
class Corpus:
    train: list[str]
    heldout: list[str]


@dataclass
class Compression:
    documents: int
    chars: int
    utf8_bytes: int
    tokens: int
    chars_per_token: float
    bytes_per_token: float


def load_split(data_dir: Path, name: str) -> Corpus:
    """Texts of one corpus, split into training and the held-out documents listed in splits.json."""
    heldout_ids = set(json.loads((data_dir / "splits.json").read_text())[name]["test"])
    corpus = Corpus([], [])
    with lzma.open(data_dir / name, "rt", encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            (corpus.heldout if record["id"] in heldout_ids else corpus.train).append(record["text"])
    return corpus


def take_chars(texts: list[str], budget: int) -> list[str]:
    """Texts spread evenly over `texts` (every k-th) until about `budget` characters."""
    total = sum(map(len, texts))
    if total <= budget:
        return list(texts)
    step = total / budget
    chosen, taken, position = [], 0, 0.0
    while position < len(texts) and taken < budget:
        text = texts[int(position)]
        chosen.append(text)
        taken += len(text)
        position += step
    return chosen


def measure(tok: FucinaTokenizer, texts: list[str]) -> Compression:
    tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    chars = sum(map(len, texts))
    utf8_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return Compression(len(texts), chars, utf8_bytes, tokens, chars / tokens, utf8_bytes / tokens)


def timed_training(texts: list[str], vocab_size: int, pretokenizer: str) -> tuple[FucinaTokenizer, float]:
    start = time.perf_counter()
    tok = train_tokenizer(texts, vocab_size, TEMPLATE, pretokenizer, length=len(texts), show_progress=False)
    return tok, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--train-chars", type=int, default=30_000_000, help="training slice, half per source")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "bench" / "results" / "tokenizer_compression.json"
    )
    parser.add_argument(
        "--skip-full-eltec", action="store_true", help="skip timing on the whole ELTeC corpus"
    )
    args = parser.parse_args()

    eltec, wiki = load_split(args.data, ELTEC), load_split(args.data, WIKI)
    train = take_chars(eltec.train, args.train_chars // 2) + take_chars(wiki.train, args.train_chars // 2)
    heldout = {"eltec": eltec.heldout, "wikipedia": wiki.heldout}
    print(
        f"training slice: {len(train)} documents, {sum(map(len, train)):,} chars; held-out: "
        f"{len(eltec.heldout)} ELTeC novels, {len(wiki.heldout)} Wikipedia passages"
    )

    runs = []
    for vocab_size in VOCAB_SIZES:
        for pretokenizer in PRETOKENIZER_NAMES:
            tok, seconds = timed_training(train, vocab_size, pretokenizer)
            scores = {name: asdict(measure(tok, texts)) for name, texts in heldout.items()}
            runs.append(
                {
                    "pretokenizer": pretokenizer,
                    "vocab_size": vocab_size,
                    "train_seconds": round(seconds, 1),
                    "heldout": scores,
                }
            )
            print(f"  {pretokenizer:9s} vocab {vocab_size:5d}: trained in {seconds:.1f} s")

    full_eltec = []
    if not args.skip_full_eltec:
        chars = sum(map(len, eltec.train))
        for pretokenizer in PRETOKENIZER_NAMES:
            _, seconds = timed_training(eltec.train, 32000, pretokenizer)
            full_eltec.append(
                {
                    "pretokenizer": pretokenizer,
                    "vocab_size": 32000,
                    "documents": len(eltec.train),
                    "chars": chars,
                    "train_seconds": round(seconds, 1),
                }
            )
            print(f"  full ELTeC training corpus ({chars:,} chars), {pretokenizer}: {seconds:.1f} s")

    result = {
        "benchmark": "tokenizer_compression",
        "train_slice": {"documents": len(train), "chars": sum(map(len, train)), "sources": [ELTEC, WIKI]},
        "template": TEMPLATE,
        "runs": runs,
        "full_eltec_training": full_eltec,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 2),  # other jobs on the machine slow timings
            "rayon_threads": os.environ.get("RAYON_NUM_THREADS"),
            "python": platform.python_version(),
            "tokenizers": tokenizers.__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print_table(runs)
    print(f"wrote {args.out}")


def print_table(runs: list[dict]) -> None:
    header = (
        "| pre-tokenizer | vocab | train s | ELTeC chars/tok | ELTeC bytes/tok "
        "| Wiki chars/tok | Wiki bytes/tok |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for run in runs:
        eltec, wiki = run["heldout"]["eltec"], run["heldout"]["wikipedia"]
        print(
            f"| {run['pretokenizer']} | {run['vocab_size']} | {run['train_seconds']} "
            f"| {eltec['chars_per_token']:.3f} | {eltec['bytes_per_token']:.3f} "
            f"| {wiki['chars_per_token']:.3f} | {wiki['bytes_per_token']:.3f} |"
        )


if __name__ == "__main__":
    main()
