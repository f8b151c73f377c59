"""TrainConfig: unknown keys rejected by name, overrides, path resolution, cross-field rules, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fucina.errors import ConfigError
from fucina.train.config import TrainConfig, config_from_dict, load_train_config
from train_helpers import tiny_config

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_unknown_key_is_rejected_with_a_suggestion(tmp_path):
    config = _write(tmp_path / "c.yaml", "train: {max_steps: 10}\noptim:\n  lrr: 0.001\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr' \(did you mean '(optim\.)?lr'\?\)"):
        load_train_config(config)


def test_unknown_override_is_rejected_by_name(tmp_path):
    config = _write(tmp_path / "c.yaml", "train: {max_steps: 10}\n")
    with pytest.raises(ConfigError, match="unknown key 'train.bach_size'"):
        load_train_config(config, ["train.bach_size=4"])


def test_overrides_are_typed_and_applied(tmp_path):
    config = _write(tmp_path / "c.yaml", "train: {max_steps: 10}\n")
    loaded = load_train_config(config, ["optim.lr=1e-3", "train.precision=bf16", "schedule.warmup_steps=5"])
    assert loaded.optim.lr == pytest.approx(1e-3)
    assert loaded.train.precision == "bf16"
    assert loaded.schedule.warmup_steps == 5


def test_wrong_type_names_the_key(tmp_path):
    config = _write(tmp_path / "c.yaml", "train: {max_steps: ten}\n")
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer"):
        load_train_config(config)


def test_malformed_yaml_names_file_and_line(tmp_path):
    config = _write(tmp_path / "c.yaml", "train:\n  max_steps: [1,\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: invalid YAML"):
        load_train_config(config)


def test_paths_in_a_config_file_are_relative_to_the_file(tmp_path, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    config = _write(
        sub / "c.yaml", "train: {max_steps: 1}\ndata:\n  train: [../corpus.txt, builtin, hf:x/y]\n"
    )
    monkeypatch.chdir(tmp_path / "configs")
    loaded = load_train_config(config)
    assert loaded.data.train == [str(tmp_path / "corpus.txt"), "builtin", "hf:x/y"]


def test_paths_in_overrides_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    config = _write(sub / "c.yaml", "train: {max_steps: 1}\n")
    monkeypatch.chdir(tmp_path)
    loaded = load_train_config(config, ["data.train=mine.jsonl"])
    assert loaded.data.train == [str(tmp_path / "mine.jsonl")]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.max_steps=null"], "set train.max_steps or train.epochs"),
        (["schedule.warmup_steps=10", "schedule.warmup_ratio=0.1"], "not both"),
        (["schedule.warmup_ratio=1.5"], "warmup_ratio must be in"),
        (["train.batch_size=0"], "train.batch_size must be > 0"),
        (["schedule.min_lr=1.0"], "schedule.min_lr must be in"),
        (["init_from=runs/a", "tokenizer.path=tok"], "init_from or tokenizer.path"),
        (["train.precision=fp8"], "train.precision: 'fp8' is not one of"),
    ],
)
def test_inconsistent_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"train": {"max_steps": 10}}, overrides)


def test_a_single_source_string_becomes_a_list():
    config = config_from_dict({"train": {"max_steps": 1}, "data": {"train": "builtin"}})
    assert config.data.train == ["builtin"]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_train_config(path)
    assert isinstance(config, TrainConfig)


def test_shipped_configs_document_every_key():
    """Each key in a shipped config carries a comment (on its line or the line above)."""
    for path in sorted((REPO / "configs").glob("*.yaml")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or ":" not in stripped:
                continue
            previous = lines[number - 1].strip() if number else ""
            assert "#" in line or previous.startswith("#"), f"{path.name}:{number + 1} undocumented: {line}"


def test_a_model_section_gradient_checkpointing_becomes_the_training_option():
    config = config_from_dict(tiny_config(None, model={"gradient_checkpointing": True}))
    assert config.train.gradient_checkpointing is True
    assert "gradient_checkpointing" not in config.model
    assert config_from_dict(tiny_config(None)).train.gradient_checkpointing is False
