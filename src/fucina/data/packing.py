"""Pretraining data: documents -> one EOS-separated token stream per split, in memory-mapped shards.

Layout of a packed dataset directory:
    meta.json                      written last: its presence means the dataset is complete
    train_00000.bin, ...           raw token ids (uint16 when every id fits, else uint32), no header
    val_00000.bin, ...

Design choices, and why:
- Every document is followed by EOS, so the model learns where documents end and windows may span
  documents (no padding, every token is trained on). Windows are non-overlapping with stride T and
  T + 1 tokens each, so every token after the first is predicted exactly once per epoch.
- Streaming: documents are tokenized in batches (`encode_batch_fast`, parallel in Rust) of ~1M
  characters, and their ids appended to a temporary file as they arrive; a very long document (a whole
  .txt corpus) is encoded in pieces cut where the ids provably do not change (see `encode_documents`).
  RAM holds one batch plus 16 bytes of bookkeeping per document, whatever the corpus size.
- The train/val split is by document: document i gets a seeded random key, and the k documents with
  the smallest keys are validation. k is only known at the end (round(val_fraction * N), at least
  min_val_docs when the corpus has at least 2 * min_val_docs documents, then clamped to [1, N - 1]),
  so the split is chosen after tokenizing and the ids are copied from the temporary file into the split
  shards: a second pass over disk data, cheap next to tokenizing, and exact.
- A split longer than `shard_tokens` continues in the next shard; `TokenShards` reads across the seam.
- Atomic: shards are written under `.tmp` names; only when all are written is a previous dataset in
  `out_dir` removed (meta.json first), the new shards renamed into place and meta.json written last (via
  a temporary name). Bad input therefore never destroys an earlier dataset, and a crash never leaves one
  that looks complete. Only this module's own files in `out_dir` are ever replaced.
- meta.json keeps the tokenizer's vocabulary size and a hash of its vocabulary, so a dataset is never
  trained with a different tokenizer than the one that made it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from fucina.errors import DataError, TokenizerError
from fucina.fsutil import write_json_atomically

if TYPE_CHECKING:
    import torch

    from fucina.tokenizer import FucinaTokenizer

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
FORMAT_NAME = "fucina-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 100_000_000
ENCODE_BATCH_PIECES = 256
ENCODE_BATCH_CHARS = 1 << 20  # ~1M characters per encode call bounds the tokenizer's memory
PIECE_CHARS = 1 << 18  # longer documents are encoded in pieces of about this many characters
COPY_CHUNK_TOKENS = 1 << 22
WRITE_CHUNK_TOKENS = 1 << 20
SPLITTABLE_PRETOKENIZERS = ("italian", "bytelevel")
# A letter or digit followed by plain whitespace: documents may be cut right after it.
_CUT_POINT = re.compile(r"[^\W_](?=[ \t\n\r])")


@dataclass
class SplitInfo:
    """One split of a packed dataset: its documents, tokens (EOS included), UTF-8 bytes and shard files."""

    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    shards: list[str] = field(default_factory=list)


@dataclass
class PackInfo:
    """What `pack_corpus` wrote (the content of meta.json)."""

    out_dir: Path
    vocab_size: int
    dtype: str
    eos_id: int
    vocab_sha256: str
    seed: int
    shard_tokens: int
    splits: dict[str, SplitInfo]

    @property
    def train(self) -> SplitInfo:
        return self.splits["train"]

    @property
    def val(self) -> SplitInfo:
        return self.splits["val"]


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id below vocab_size."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def vocab_fingerprint(tokenizer: FucinaTokenizer) -> str:
    """SHA-256 of the tokenizer's token -> id table (special tokens included)."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    table = "\n".join(
        f"{token_id}\t{token}" for token, token_id in sorted(vocab.items(), key=lambda kv: kv[1])
    )
    return hashlib.sha256(table.encode("utf-8")).hexdigest()


def validation_size(num_documents: int, val_fraction: float, min_val_docs: int) -> int:
    """How many documents go to validation (see the module doc for the rule)."""
    if num_documents < 2:
        raise DataError(f"need at least 2 documents (one to train on, one to validate), got {num_documents}")
    k = round(val_fraction * num_documents)
    if num_documents >= 2 * min_val_docs:
        k = max(k, min_val_docs)
    return min(max(k, 1), num_documents - 1)


def _can_split_documents(tokenizer: FucinaTokenizer) -> bool:
    """Whether cutting text before whitespace that follows a letter or digit leaves the ids unchanged.

    True for fucina's two pre-tokenizers (no normalizer): none of their regex matches that starts with a
    non-space character runs into whitespace, and a whitespace run's look-ahead only sees the run's own
    next character, so no pre-token crosses such a cut and BPE, which merges within pre-tokens, agrees.
    """
    return (
        getattr(tokenizer, "pretokenizer", None) in SPLITTABLE_PRETOKENIZERS
        and tokenizer.backend.normalizer is None
    )


def _split_document(text: str, piece_chars: int) -> Iterator[str]:
    """Pieces of about piece_chars characters, each cut just before whitespace that follows a letter/digit."""
    start = 0
    while len(text) - start > piece_chars:
        cut = None
        for match in _CUT_POINT.finditer(text, start + piece_chars // 2, start + piece_chars):
            cut = match.end()  # the last cut point in the second half of the piece
        if cut is None:
            match = _CUT_POINT.search(text, start + piece_chars)
            if match is None:
                break
            cut = match.end()
        yield text[start:cut]
        start = cut
    yield text[start:]


def encode_documents(
    tokenizer: FucinaTokenizer, texts: Iterable[str], piece_chars: int = PIECE_CHARS
) -> Iterator[tuple[list[int], int, bool]]:
    """(ids, UTF-8 bytes, ends a document) for each piece of each document, in order.

    The ids of a document's pieces, concatenated, are exactly tokenizer.encode(document): long documents
    are cut at safe points (see `_can_split_documents`) so that one huge document never has to sit in
    memory as one list of ids. Pieces go through the backend's `encode_batch_fast` (no character offsets:
    faster and lighter than `encode_batch`) in groups of ~ENCODE_BATCH_CHARS characters; both honour the
    backend's encode_special_tokens, so spelled special tokens stay text exactly as in `encode`.
    """
    split = _can_split_documents(tokenizer)
    fast = getattr(tokenizer.backend, "encode_batch_fast", None)
    batch: list[tuple[str, bool]] = []
    chars = 0

    def flush() -> Iterator[tuple[list[int], int, bool]]:
        pieces = [piece for piece, _ in batch]
        if fast is not None:
            encoded = [encoding.ids for encoding in fast(pieces, add_special_tokens=False)]
        else:
            encoded = tokenizer.encode_batch(pieces)
        for (piece, last), ids in zip(batch, encoded):
            yield ids, len(piece.encode("utf-8")), last

    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"documents must be str, got {type(text).__name__}")
        pieces = list(_split_document(text, piece_chars)) if split else [text]
        for number, piece in enumerate(pieces, 1):
            batch.append((piece, number == len(pieces)))
            chars += len(piece)
            if len(batch) == ENCODE_BATCH_PIECES or chars >= ENCODE_BATCH_CHARS:
                yield from flush()
                batch, chars = [], 0
    if batch:
        yield from flush()


class _ShardWriter:
    """Appends ids to `{split}_NNNNN.bin.tmp` files of at most shard_tokens ids; `commit` renames them."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.names: list[str] = []
        self.tokens = 0
        self._handle = None
        self._in_shard = 0

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while ids.size:
            if self._handle is None or self._in_shard == self.shard_tokens:
                self._next_shard()
            take = min(self.shard_tokens - self._in_shard, ids.size)
            self._handle.write(ids[:take].tobytes())
            self._in_shard += take
            self.tokens += take
            ids = ids[take:]

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.names):05d}.bin"
        self.names.append(name)
        self._handle = open(self.out_dir / (name + ".tmp"), "wb")
        self._in_shard = 0

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def commit(self) -> None:
        self.close()
        for name in self.names:
            os.replace(self.out_dir / (name + ".tmp"), self.out_dir / name)


def _remove_previous_dataset(out_dir: Path) -> None:
    """Remove meta.json first (so the directory stops looking complete), then our old shards."""
    meta = out_dir / META_FILE
    if meta.exists():
        logger.info("replacing the packed dataset in %s", out_dir)
        meta.unlink()
    for split in SPLITS:
        for path in out_dir.glob(f"{split}_[0-9][0-9][0-9][0-9][0-9].bin"):
            path.unlink()


def pack_corpus(
    texts: Iterable[str],
    tokenizer: FucinaTokenizer,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.01,
    min_val_docs: int = 1000,
    seed: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    show_progress: bool = False,
) -> PackInfo:
    """Tokenize documents, split them train/val by document and write EOS-separated token shards."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if min_val_docs < 0 or shard_tokens < 1:
        raise DataError(
            f"min_val_docs must be >= 0 and shard_tokens >= 1, got {min_val_docs}, {shard_tokens}"
        )
    eos_id = tokenizer.eos_id
    if eos_id is None:
        raise TokenizerError("the tokenizer has no EOS token, which separates documents when packing")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    stream_path = out_dir / "all_tokens.bin.tmp"
    writers = {split: _ShardWriter(out_dir, split, dtype, shard_tokens) for split in SPLITS}
    try:
        doc_tokens, doc_bytes = _tokenize_to_stream(
            texts, tokenizer, stream_path, dtype, eos_id, show_progress
        )
        lengths = np.frombuffer(doc_tokens, dtype=np.int64)
        num_docs = lengths.size
        k = validation_size(num_docs, val_fraction, min_val_docs)
        keys = np.random.default_rng(seed).random(num_docs)
        is_val = np.zeros(num_docs, dtype=bool)
        is_val[np.argpartition(keys, k - 1)[:k]] = True
        _copy_splits(np.memmap(stream_path, dtype=dtype, mode="r"), lengths, is_val, writers)
        _remove_previous_dataset(out_dir)
        for writer in writers.values():
            writer.commit()
    finally:
        for writer in writers.values():
            writer.close()
        stream_path.unlink(missing_ok=True)
        for leftover in out_dir.glob("*.bin.tmp"):
            leftover.unlink()

    utf8 = np.frombuffer(doc_bytes, dtype=np.int64)
    splits = {}
    for split, mask in (("train", ~is_val), ("val", is_val)):
        splits[split] = SplitInfo(
            documents=int(mask.sum()),
            tokens=writers[split].tokens,
            bytes=int(utf8[mask].sum()),
            shards=list(writers[split].names),
        )
    info = PackInfo(
        out_dir=out_dir,
        vocab_size=tokenizer.vocab_size,
        dtype=dtype.name,
        eos_id=eos_id,
        vocab_sha256=vocab_fingerprint(tokenizer),
        seed=seed,
        shard_tokens=shard_tokens,
        splits=splits,
    )
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **asdict(info)}
    del meta["out_dir"]  # the directory may move; meta.json describes what is inside it
    write_json_atomically(out_dir / META_FILE, meta, ensure_ascii=True)
    for split, split_info in splits.items():
        logger.info(
            "%s: %d documents, %d tokens, %d bytes",
            split,
            split_info.documents,
            split_info.tokens,
            split_info.bytes,
        )
    return info


def _tokenize_to_stream(
    texts: Iterable[str],
    tokenizer: FucinaTokenizer,
    stream_path: Path,
    dtype: np.dtype,
    eos_id: int,
    show_progress: bool,
) -> tuple[array, array]:
    """Append each document's ids + EOS to stream_path; return per-document token and byte counts (int64)."""
    doc_tokens, doc_bytes = array("q"), array("q")
    tokens = utf8 = 0  # of the document being read
    pending: list[list[int]] = []  # ids not yet written
    pending_tokens = 0
    with (
        open(stream_path, "wb") as stream,
        tqdm(unit="doc", desc="packing", disable=not show_progress) as bar,
    ):
        for ids, piece_bytes, last in encode_documents(tokenizer, texts):
            pending.append(ids)
            pending_tokens += len(ids)
            tokens += len(ids)
            utf8 += piece_bytes
            if last:
                pending.append([eos_id])
                doc_tokens.append(tokens + 1)
                doc_bytes.append(utf8)
                tokens = utf8 = 0
                bar.update(1)
            if pending_tokens >= WRITE_CHUNK_TOKENS:
                _write_ids(stream, pending, dtype)
                pending, pending_tokens = [], 0
        _write_ids(stream, pending, dtype)
    return doc_tokens, doc_bytes


def _write_ids(stream, pieces: list[list[int]], dtype: np.dtype) -> None:
    flat = np.fromiter((i for ids in pieces for i in ids), dtype=dtype, count=sum(map(len, pieces)))
    stream.write(flat.tobytes())


def _copy_splits(
    stream: np.ndarray, lengths: np.ndarray, is_val: np.ndarray, writers: dict[str, _ShardWriter]
) -> None:
    """Copy the stream's ids to the split of the document they belong to, COPY_CHUNK_TOKENS at a time."""
    ends = np.cumsum(lengths)
    starts = ends - lengths
    for low in range(0, int(ends[-1]), COPY_CHUNK_TOKENS):
        high = min(low + COPY_CHUNK_TOKENS, int(ends[-1]))
        first = int(np.searchsorted(ends, low, side="right"))  # documents overlapping [low, high)
        last = int(np.searchsorted(starts, high, side="left"))
        overlap = np.minimum(ends[first:last], high) - np.maximum(starts[first:last], low)
        token_is_val = np.repeat(is_val[first:last], overlap)
        tokens = np.asarray(stream[low:high])
        writers["train"].write(tokens[~token_is_val])
        writers["val"].write(tokens[token_is_val])


# --- reading ---------------------------------------------------------------------------------------


def read_meta(directory: str | Path) -> dict[str, Any]:
    """meta.json of a packed dataset; DataError when the directory is missing or incomplete."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError("packed dataset directory not found (run `fucina data pack`)", directory)
    meta_path = directory / META_FILE
    if not meta_path.exists():
        raise DataError(
            f"no {META_FILE}: not a packed dataset, or packing did not finish (run `fucina data pack` again)",
            directory,
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"unreadable {META_FILE}: {err}", meta_path) from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise DataError(f"not a fucina packed dataset (format is not {FORMAT_NAME!r})", meta_path)
    if meta.get("version") != FORMAT_VERSION:
        raise DataError(
            f"unsupported dataset version {meta.get('version')!r}, expected {FORMAT_VERSION}", meta_path
        )
    return meta


def check_tokenizer(directory: str | Path, tokenizer: FucinaTokenizer) -> None:
    """TokenizerError unless `tokenizer` is the one the dataset in `directory` was packed with."""
    meta = read_meta(directory)
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise TokenizerError(
            f"{directory}: the dataset was packed with a tokenizer of vocab size {meta['vocab_size']}, "
            f"this tokenizer has {tokenizer.vocab_size}; pack again with this tokenizer"
        )
    if vocab_fingerprint(tokenizer) != meta["vocab_sha256"]:
        raise TokenizerError(
            f"{directory}: the dataset was packed with a different tokenizer (same vocab size, other "
            "vocabulary); pack again with this tokenizer"
        )


class TokenShards:
    """One split of a packed dataset as a single token stream, memory-mapped across its shard files."""

    def __init__(self, directory: str | Path, split: str, tokenizer: FucinaTokenizer | None = None):
        self.directory = Path(directory)
        meta = read_meta(self.directory)
        if tokenizer is not None:
            check_tokenizer(self.directory, tokenizer)
        if split not in meta["splits"]:
            raise DataError(f"unknown split {split!r} (have {', '.join(meta['splits'])})", self.directory)
        info = meta["splits"][split]
        self.split = split
        self.dtype = np.dtype(meta["dtype"])
        self.vocab_size: int = meta["vocab_size"]
        self.eos_id: int = meta["eos_id"]
        self.num_documents: int = info["documents"]
        self.num_tokens: int = info["tokens"]
        self.num_bytes: int = info["bytes"]
        self.shard_paths = [self.directory / name for name in info["shards"]]
        sizes = []
        for path in self.shard_paths:
            if not path.exists():
                raise DataError("shard file missing; pack the dataset again", path)
            sizes.append(path.stat().st_size // self.dtype.itemsize)
        if sum(sizes) != self.num_tokens:
            raise DataError(
                f"the {split} shards hold {sum(sizes)} tokens but {META_FILE} says {self.num_tokens} "
                "(truncated or replaced files?); pack the dataset again",
                self.directory,
            )
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._arrays: list[np.ndarray] | None = None

    @property
    def arrays(self) -> list[np.ndarray]:
        """The memory-mapped shards, opened on first use (and again after pickling to a worker)."""
        if self._arrays is None:
            self._arrays = [np.memmap(path, dtype=self.dtype, mode="r") for path in self.shard_paths]
        return self._arrays

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}  # never pickle (copy) the mapped data itself

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Ids [start, stop) of the split's stream as int64, read across shard boundaries."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens})")
        out = np.empty(stop - start, dtype=np.int64)
        shard = int(np.searchsorted(self._offsets, start, side="right")) - 1
        filled = 0
        while filled < out.size:
            local = start + filled - int(self._offsets[shard])
            piece = self.arrays[shard][local : local + out.size - filled]
            out[filled : filled + piece.size] = piece
            filled += piece.size
            shard += 1
        return out

    def num_windows(self, context_length: int) -> int:
        """Non-overlapping windows of context_length + 1 tokens, stride context_length."""
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        return max((self.num_tokens - 1) // context_length, 0)

    def window(self, index: int, context_length: int) -> np.ndarray:
        """Window `index`: tokens [index * T, index * T + T + 1) as int64 (inputs are [:-1], targets [1:])."""
        count = self.num_windows(context_length)
        if not 0 <= index < count:
            raise IndexError(
                f"window {index} out of range: the {self.split} split has {count} windows of {context_length}"
            )
        start = index * context_length
        return self.tokens(start, start + context_length + 1)

    def batch(self, indices: Sequence[int], context_length: int) -> dict[str, torch.Tensor]:
        """Windows as a batch in the shared convention: input_ids (B, T) and labels (B, T), shifted."""
        import torch

        windows = torch.from_numpy(np.stack([self.window(int(i), context_length) for i in indices]))
        return {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}

    def __repr__(self) -> str:
        return f"TokenShards({str(self.directory)!r}, {self.split!r}: {self.num_tokens} tokens, {len(self.shard_paths)} shards)"
