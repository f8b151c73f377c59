"""The one atomic-write helper: an error inside leaves the old file or directory as it was, no temporary."""

from __future__ import annotations

import json

import pytest

from fucina.fsutil import (
    OutputExistsError,
    atomic_path,
    staged_output,
    write_atomically,
    write_json_atomically,
)


class Interrupted(Exception):
    pass


def _entries(directory):
    return sorted(path.name for path in directory.iterdir())


def test_write_atomically_replaces_the_file_with_text_or_bytes(tmp_path):
    path = tmp_path / "notes.txt"
    write_atomically(path, "perché")
    assert path.read_text(encoding="utf-8") == "perché"
    write_atomically(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert _entries(tmp_path) == ["notes.txt"]


def test_an_error_inside_atomic_path_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(Interrupted), atomic_path(path) as tmp:
        tmp.write_bytes(b"half of the new")
        raise Interrupted
    assert path.read_bytes() == b"old"
    assert _entries(tmp_path) == ["model.safetensors"]


def test_atomic_path_moves_what_a_library_wrote_into_place(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old")
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp != path
        tmp.write_bytes(b"new")
        assert path.read_bytes() == b"old"  # readers see the old file until the block ends
    assert path.read_bytes() == b"new"
    assert _entries(tmp_path) == ["weights.bin"]


def test_write_json_atomically_writes_utf8_json_and_keeps_the_old_file_on_a_bad_value(tmp_path):
    path = tmp_path / "config.json"
    write_json_atomically(path, {"città": 1})
    assert path.read_text(encoding="utf-8") == '{\n  "città": 1\n}\n'
    with pytest.raises(TypeError):
        write_json_atomically(path, {"bad": object()})
    assert json.loads(path.read_text(encoding="utf-8")) == {"città": 1}
    assert _entries(tmp_path) == ["config.json"]


def test_an_error_inside_staged_output_leaves_the_old_directory_and_no_temporary(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "a.txt").write_text("old", encoding="utf-8")
    with pytest.raises(Interrupted), staged_output(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new", encoding="utf-8")
        raise Interrupted
    assert (out / "a.txt").read_text(encoding="utf-8") == "old"
    assert _entries(tmp_path) == ["export"]


def test_staged_output_replaces_a_directory_only_with_overwrite(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.txt").write_text("old", encoding="utf-8")
    with pytest.raises(OutputExistsError, match="--overwrite"), staged_output(out):
        pass
    with staged_output(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new", encoding="utf-8")
    assert _entries(out) == ["a.txt"]
    assert _entries(tmp_path) == ["export"]
