"""Bad input gives one clear error line (exit 2) naming its cause, and damages nothing in the run directory."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest

from fucina.cli.main import main
from fucina.train.checkpoint import MODEL_FILE, list_checkpoints
from train_helpers import sft_config, tiny_config, write_config


def _fail(capsys, *args: str) -> str:
    """Run `fucina ARGS`, expect exit 2 and exactly one error line; return it."""
    capsys.readouterr()
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fucina: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _snapshot(directory: Path) -> dict[str, str]:
    """Hash of every file that must never change under a failed command."""
    keep = ("checkpoints", "best", "final", "data", "tokenizer.json", "config.json", "train_config.yaml")
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.relative_to(directory).parts[0] in keep
    }


@pytest.fixture
def finished_run(tmp_path, tokenizer_dir) -> tuple[Path, Path]:
    """A completed 8-step run (checkpoints at steps 4 and 8) and its config file."""
    config = write_config(tmp_path, tiny_config(tokenizer_dir))
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run)]) == 0
    return config, run


def test_unknown_config_key_is_named(tmp_path, capsys, tokenizer_dir):
    config = write_config(tmp_path, tiny_config(tokenizer_dir, optim={"lrr": 1.0}))
    assert "unknown key 'optim.lrr'" in _fail(capsys, "train", str(config), "--out", str(tmp_path / "r"))


def test_missing_data_file_is_named(tmp_path, capsys, tokenizer_dir):
    config = write_config(tmp_path, tiny_config(tokenizer_dir, data={"train": ["nowhere.txt"]}))
    message = _fail(capsys, "train", str(config), "--out", str(tmp_path / "r"))
    assert "nowhere.txt" in message and "not found" in message


def test_bad_data_line_is_named_and_can_be_skipped(tmp_path, capsys, pretrained_run):
    chats = tmp_path / "chats.jsonl"
    good = json.dumps(
        {"messages": [{"role": "user", "content": "Ciao"}, {"role": "assistant", "content": "Ciao!"}]}
    )
    chats.write_text("\n".join([good, good, "{not json", good, good]) + "\n", encoding="utf-8")
    data = sft_config(
        pretrained_run, data={"train": [str(chats)], "val_fraction": 0.3}, train={"max_steps": 1}
    )
    config = write_config(tmp_path, data)
    message = _fail(capsys, "train", str(config), "--out", str(tmp_path / "r"))
    assert "chats.jsonl:3: malformed JSON" in message
    assert main(["train", str(config), "--out", str(tmp_path / "r"), "--set", "data.skip_bad=true"]) == 0


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, capsys, tokenizer_dir):
    config = write_config(tmp_path, tiny_config(tokenizer_dir, model={"vocab_size": 300}))
    message = _fail(capsys, "train", str(config), "--out", str(tmp_path / "r"))
    assert "tokenizer has 400 tokens but the model's vocab_size is 300" in message


def test_init_from_a_directory_without_a_model_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    config = write_config(tmp_path, sft_config(tmp_path / "empty"))
    message = _fail(capsys, "train", str(config), "--out", str(tmp_path / "r"))
    assert "empty holds no model" in message


def test_fp16_on_cpu_is_refused_with_the_alternative(tmp_path, capsys, tokenizer_dir):
    config = write_config(tmp_path, tiny_config(tokenizer_dir, train={"precision": "fp16", "device": "cpu"}))
    message = _fail(capsys, "train", str(config), "--out", str(tmp_path / "r"))
    assert "fp16 needs a CUDA device" in message and "bf16" in message


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(finished_run, capsys):
    config, run = finished_run
    newest = list_checkpoints(run / "checkpoints")[-1][1]
    (newest / MODEL_FILE).write_bytes((newest / MODEL_FILE).read_bytes()[:-10])
    assert main(["train", str(config), "--out", str(run), "--set", "train.max_steps=12"]) == 0
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert any(name.startswith("corrupt-step-00000008") for name in names)  # kept, not deleted
    assert "step-00000012" in names
    stats = json.loads((run / "train_stats.json").read_text())
    assert [e["step"] for e in stats["evals"]] == [4, 8, 12]  # step 8 was trained again


def test_no_usable_checkpoint_refuses_and_touches_nothing(finished_run, capsys):
    config, run = finished_run
    for _, path in list_checkpoints(run / "checkpoints"):
        (path / MODEL_FILE).write_bytes(b"")
    before = _snapshot(run)
    message = _fail(capsys, "train", str(config), "--out", str(run))
    assert "no usable checkpoint" in message and "model.safetensors" in message
    assert _snapshot(run) == before


def test_disk_full_at_the_start_is_one_line_and_keeps_the_previous_run(finished_run, capsys, monkeypatch):
    config, run = finished_run
    before = _snapshot(run)

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    message = _fail(capsys, "train", str(config), "--out", str(run), "--set", "train.max_steps=12")
    monkeypatch.undo()
    assert "No space left on device" in message
    assert _snapshot(run) == before
    assert main(["train", str(config), "--out", str(run), "--set", "train.max_steps=12"]) == 0


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell which file is synced")
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoints(finished_run, capsys, monkeypatch):
    config, run = finished_run
    before = {k: v for k, v in _snapshot(run).items() if k.startswith("checkpoints")}
    real_fsync = os.fsync

    def no_space_for_checkpoints(fd):
        if "/checkpoints/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", no_space_for_checkpoints)
    message = _fail(capsys, "train", str(config), "--out", str(run), "--set", "train.max_steps=12")
    monkeypatch.undo()
    assert "could not write checkpoint" in message and "step-00000012: No space left on device" in message
    assert {k: v for k, v in _snapshot(run).items() if k.startswith("checkpoints")} == before
    assert main(["train", str(config), "--out", str(run), "--set", "train.max_steps=12"]) == 0
    assert [step for step, _ in list_checkpoints(run / "checkpoints")] == [8, 12]


def test_changed_configuration_is_not_resumed(finished_run, capsys):
    config, run = finished_run
    before = _snapshot(run)
    message = _fail(capsys, "train", str(config), "--out", str(run), "--set", "optim.lr=0.1")
    assert "different configuration (optim.lr)" in message
    assert _snapshot(run) == before


def test_no_resume_refuses_an_existing_run_and_overwrite_moves_it_aside(finished_run, capsys):
    config, run = finished_run
    before = _snapshot(run)
    assert "already holds a run" in _fail(capsys, "train", str(config), "--out", str(run), "--no-resume")
    assert _snapshot(run) == before
    assert main(["train", str(config), "--out", str(run), "--no-resume", "--overwrite"]) == 0
    moved = [p for p in run.parent.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and _snapshot(moved[0]) == before


def test_resume_of_a_directory_without_a_run_is_an_error(tmp_path, capsys, tokenizer_dir):
    config = write_config(tmp_path, tiny_config(tokenizer_dir))
    assert "nothing to resume" in _fail(
        capsys, "train", str(config), "--out", str(tmp_path / "r"), "--resume"
    )


def test_a_foreign_non_empty_directory_is_not_used(tmp_path, capsys, tokenizer_dir):
    config = write_config(tmp_path, tiny_config(tokenizer_dir))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    assert "holds no fucina run" in _fail(capsys, "train", str(config), "--out", str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_train_without_a_config_says_how_to_give_one(capsys):
    assert "fucina train --config" in _fail(capsys, "train")


def test_two_different_configs_are_refused(tmp_path, capsys, tokenizer_dir):
    first = write_config(tmp_path, tiny_config(tokenizer_dir), "a.yaml")
    second = write_config(tmp_path, tiny_config(tokenizer_dir), "b.yaml")
    assert "two configs given" in _fail(capsys, "train", str(first), "--config", str(second))
