"""The Italian text studies and reference models train on, with the held-out documents left out.

Design choices, and why:
- Real data when there is some: ELTeC novels and Wikipedia passages of the shared data root, minus every
  document `splits.json` holds out (`fucina.evaluate.heldout.training_texts`), so held-out bits per byte
  stay honest. Without a data root, the built-in prose, so a study still runs anywhere.
- Long novels are cut into chunks of about `chunk_chars` characters at paragraph breaks: a study reads a
  few million characters and must see many documents (variety), not the first three novels.
- The two sources are interleaved chunk by chunk (ELTeC, Wikipedia, ELTeC, ...) up to the character cap,
  so a small cap still holds both registers (literary and encyclopedic).
- Validation text is a slice of the held-out documents themselves: evaluating on them is what they are
  for. Files are written as JSONL `{"text": ...}`, the format fucina's readers take.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fucina.data.readers import iter_texts
from fucina.errors import DataError
from fucina.evaluate.heldout import heldout_texts, resolve_data_dir, training_texts
from fucina.fsutil import atomic_path, write_json_atomically

logger = logging.getLogger(__name__)

SHARED_SOURCES = ("eltec", "wikipedia")


@dataclass
class CorpusFiles:
    """Where a study's training and validation text was written, and what it holds."""

    train: Path
    val: Path
    source: str  # "shared" or "builtin"
    train_chars: int
    val_chars: int


def chunk_text(text: str, chunk_chars: int) -> Iterator[str]:
    """`text` cut into pieces of about `chunk_chars` characters at paragraph (line) breaks."""
    piece: list[str] = []
    size = 0
    for paragraph in text.splitlines():
        if not paragraph.strip():
            continue
        piece.append(paragraph)
        size += len(paragraph) + 1
        if size >= chunk_chars:
            yield "\n".join(piece)
            piece, size = [], 0
    if piece:
        yield "\n".join(piece)


def _interleave(streams: list[Iterator[str]]) -> Iterator[str]:
    for group in itertools.zip_longest(*streams):
        yield from (text for text in group if text is not None)


def _take(texts: Iterable[str], max_chars: int | None) -> Iterator[str]:
    total = 0
    for text in texts:
        if max_chars is not None and total >= max_chars:
            return
        total += len(text)
        yield text


def write_jsonl_texts(texts: Iterable[str], path: Path) -> int:
    """Write `{"text": ...}` lines atomically; returns the characters written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    chars = 0
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            chars += len(text)
    return chars


def _shared_available(data_dir: str | Path | None) -> bool:
    try:
        root = resolve_data_dir(data_dir)
    except DataError:
        return False
    return (root / "splits.json").is_file()


def write_study_corpus(
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    corpus: str = "auto",
    train_chars: int = 4_000_000,
    val_chars: int = 200_000,
    chunk_chars: int = 2_000,
) -> CorpusFiles:
    """Write `train.jsonl` and `val.jsonl` for a study into `out_dir` (see the module doc).

    `corpus`: "shared" (ELTeC + Wikipedia, error without them), "builtin" (the built-in prose; its last
    document is the validation text), or "auto" (shared when the data root exists, else builtin).
    """
    out_dir = Path(out_dir)
    if corpus not in ("auto", "shared", "builtin"):
        raise DataError(f"unknown corpus {corpus!r}; choose auto, shared or builtin")
    use_shared = corpus == "shared" or (corpus == "auto" and _shared_available(data_dir))
    if use_shared:
        train_streams = [
            (chunk for text in training_texts(data_dir, source) for chunk in chunk_text(text, chunk_chars))
            for source in SHARED_SOURCES
        ]
        val_streams = [
            (chunk for text in heldout_texts(data_dir, source) for chunk in chunk_text(text, chunk_chars))
            for source in SHARED_SOURCES
        ]
        train = _take(_interleave(train_streams), train_chars)
        val = _take(_interleave(val_streams), val_chars)
    else:
        from fucina.resources import builtin_prose_files

        files = builtin_prose_files()
        if len(files) < 2:
            raise DataError("the built-in prose needs at least two documents for a study")
        train = _take((c for t in iter_texts(files[:-1]) for c in chunk_text(t, chunk_chars)), train_chars)
        val = _take((c for t in iter_texts(files[-1:]) for c in chunk_text(t, chunk_chars)), val_chars)
    files = CorpusFiles(
        out_dir / "train.jsonl", out_dir / "val.jsonl", "shared" if use_shared else "builtin", 0, 0
    )
    files.train_chars = write_jsonl_texts(train, files.train)
    files.val_chars = write_jsonl_texts(val, files.val)
    info = {"source": files.source, "train_chars": files.train_chars, "val_chars": files.val_chars}
    write_json_atomically(out_dir / "info.json", info, indent=None)
    logger.info(
        "study corpus (%s): %d training and %d validation characters in %s",
        files.source,
        files.train_chars,
        files.val_chars,
        out_dir,
    )
    return files


def write_pretraining_corpus(out_dir: str | Path, data_dir: str | Path | None = None) -> dict[str, Path]:
    """All of ELTeC and Wikipedia minus the held-out documents, one JSONL per source (reference models).

    Novels stay whole (the packer cuts windows across them); returns {source: path}.
    """
    out_dir = Path(out_dir)
    written = {}
    for source in SHARED_SOURCES:
        path = out_dir / f"{source}_train.jsonl"
        chars = write_jsonl_texts(training_texts(data_dir, source), path)
        logger.info("%s: %d characters (held-out documents left out) in %s", source, chars, path)
        written[source] = path
    return written
