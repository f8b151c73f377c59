"""Merging: the merged, ordinary model equals base + adapter; a tied head is untied, never corrupted.

(W + s B A) x and W x + s B (A x) round differently in float32; the models have random weights of
std 0.3 (logits of a few units), so the comparisons allow 1e-3.
"""

from __future__ import annotations

import json

import pytest
import torch
from lora_helpers import base_dir, lora_dir, token_batch
from safetensors.torch import load_file

from fucina.adapt.lora import is_lora_model
from fucina.adapt.lora_config import LoRAConfig
from fucina.adapt.merge import merge_lora_dir
from fucina.errors import ConfigError
from fucina.model.io import load_model
from fucina.model_dir import load_pretrained, model_kind
from train_helpers import run_cli


def test_merged_model_equals_base_plus_adapter(tmp_path):
    base = base_dir(tmp_path / "base", "llama")
    adapter = lora_dir(tmp_path / "adapter", base, LoRAConfig(rank=4, alpha=8, rslora=True))
    result = run_cli("lora", "merge", "--model", str(adapter), "--out", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    assert model_kind(tmp_path / "merged") == "full"
    merged = load_model(tmp_path / "merged")  # the plain loader: an ordinary model directory
    lora, _ = load_pretrained(adapter)
    ids = token_batch()
    with torch.no_grad():
        expected, got = lora(ids), merged(ids)
    assert torch.allclose(got, expected, atol=1e-3, rtol=1e-4), (got - expected).abs().max()
    base_model = load_model(base)
    with torch.no_grad():
        assert not torch.allclose(base_model(ids), got, atol=1e-2)  # the adapter did change the model


def test_merging_an_adapted_tied_head_unties_it_and_keeps_the_embedding(tmp_path):
    base = base_dir(tmp_path / "base", "llama", tie_embeddings=True)
    adapter = lora_dir(tmp_path / "adapter", base, LoRAConfig(rank=2, targets=["lm_head", "q"]))
    result = merge_lora_dir(adapter, tmp_path / "merged")
    assert result.untied_head and result.merged_layers == 2 * 1 + 1
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_embeddings"] is False
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    base_weights = load_file(base / "model.safetensors")
    assert torch.equal(weights["token_embedding.weight"], base_weights["token_embedding.weight"])
    assert not torch.allclose(weights["lm_head.weight"], weights["token_embedding.weight"])
    merged, lora = load_model(tmp_path / "merged"), load_pretrained(adapter)[0]
    ids = token_batch(1)
    with torch.no_grad():
        assert torch.allclose(merged(ids), lora(ids), atol=1e-3, rtol=1e-4)


def test_merging_a_qlora_adapter_gives_a_full_precision_model(tmp_path, int8_base):
    adapter = lora_dir(tmp_path / "adapter", int8_base, LoRAConfig(rank=2, targets=["q", "down"]))
    result = merge_lora_dir(adapter, tmp_path / "merged")
    assert result.dequantized_layers > 0
    merged, lora = load_model(tmp_path / "merged"), load_pretrained(adapter)[0]
    assert not is_lora_model(merged)
    ids = token_batch(2)
    with torch.enable_grad():  # the adapter model on its dequantized path: the same float weights
        expected = lora(ids).detach()
    with torch.no_grad():
        assert torch.allclose(merged(ids), expected, atol=1e-3, rtol=1e-4)


def test_merge_refuses_a_model_without_adapters(tmp_path):
    base = base_dir(tmp_path / "base", "gpt2")
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        merge_lora_dir(base, tmp_path / "merged")
