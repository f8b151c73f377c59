"""Corpus readers: text files, JSONL records and Hugging Face datasets, as a stream of documents.

Design choices:
- One `.txt` file is one document. Novels and stories arrive as whole files (the built-in prose corpus
  is laid out that way); a corpus of many short documents belongs in JSONL, one record per line. A
  `.txt` file is read whole because its document is one string anyway.
- JSONL streams: the file is read line by line as bytes and each line decoded on its own, so a 100 MB
  file never sits in memory as one string and invalid UTF-8 is reported with its line number.
- Compression is chosen by suffix (`.xz` -> lzma, `.gz` -> gzip). A truncated or corrupt archive is an
  error, never a silently shorter corpus.
- A record gives its text from the first field group it has: "text"; "messages" (the contents joined
  by newlines); "prompt" + "\\n" + "response"; "instruction" (+ "input") + "\\n" + "output". The same
  rules apply to the rows of a `datasets.Dataset`, and `read_conversations` turns prompt/response and
  instruction/output pairs into one user and one assistant message.
- Every malformed record raises `DataError(message, path, line)` (for datasets, "line" is the 1-based
  row). With `skip_bad=True` bad records are skipped and counted in `ReadStats`, with one warning per
  source; problems of a whole file (missing, unsupported, truncated, empty) always raise.
- `hf:NAME[:SPLIT]` (e.g. `hf:Mattimax/Little_ITA_60k` or `hf:NAME:train[:10%]`) calls
  `datasets.load_dataset(NAME, split=SPLIT or "train")`: a convenience for users that needs the network,
  so tests and defaults never use it.
"""

from __future__ import annotations

import codecs
import gzip
import json
import logging
import lzma
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from fucina.errors import DataError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
COMPRESSED_SUFFIXES = (".xz", ".gz")
HF_PREFIX = "hf:"

T = TypeVar("T")


@dataclass
class ReadStats:
    """What a read produced: records kept, records skipped as bad (only with skip_bad) and why."""

    records: int = 0
    skipped: int = 0
    first_error: str | None = None


# --- opening files -------------------------------------------------------------------------------


def _split_suffixes(path: Path) -> tuple[str, str | None]:
    """The format suffix and the compression suffix (or None) of a file name."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES else None
    return (suffixes[-1] if suffixes else ""), compression


def _is_supported(path: Path) -> bool:
    fmt, _ = _split_suffixes(path)
    return fmt in TEXT_SUFFIXES + JSONL_SUFFIXES


def _open_binary(path: Path) -> IO[bytes]:
    _, compression = _split_suffixes(path)
    if not path.exists():
        raise DataError("file not found", path)
    if path.is_dir():
        raise DataError("is a directory, expected a file", path)
    try:
        if compression == ".xz":
            return lzma.open(path, "rb")
        if compression == ".gz":
            return gzip.open(path, "rb")
        return open(path, "rb")
    except OSError as err:
        raise DataError(f"cannot open: {err.strerror or err}", path) from err


def _numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of each line, decompressing as it goes."""
    handle = _open_binary(path)
    with handle:
        number = 0
        while True:
            try:
                raw = handle.readline()
            except (EOFError, OSError, lzma.LZMAError, zlib.error) as err:
                raise DataError(
                    f"compressed data is truncated or corrupt after line {number} ({err})", path, number + 1
                ) from err
            if not raw:
                return
            number += 1
            yield number, raw


def _decode(raw: bytes, path: str | Path, line: int) -> str:
    if line == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"invalid UTF-8 (byte {err.start} of the line)", path, line) from err


def _expand(path: Path) -> list[Path]:
    """A file stays itself; a directory becomes its supported files, sorted so runs repeat."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_supported(p))
        if not files:
            raise DataError("directory holds no .txt or .jsonl files (optionally .xz/.gz)", path)
        return files
    if path.exists() and not _is_supported(path):
        raise DataError("unsupported file type; expected .txt or .jsonl, optionally .xz or .gz", path)
    return [path]


# --- validating records --------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _parse_json_object(raw: bytes, path: str | Path, line: int) -> dict:
    text = _decode(raw, path, line)
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"malformed JSON: {err.msg} (column {err.colno})", path, line) from err
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {_type_name(record)}", path, line)
    return record


def _string_field(record: dict, key: str, path: str | Path, line: int, allow_empty: bool = False) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"field '{key}' must be a string, got {_type_name(value)}", path, line)
    if not allow_empty and not value.strip():
        raise DataError(f"field '{key}' is empty", path, line)
    return value


def _validated_messages(value: Any, path: str | Path, line: int) -> list[dict]:
    """Messages as {"role", "content"} dicts with known roles and non-empty string content."""
    if not isinstance(value, list):
        raise DataError(
            f"field 'messages' must be a list of {{role, content}} objects, got {_type_name(value)}",
            path,
            line,
        )
    if not value:
        raise DataError("field 'messages' is empty", path, line)
    messages = []
    for number, message in enumerate(value, 1):
        where = f"message {number}"
        if not isinstance(message, dict):
            raise DataError(f"{where} must be an object, got {_type_name(message)}", path, line)
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"{where} has no '{key}' field", path, line)
            if not isinstance(message[key], str):
                raise DataError(
                    f"{where}: '{key}' must be a string, got {_type_name(message[key])}", path, line
                )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{where} has unknown role '{role}' (expected {', '.join(ROLES)})", path, line)
        if not content.strip():
            raise DataError(f"{where} ({role}) has empty content", path, line)
        messages.append({"role": role, "content": content})
    return messages


def _pair(record: dict, first: str, second: str, path: str | Path, line: int) -> tuple[str, str] | None:
    """The two fields of a prompt/response-like pair, None when neither is there."""
    if first not in record and second not in record:
        return None
    for present, missing in ((first, second), (second, first)):
        if present in record and missing not in record:
            raise DataError(f"field '{present}' without '{missing}'", path, line)
    return _string_field(record, first, path, line), _string_field(record, second, path, line)


def _instruction_prompt(record: dict, path: str | Path, line: int, instruction: str) -> str:
    extra = record.get("input")
    if extra is None or extra == "":
        return instruction
    if not isinstance(extra, str):
        raise DataError(f"field 'input' must be a string, got {_type_name(extra)}", path, line)
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _missing_fields(record: dict, path: str | Path, line: int) -> DataError:
    keys = ", ".join(sorted(map(str, record))) or "none"
    return DataError(
        "record has none of the fields 'text', 'messages', 'prompt'/'response', 'instruction'/'output' "
        f"(its fields: {keys})",
        path,
        line,
    )


def record_text(record: dict, path: str | Path, line: int) -> str:
    """The document text of one record (see the module doc for the field rules)."""
    if "text" in record:
        return _string_field(record, "text", path, line)
    if "messages" in record:
        return "\n".join(m["content"] for m in _validated_messages(record["messages"], path, line))
    if pair := _pair(record, "prompt", "response", path, line):
        return f"{pair[0]}\n{pair[1]}"
    if pair := _pair(record, "instruction", "output", path, line):
        return f"{_instruction_prompt(record, path, line, pair[0])}\n{pair[1]}"
    raise _missing_fields(record, path, line)


def record_conversation(record: dict, path: str | Path, line: int) -> list[dict]:
    """The validated messages of one record; a prompt/response pair becomes user + assistant."""
    if "messages" in record:
        messages = _validated_messages(record["messages"], path, line)
    elif pair := _pair(record, "prompt", "response", path, line):
        messages = [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    elif pair := _pair(record, "instruction", "output", path, line):
        prompt = _instruction_prompt(record, path, line, pair[0])
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": pair[1]}]
    else:
        raise DataError(
            "record has no 'messages' (nor 'prompt'/'response' or 'instruction'/'output') field", path, line
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("conversation has no assistant turn", path, line)
    return messages


# --- sources -------------------------------------------------------------------------------------


def _converted(
    records: Iterable[tuple[int, Any]],
    convert: Callable[[Any, str | Path, int], T],
    source: str | Path,
    skip_bad: bool,
    stats: ReadStats,
) -> Iterator[T]:
    """convert(record, source, number) for each record; bad ones are skipped and counted if skip_bad."""
    kept = skipped = 0
    for number, record in records:
        try:
            item = convert(record, source, number)
        except DataError as err:
            if not skip_bad:
                raise
            skipped += 1
            stats.skipped += 1
            stats.first_error = stats.first_error or str(err)
            continue
        kept += 1
        stats.records += 1
        yield item
    if skipped:
        logger.warning("%s: skipped %d bad record(s) of %d", source, skipped, kept + skipped)
    if kept == 0 and skipped == 0:
        raise DataError("no records: the input is empty", source)


def _non_blank_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    return ((number, raw) for number, raw in _numbered_lines(path) if raw.strip())


def iter_json_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(1-based line, record) of each non-blank line of a JSONL file (.xz/.gz too); DataError names the line."""
    path = Path(path)
    return ((line, _parse_json_object(raw, path, line)) for line, raw in _non_blank_lines(path))


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line, raw bytes) of each non-blank line of a JSONL file (.xz/.gz too), lazily.

    For readers that must go on past a bad record: parse each line with `parse_json_line`.
    """
    return _non_blank_lines(Path(path))


def parse_json_line(raw: bytes, path: str | Path, line: int) -> dict:
    """One JSONL line as a JSON object; DataError (path, line) for invalid UTF-8, bad JSON or a non-object."""
    return _parse_json_object(raw, path, line)


def _jsonl_text(raw: bytes, path: str | Path, line: int) -> str:
    return record_text(_parse_json_object(raw, path, line), path, line)


def _jsonl_conversation(raw: bytes, path: str | Path, line: int) -> list[dict]:
    return record_conversation(_parse_json_object(raw, path, line), path, line)


def _txt_document(lines: list[tuple[int, bytes]], path: str | Path, _number: int) -> str:
    text = "".join(_decode(raw, path, number) for number, raw in lines)
    if not text.strip():
        raise DataError("empty document", path)
    return text


_CONVERTERS: dict[str, tuple[Callable, Callable]] = {
    "text": (_jsonl_text, record_text),
    "conversation": (_jsonl_conversation, record_conversation),
}


def _is_dataset(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "datasets"


def _dataset_rows(dataset: Any) -> tuple[str, Iterator[tuple[int, dict]]]:
    import datasets

    if isinstance(dataset, datasets.DatasetDict | datasets.IterableDatasetDict):
        splits = ", ".join(dataset)
        raise DataError(f"a DatasetDict holds several splits ({splits}); pass one, e.g. dataset['train']")
    if not isinstance(dataset, datasets.Dataset | datasets.IterableDataset):
        raise TypeError(f"unsupported datasets object {type(dataset).__name__}")
    name = getattr(dataset.info, "dataset_name", None) or "in memory"
    return f"<dataset {name}>", enumerate(dataset, 1)


def _load_hf(spec: str) -> Any:
    name, _, split = spec[len(HF_PREFIX) :].partition(":")
    if not name:
        raise DataError(f"missing dataset name; write {HF_PREFIX}NAME[:SPLIT]", spec)
    import datasets

    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as err:
        raise DataError(
            f"cannot load Hugging Face dataset '{name}' (split '{split or 'train'}'): {err}", spec
        ) from err


def _iter_records(
    inputs: Iterable[Any] | str | Path, kind: str, skip_bad: bool, stats: ReadStats
) -> Iterator[Any]:
    """Texts (kind "text") or conversations (kind "conversation") from every input in turn."""
    line_convert, row_convert = _CONVERTERS[kind]
    if isinstance(inputs, str | Path) or _is_dataset(inputs):
        inputs = [inputs]
    for source in inputs:
        if isinstance(source, str) and source.startswith(HF_PREFIX):
            source = _load_hf(source)
        if _is_dataset(source):
            name, rows = _dataset_rows(source)
            yield from _converted(rows, row_convert, name, skip_bad, stats)
            continue
        if not isinstance(source, str | Path):
            raise TypeError(
                f"unsupported input {type(source).__name__}: expected a path or a datasets.Dataset"
            )
        for path in _expand(Path(source)):
            fmt, _ = _split_suffixes(path)
            if fmt in JSONL_SUFFIXES:
                yield from _converted(_non_blank_lines(path), line_convert, path, skip_bad, stats)
            elif kind == "conversation":
                raise DataError("conversations must be JSONL records with 'messages', not plain text", path)
            else:
                # Read outside the converter: a truncated archive must raise even with skip_bad.
                lines = list(_numbered_lines(path))
                yield from _converted([(1, lines)], _txt_document, path, skip_bad, stats)


def _describe(inputs: Any) -> str:
    if isinstance(inputs, str | Path) or _is_dataset(inputs):
        inputs = [inputs]
    try:
        names = [str(x) if isinstance(x, str | Path) else "<dataset>" for x in inputs]
    except TypeError:
        return "<inputs>"
    return ", ".join(names) or "<no inputs>"


def iter_texts(
    inputs: Iterable[str | Path | Any] | str | Path,
    skip_bad: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """Yield document texts from files, directories, `hf:NAME[:SPLIT]` specs and `datasets.Dataset`s."""
    stats = stats if stats is not None else ReadStats()
    found = 0
    for text in _iter_records(inputs, "text", skip_bad, stats):
        found += 1
        yield text
    if found == 0:
        raise DataError("no documents in the inputs", _describe(inputs))


def iter_conversations(
    inputs: Iterable[str | Path | Any] | str | Path,
    skip_bad: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[list[dict]]:
    """Yield validated conversations (lists of {"role", "content"}) from chat JSONL or datasets."""
    stats = stats if stats is not None else ReadStats()
    found = 0
    for conversation in _iter_records(inputs, "conversation", skip_bad, stats):
        found += 1
        yield conversation
    if found == 0:
        raise DataError("no conversations in the inputs", _describe(inputs))


def read_conversations(
    path: str | Path | Any, skip_bad: bool = False, stats: ReadStats | None = None
) -> list[list[dict]]:
    """All conversations of a chat JSONL file ("messages", or "prompt"/"response" pairs), validated."""
    return list(iter_conversations(path, skip_bad=skip_bad, stats=stats))
