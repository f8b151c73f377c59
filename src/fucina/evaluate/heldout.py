"""Where the evaluation data lives, and the held-out documents every report is measured on.

Design choices, and why:
- One data root for everything evaluation reads: `--data-dir`, else `$FUCINA_DATA_DIR`, else
  `../shared/data` beside the working directory (where a checkout's data sits). Never the package's own
  position on disk: an installed fucina lives in site-packages, far from any data. Task files and
  held-out splits are named relative to the root, so a task YAML works on any machine that has the data.
- `splits.json` of the data root names the held-out documents (by their `id` field, or `"all"` of a
  file). We read exactly those, in file order, so held-out bits per byte compare across runs.
- JSONL records are read here with their line numbers (not through `iter_texts`, which yields only the
  text) because held-out documents are picked by id and task items need every field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fucina.data.readers import iter_json_records as iter_jsonl_records
from fucina.data.readers import record_conversation
from fucina.errors import DataError

DATA_DIR_ENV = "FUCINA_DATA_DIR"
SPLITS_FILE = "splits.json"

# Short names of the held-out sources -> (file under the data root, kind of record).
HELDOUT_SOURCES: dict[str, tuple[str, str]] = {
    "eltec": ("eltec-ita/eltec_ita.jsonl.xz", "text"),
    "wikipedia": ("exams-it/exams_it_wikipedia_snippets.jsonl.xz", "text"),
    "xpersona": ("xpersona-it/xpersona_it_test.chat.jsonl", "chat"),
}


def default_data_dir() -> Path:
    """`$FUCINA_DATA_DIR` if set, else `../shared/data` beside the current working directory."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    return Path.cwd().parent / "shared" / "data"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data root to use (`data_dir` when given); DataError naming all three places when it is missing."""
    path = Path(data_dir) if data_dir is not None else default_data_dir()
    if not path.is_dir():
        environment = os.environ.get(DATA_DIR_ENV)
        raise DataError(
            "evaluation data directory not found: pass --data-dir DIR, or set "
            f"${DATA_DIR_ENV} (now {'unset' if not environment else repr(environment)}), "
            f"or put the data in ../shared/data beside the working directory ({Path.cwd().parent / 'shared' / 'data'})",
            path,
        )
    return path


def _split_entry(data_dir: Path, source: str) -> tuple[str, str, set | None]:
    """(file under the data root, id field, held-out ids or None for the whole file) of `source`."""
    if source not in HELDOUT_SOURCES:
        raise DataError(f"unknown held-out source {source!r}; choose one of {', '.join(HELDOUT_SOURCES)}")
    relative, _ = HELDOUT_SOURCES[source]
    splits_path = data_dir / SPLITS_FILE
    if not splits_path.is_file():
        raise DataError("held-out split list not found", splits_path)
    try:
        splits = json.loads(splits_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"malformed JSON: {err.msg}", splits_path, err.lineno) from None
    entry = splits.get(relative)
    if not isinstance(entry, dict) or "test" not in entry:
        raise DataError(f"no held-out entry for '{relative}'", splits_path)
    wanted = entry["test"]
    return relative, entry.get("field", "id"), None if wanted == "all" else set(wanted)


def _heldout_records(data_dir: Path, source: str) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    relative, field, ids = _split_entry(data_dir, source)
    path = data_dir / relative
    found = 0
    for line, record in iter_jsonl_records(path):
        if ids is None or record.get(field) in ids:
            found += 1
            yield path, line, record
    if ids is not None and found != len(ids):
        raise DataError(
            f"found {found} of the {len(ids)} held-out documents listed in {data_dir / SPLITS_FILE}", path
        )


def training_texts(shared_data_dir: str | Path | None, source: str) -> Iterator[str]:
    """The documents of `source` ("eltec", "wikipedia") that are NOT held out: what a model may train on."""
    data_dir = resolve_data_dir(shared_data_dir)
    relative, field, ids = _split_entry(data_dir, source)
    if ids is None:
        raise DataError(f"held-out source {source!r} is held out whole; nothing of it may be trained on")
    path = data_dir / relative
    for line, record in iter_jsonl_records(path):
        if record.get(field) in ids:
            continue
        text = record.get("text")
        if not isinstance(text, str):
            raise DataError("record has no string field 'text'", path, line)
        yield text


def heldout_texts(shared_data_dir: str | Path | None, source: str) -> list[str]:
    """The held-out documents of `source` ("eltec": 8 novels, "wikipedia": 1000 passages), in file order."""
    data_dir = resolve_data_dir(shared_data_dir)
    if source in HELDOUT_SOURCES and HELDOUT_SOURCES[source][1] != "text":
        raise DataError(f"held-out source {source!r} holds conversations; use heldout_conversations")
    texts = []
    for path, line, record in _heldout_records(data_dir, source):
        text = record.get("text")
        if not isinstance(text, str):
            raise DataError("record has no string field 'text'", path, line)
        texts.append(text)
    return texts


def heldout_conversations(shared_data_dir: str | Path | None, source: str = "xpersona") -> list[list[dict]]:
    """The held-out conversations of `source` ("xpersona": the whole XPersona-it test file)."""
    data_dir = resolve_data_dir(shared_data_dir)
    if source in HELDOUT_SOURCES and HELDOUT_SOURCES[source][1] != "chat":
        raise DataError(f"held-out source {source!r} holds plain texts; use heldout_texts")
    return [
        record_conversation(record, path, line) for path, line, record in _heldout_records(data_dir, source)
    ]
