"""How well a tokenizer compresses held-out Italian: characters and bytes per token, tokens per word.

Design choices, and why:
- Any tokenizer can be measured: a fucina tokenizer directory, any Hugging Face `tokenizer.json` (or a
  directory holding one), or a loaded `FucinaTokenizer`. Only the `tokenizers` backend is used, with no
  special tokens added, so numbers compare across tokenizers of different projects.
- The texts are the held-out documents of `splits.json` (ELTeC novels, Wikipedia passages), never seen
  in training, so a tokenizer fitted to its training corpus is not flattered.
- More characters per token means shorter sequences for the same text: more text in the context window
  and fewer forward passes per document. Round-trip failures (decode(encode(text)) != text) and unknown
  tokens are counted because a tokenizer that loses text compresses for free.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Tokenizer

from fucina.errors import TokenizerError
from fucina.evaluate.heldout import heldout_texts
from fucina.evaluate.report import ScoreRow
from fucina.tokenizer import TOKENIZER_FILE, FucinaTokenizer

DEFAULT_SOURCES = ("eltec", "wikipedia")


@dataclass
class TokenizerStats:
    """Token counts of one tokenizer on one set of texts."""

    source: str
    documents: int
    characters: int
    bytes: int
    words: int  # whitespace-separated
    tokens: int
    unknown_tokens: int
    roundtrip_failures: int  # documents whose decode(encode(text)) differs from the text

    @property
    def chars_per_token(self) -> float:
        return self.characters / max(self.tokens, 1)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)

    @property
    def tokens_per_word(self) -> float:
        return self.tokens / max(self.words, 1)

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "chars_per_token": self.chars_per_token,
            "bytes_per_token": self.bytes_per_token,
            "tokens_per_word": self.tokens_per_word,
        }

    def rows(self, task: str = "tokenizer") -> list[ScoreRow]:
        name = f"{task}/{self.source}"
        return [
            ScoreRow(name, "chars_per_token", self.chars_per_token, n=self.tokens),
            ScoreRow(name, "bytes_per_token", self.bytes_per_token, n=self.tokens),
            ScoreRow(name, "tokens_per_word", self.tokens_per_word, n=self.words),
        ]


def load_tokenizer_backend(tokenizer: str | Path | FucinaTokenizer | Tokenizer) -> Tokenizer:
    """The `tokenizers.Tokenizer` of a fucina tokenizer, a tokenizer.json, or a directory holding one."""
    if isinstance(tokenizer, FucinaTokenizer):
        return tokenizer.backend
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    path = Path(tokenizer)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(
            f"no tokenizer at {path}: expected a {TOKENIZER_FILE} or a directory holding one"
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust loader raises plain Exception on malformed files
        raise TokenizerError(f"{file}: not a valid tokenizer.json ({err})") from None


def measure_tokenizer(
    tokenizer: str | Path | FucinaTokenizer | Tokenizer, texts: Iterable[str], source: str = "texts"
) -> TokenizerStats:
    """Characters, bytes, words and tokens of `texts` under `tokenizer`."""
    backend = load_tokenizer_backend(tokenizer)
    unk = _unknown_id(backend)
    stats = TokenizerStats(source, 0, 0, 0, 0, 0, 0, 0)
    for text in texts:
        ids = backend.encode(text, add_special_tokens=False).ids
        stats.documents += 1
        stats.characters += len(text)
        stats.bytes += len(text.encode("utf-8"))
        stats.words += len(text.split())
        stats.tokens += len(ids)
        stats.unknown_tokens += 0 if unk is None else sum(1 for i in ids if i == unk)
        stats.roundtrip_failures += backend.decode(ids, skip_special_tokens=False) != text
    return stats


def _unknown_id(backend: Tokenizer) -> int | None:
    token = getattr(backend.model, "unk_token", None)
    return backend.token_to_id(token) if token else None


def tokenizer_report(
    tokenizer: str | Path | FucinaTokenizer | Tokenizer,
    data_dir: str | Path | None = None,
    sources: Sequence[str] = DEFAULT_SOURCES,
    limit: int | None = None,
) -> list[TokenizerStats]:
    """`measure_tokenizer` on each held-out source (the first `limit` documents of each, if given)."""
    backend = load_tokenizer_backend(tokenizer)
    return [measure_tokenizer(backend, heldout_texts(data_dir, source)[:limit], source) for source in sources]
