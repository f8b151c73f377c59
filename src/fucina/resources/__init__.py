"""The built-in Italian corpus that ships inside the package.

It holds original Italian prose (one everyday topic per file under `corpus/prosa/`) and short chat
conversations (`corpus/conversazioni.jsonl`), written for fucina and released under the project's
Apache-2.0 license, so they carry no third-party terms.

Why it exists: the demo, the docs and the tests need a small real corpus that is there on every
machine, with no download and no external data set. It is far too small to make a good model; it is
enough to train a tokenizer and a tiny model end to end and to see the whole pipeline work.

Design choice: paths are resolved from this file's directory rather than through importlib.resources
Traversables, because every consumer (readers, tokenizer training) wants real `Path`s; the files are
package data (pyproject: `resources/**/*`), so they sit next to this module in a normal install.
"""

from __future__ import annotations

from pathlib import Path

from fucina.errors import DataError

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
PROSE_DIR = CORPUS_DIR / "prosa"
CHAT_FILE = CORPUS_DIR / "conversazioni.jsonl"


def builtin_prose_files() -> list[Path]:
    """The built-in prose documents (UTF-8 .txt, one document each), sorted by name.

    Raises DataError naming the directory when none is found (e.g. a build that dropped package data).
    """
    files = sorted(PROSE_DIR.glob("*.txt"))
    if not files:
        raise DataError(
            "no built-in prose files found (was the package installed without its data?)", PROSE_DIR
        )
    return files


def builtin_chat_file() -> Path:
    """The built-in conversations: JSONL, one {"id", "messages": [{"role", "content"}, ...]} per line."""
    return CHAT_FILE
