"""Data sources as a config names them, and the held-out documents kept out of training.

Design choices:
- A source is a file or directory path, `builtin` (the packaged corpus of the stage: prose or chats),
  `builtin:prose`, `builtin:chat`, or `hf:NAME[:SPLIT]`; only paths are resolved against a config file.
- `data.exclude` names held-out split lists like shared/data/splits.json.
- Evaluation reports bits per byte on fixed held-out documents (8 ELTeC novels, 1,000 Wikipedia passages,
  the XPersona-it test file); a model or tokenizer that saw them would report a flattering number. So a
  config lists the split files (`data.exclude: [../../shared/data/splits.json]`) and every reader of the
  run (tokenizer training, pretraining, chat fine-tuning, validation) skips the records they name.
- A split file maps a data file, relative to the split file's directory, to `{"field": "id", "test":
  [ids]}` or `"test": "all"` (the whole file is held out). Records are matched on that field.
- Only sources that name a listed file directly are filtered record by record; a directory source that
  contains a listed file is refused (name the files), so nothing held out slips in through a folder.
- Filtered files are read line by line through the readers' own JSONL reading (`iter_json_lines`,
  `parse_json_line`: decompression, UTF-8, file:line errors) and record rules (`record_text`,
  `record_conversation`), so a JSONL record means the same thing with or without exclusions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fucina.data.readers import (
    HF_PREFIX,
    ReadStats,
    iter_json_lines,
    parse_json_line,
    record_conversation,
    record_text,
)
from fucina.errors import ConfigError, DataError

log = logging.getLogger(__name__)

BUILTIN_SOURCE = "builtin"


def is_path_source(source: str) -> bool:
    """True for a data source that names a file (not `builtin`, not `hf:NAME`)."""
    builtin = source == BUILTIN_SOURCE or source.startswith(f"{BUILTIN_SOURCE}:")
    return not builtin and not source.startswith(HF_PREFIX)


@dataclass(frozen=True)
class HeldOut:
    """The records of one data file that must not be trained on."""

    field: str
    ids: frozenset[str] | None  # None: the whole file

    def excludes(self, record: dict[str, Any]) -> bool:
        return self.ids is None or record.get(self.field) in self.ids


def load_exclusions(split_files: list[str]) -> dict[Path, HeldOut]:
    """Resolved data-file path -> its held-out records, from every split file; DataError names a bad one."""
    exclusions: dict[Path, HeldOut] = {}
    for name in split_files:
        path = Path(name)
        try:
            splits = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError("held-out split list not found (data.exclude)", path) from None
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read the held-out split list ({err})", path) from None
        except json.JSONDecodeError as err:
            raise DataError(f"malformed JSON: {err.msg}", path, err.lineno) from None
        if not isinstance(splits, dict):
            raise DataError("expected a JSON object mapping data files to held-out ids", path)
        for relative, entry in splits.items():
            if relative.startswith("_"):
                continue  # comments such as "_about"
            if not isinstance(entry, dict) or "test" not in entry:
                raise DataError(f"entry '{relative}' needs a 'test' list (or \"all\")", path)
            wanted = entry["test"]
            if wanted != "all" and not isinstance(wanted, list):
                raise DataError(f"entry '{relative}': 'test' must be a list of ids or \"all\"", path)
            ids = None if wanted == "all" else frozenset(str(i) for i in wanted)
            exclusions[(path.parent / relative).resolve()] = HeldOut(str(entry.get("field", "id")), ids)
    return exclusions


def check_sources(sources: list[str | Path], exclusions: dict[Path, HeldOut]) -> None:
    """Refuse a directory source that holds a held-out file (it could not be filtered record by record)."""
    for source in sources:
        if isinstance(source, str | Path) and Path(source).is_dir():
            directory = Path(source).resolve()
            inside = [p for p in exclusions if directory in p.parents]
            if inside:
                raise ConfigError(
                    f"data source {source} is a directory holding the held-out file {inside[0]}; "
                    "list its files one by one so the held-out records can be skipped"
                )


def iter_filtered(
    path: Path,
    held_out: HeldOut,
    kind: str,
    skip_bad: bool,
    stats: ReadStats,
) -> Iterator[Any]:
    """Texts (kind "text") or conversations ("conversation") of a JSONL file, minus its held-out records."""
    if not path.name.lower().removesuffix(".xz").removesuffix(".gz").endswith(".jsonl"):
        raise DataError("a file with held-out records must be JSONL (records are matched by id)", path)
    convert: Callable[[dict, Path, int], Any] = record_text if kind == "text" else record_conversation
    kept = excluded = 0
    for line, raw in iter_json_lines(path):
        try:
            record = parse_json_line(raw, path, line)
            if held_out.excludes(record):
                excluded += 1
                continue
            item = convert(record, path, line)
        except DataError as err:
            if not skip_bad:
                raise
            stats.skipped += 1
            stats.first_error = stats.first_error or str(err)
            continue
        kept += 1
        stats.records += 1
        yield item
    log.info("%s: %d held-out record(s) left out, %d read", path, excluded, kept)
