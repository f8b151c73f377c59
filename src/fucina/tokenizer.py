"""Byte-level BPE for Italian, trained with Hugging Face `tokenizers`, with a chat template's special tokens.

Design choices, and why:
- Byte-level BPE (GPT-2 style): every string is encodable (no unknown token is ever produced) and decoding
  is exact, so text -> ids -> text round-trips accents, apostrophes, emoji and runs of spaces. There is no
  normalizer: NFC/NFKC would change the text and break that round trip.
- The chat template's special tokens are given to the trainer, so they take the first ids in the
  template's order (picodac: `<PAD>`=0, `<BOS>`=1, ...). Every one of them mixes letters and punctuation,
  which both pre-tokenizers split apart, so no merge can ever rebuild one; training checks this anyway.
- `encode` never turns a spelled special token into its id (`encode_special_tokens=True` on the backend):
  message text cannot inject a role. Special ids come only from the chat template.
- Two pre-tokenizations, both followed by byte-level mapping:
  * "bytelevel": the plain GPT-2 regex (`ByteLevel(use_regex=True)`).
  * "italian": `Split(ITALIAN_PATTERN, "isolated")` then `ByteLevel(use_regex=False)`, where

        ITALIAN_PATTERN = ` ?[\\p{L}\\p{M}]+['’]?| ?\\p{N}+| ?['’]| ?[^\\s\\p{L}\\p{M}\\p{N}STOPS'’]+|(?:[STOPS]| (?![^\\sSTOPS])|[^\\S ])+`
        with STOPS = `.,!?…。，、।۔،()|` (sentence stops and brackets)

    - ` ?[\\p{L}\\p{M}]+['’]?`: a word with its leading space; accented letters (àèéìòù, ÀÈÉÌÒÙ, also
      written with combining accents, \\p{M}) are letters; a straight or typographic apostrophe stays with
      the word on its left, so elisions are whole pieces: `dell'acqua` -> `dell'` + `acqua`,
      `l’altra` -> `l’` + `altra`, `un po'` -> `un` + ` po'`. GPT-2's regex instead gives `dell` + `'` +
      `acqua` and lets merges glue `'acqua`, `'altra`, ... once per following word.
    - ` ?\\p{N}+`: digit runs as GPT-2; ` ?['’]`: any other apostrophe stands alone;
      ` ?[^...]+`: runs of other symbols (quotes, «», dashes, ;:) with their leading space.
    - the last alternative takes a run of stops and whitespace, leaving out a space that begins the next
      word: `, ` `?\\n\\n` `.\\n` are single pieces.
    Why exactly these classes: llama.cpp cannot be given a regex, only the name of one it knows. Its
    "bloom" pre-tokenizer keeps ` ?[^(\\s|STOPS)]+` runs and leaves the text between them as pieces. Our
    last alternative is exactly that in-between text, and inside a bloom run we only add boundaries
    between pieces of different classes (letters / digits / apostrophe / other symbols). No piece we train
    on holds a letter followed by a digit or symbol, a digit followed by anything else, or anything after
    an apostrophe, so BPE learns no merge across those boundaries and llama.cpp's coarser pieces tokenize to
    exactly our ids. A GGUF export therefore names "bloom" and needs no llama.cpp patch.
  "italian" is the default: it gives 1-3 % more characters per token than "bytelevel" on held-out ELTeC
  novels and Wikipedia passages at 1920, 8000 and 32000 ids (bench/tokenizer_compression.py,
  docs/tokenizer.md).
- Saved as `tokenizer.json` (loads in `transformers.PreTrainedTokenizerFast` with identical ids) and
  `tokenizer_config.json` (special tokens, the Jinja chat template, fucina's template and pre-tokenizer
  names), so `AutoTokenizer.from_pretrained(directory)` works offline.
"""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from fucina.chat_template import CHAT_TEMPLATE_NAMES, ChatTemplate, get_chat_template
from fucina.errors import ConfigError, TokenizerError
from fucina.fsutil import write_atomically, write_json_atomically

logger = logging.getLogger(__name__)

# Sentence stops and brackets that llama.cpp's "bloom" pre-tokenizer splits at (see the module docstring).
_STOPS = ".,!?…。，、।۔،()|"
_LETTERS = r"\p{L}\p{M}"
ITALIAN_PATTERN = (
    rf" ?[{_LETTERS}]+['’]?| ?\p{{N}}+| ?['’]| ?[^\s{_LETTERS}\p{{N}}{_STOPS}'’]+"
    rf"|(?:[{_STOPS}]| (?![^\s{_STOPS}])|[^\S ])+"
)
# The llama.cpp pre-tokenizer whose splits our "italian" pieces refine without any cross-boundary merge.
LLAMA_CPP_PRETOKENIZER = {"italian": "bloom", "bytelevel": "gpt-2"}
PRETOKENIZER_NAMES = ("italian", "bytelevel")
DEFAULT_PRETOKENIZER = "italian"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
BYTE_ALPHABET_SIZE = 256


def build_pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer called `name` ("italian" or "bytelevel"); ConfigError otherwise."""
    if name == "bytelevel":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name == "italian":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(ITALIAN_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise ConfigError(f"unknown pre-tokenizer {name!r}; choose one of {', '.join(PRETOKENIZER_NAMES)}")


def pretokenize(text: str, name: str = DEFAULT_PRETOKENIZER) -> list[str]:
    """The pieces BPE sees for `text` under pre-tokenizer `name`, as readable text (not byte symbols)."""
    table = _unicode_to_byte()
    pieces = build_pre_tokenizer(name).pre_tokenize_str(text)
    return [bytes(table[char] for char in piece).decode("utf-8") for piece, _ in pieces]


def _hex_bytes(error: UnicodeDecodeError) -> tuple[str, int]:
    """Codec error handler: show the bytes of a character split across tokens as `<0xNN>`."""
    return "".join(f"<0x{byte:02X}>" for byte in error.object[error.start : error.end]), error.end


_HEX_BYTES = "fucina-hex-bytes"
codecs.register_error(_HEX_BYTES, _hex_bytes)


@cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character table used by byte-level BPE."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(BYTE_ALPHABET_SIZE):
        if byte not in table:
            table[byte] = chr(BYTE_ALPHABET_SIZE + shifted)
            shifted += 1
    return {char: byte for byte, char in table.items()}


class FucinaTokenizer:
    """A trained byte-level BPE together with the chat template it was trained for."""

    def __init__(self, backend: Tokenizer, template: ChatTemplate | str, pretokenizer: str = "custom"):
        self.backend = backend
        self.backend.encode_special_tokens = True  # spelled special tokens in text stay text
        self.template = get_chat_template(template) if isinstance(template, str) else template
        self.pretokenizer = pretokenizer
        missing = [token for token in self.template.special_tokens if backend.token_to_id(token) is None]
        if missing:
            raise TokenizerError(
                f"tokenizer lacks the special tokens {missing} of the {self.template.name!r} chat template"
            )
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.pad_id = self._optional_id(self.template.pad_token)
        self.bos_id = self._optional_id(self.template.bos_token)
        self.eos_id = self._optional_id(self.template.eos_token)
        self.unk_id = self._optional_id(self.template.unk_token)
        added = backend.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, token in added.items() if token.special)

    def _optional_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Ids of plain text; a spelled special token (`<|im_start|>`) is encoded as ordinary text."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of many texts at once, in parallel threads."""
        return [encoding.ids for encoding in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def token_bytes(self, i: int) -> bytes:
        """The raw bytes a token stands for (a special token: its spelling in UTF-8)."""
        token = self.backend.id_to_token(i)
        if token is None:
            raise TokenizerError(f"token id {i} is outside the vocabulary of {self.vocab_size}")
        if i in self.special_ids:
            return token.encode("utf-8")
        table = _unicode_to_byte()
        return bytes(table[char] for char in token)

    def pieces(self, text: str) -> list[tuple[int, str]]:
        """(id, readable piece) for each token of `text`; bytes of a split character show as `<0xNN>`."""
        return [(i, self.token_bytes(i).decode("utf-8", errors=_HEX_BYTES)) for i in self.encode(text)]

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the Jinja chat template) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        template = self.template
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": template.bos_token,
            "eos_token": template.eos_token,
            "pad_token": template.pad_token,
            "unk_token": template.unk_token,
            "clean_up_tokenization_spaces": False,
            "chat_template": template.jinja,
            "fucina_template": template.name,
            "fucina_pretokenizer": self.pretokenizer,
        }
        write_atomically(directory / TOKENIZER_FILE, self.backend.to_str(pretty=True))
        write_json_atomically(directory / CONFIG_FILE, config)

    @classmethod
    def load(cls, path: str | Path) -> FucinaTokenizer:
        """Load from a directory holding tokenizer.json (+ tokenizer_config.json), or from the file itself."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"no tokenizer at {path}: expected {TOKENIZER_FILE} (train one first)")
        try:
            backend = Tokenizer.from_file(str(file))
        except Exception as err:  # the Rust loader raises plain Exception on any malformed JSON
            raise TokenizerError(f"{file}: not a valid tokenizer.json ({err})") from None
        config = _read_config(file.parent / CONFIG_FILE)
        template_name = config.get("fucina_template") or _infer_template(backend, file)
        if template_name not in CHAT_TEMPLATE_NAMES:
            raise TokenizerError(f"{file.parent / CONFIG_FILE}: unknown fucina_template {template_name!r}")
        return cls(backend, template_name, config.get("fucina_pretokenizer", "custom"))

    def __repr__(self) -> str:
        return (
            f"FucinaTokenizer(vocab_size={self.vocab_size}, template={self.template.name!r}, "
            f"pretokenizer={self.pretokenizer!r})"
        )


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return config


def _infer_template(backend: Tokenizer, file: Path) -> str:
    """Without a config, the template whose special tokens are exactly the tokenizer's first ids."""
    for name in CHAT_TEMPLATE_NAMES:
        tokens = get_chat_template(name).special_tokens
        if all(backend.token_to_id(token) == i for i, token in enumerate(tokens)):
            return name
    raise TokenizerError(f"{file}: no {CONFIG_FILE} beside it and its special tokens match no chat template")


def _checked_texts(texts: Iterable[str]) -> Iterator[str]:
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TokenizerError(f"training text #{index} is a {type(text).__name__}, not a string")
        yield text


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    template: str = "chatml",
    pretokenizer: str = DEFAULT_PRETOKENIZER,
    min_frequency: int = 2,
    length: int | None = None,
    show_progress: bool = True,
) -> FucinaTokenizer:
    """Train a byte-level BPE of `vocab_size` ids (special tokens and the 256 bytes included) on `texts`.

    `length` is the number of texts, if known, for the progress bar.
    """
    chat_template = get_chat_template(template)
    pre_tokenizer = build_pre_tokenizer(pretokenizer)
    minimum = BYTE_ALPHABET_SIZE + len(chat_template.special_tokens)
    if not isinstance(vocab_size, int) or vocab_size <= minimum:
        raise ConfigError(
            f"vocab_size must be an integer above {minimum} (256 bytes + {len(chat_template.special_tokens)} "
            f"special tokens of {template!r}), got {vocab_size!r}"
        )
    if min_frequency < 0:
        raise ConfigError(f"min_frequency must be >= 0, got {min_frequency}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(chat_template.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(_checked_texts(texts), trainer=trainer, length=length)
    _check_no_merge_builds_special(backend, chat_template.special_tokens)
    tokenizer = FucinaTokenizer(backend, chat_template, pretokenizer)
    if tokenizer.vocab_size < vocab_size:
        logger.warning(
            "the corpus only supports %d of the %d requested ids (too little text, or min_frequency too high)",
            tokenizer.vocab_size,
            vocab_size,
        )
    return tokenizer


def bpe_merges(backend: Tokenizer) -> list[tuple[str, str]]:
    """The BPE merges in rank order, each as the pair of (byte-level) strings it joins."""
    merges = json.loads(backend.to_str())["model"]["merges"]
    return [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ", 1)) for merge in merges]


def _check_no_merge_builds_special(backend: Tokenizer, special_tokens: Sequence[str]) -> None:
    built = {left + right for left, right in bpe_merges(backend)} & set(special_tokens)
    if built:
        raise TokenizerError(
            f"BPE merges rebuild the special tokens {sorted(built)}; they must stay single ids"
        )
