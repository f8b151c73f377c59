"""Fixtures of the LoRA tests: a tokenizer trained once, a tiny pretrained base run, its int8 copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # PEFT and transformers read local directories only
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from fucina.compress import quantize_model_dir  # noqa: E402
from fucina.data.readers import iter_texts  # noqa: E402
from fucina.resources import builtin_chat_file, builtin_prose_files  # noqa: E402
from fucina.tokenizer import train_tokenizer  # noqa: E402
from fucina.train.config import config_from_dict  # noqa: E402
from fucina.train.loop import train  # noqa: E402
from train_helpers import TINY_VOCAB, tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def lora_tokenizer_dir(tmp_path_factory) -> Path:
    """A 400-id picodac-template tokenizer trained on the built-in prose and conversations."""
    directory = tmp_path_factory.mktemp("lora-tokenizer")
    texts = iter_texts([*builtin_prose_files(), builtin_chat_file()])
    train_tokenizer(texts, TINY_VOCAB, template="picodac", show_progress=False).save(directory)
    return directory


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, lora_tokenizer_dir) -> Path:
    """A tiny LLaMA-style pretraining run (8 steps): the frozen base of the LoRA training tests."""
    run = tmp_path_factory.mktemp("lora-base") / "run"
    llama = {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_kv_heads": 2}
    train(config_from_dict(tiny_config(lora_tokenizer_dir, model=llama)), run)
    return run


@pytest.fixture(scope="session")
def int8_base(tmp_path_factory, base_run) -> Path:
    """The base run quantized to int8 by `fucina quantize` (the QLoRA base)."""
    out = tmp_path_factory.mktemp("lora-int8") / "int8"
    quantize_model_dir(base_run, out, bits=8)
    return out
