"""Accounting: parameter components add up, FLOPs / cache / memory follow their stated formulas."""

from __future__ import annotations

import pytest

from fucina.cli.main import main
from fucina.model.info import (
    cache_bytes_per_token,
    count_parameters,
    flops_per_token,
    inference_memory,
    training_memory,
)
from fucina.model.io import save_model
from fucina.model.transformer import Transformer
from fucina.presets import get_preset
from tiny_models import tiny_config


@pytest.mark.parametrize("name", ["picodac", "gpt2-real", "llama-30m"])
def test_components_add_up_to_the_total(name):
    counts = count_parameters(get_preset(name))
    parts = counts.embeddings + counts.attention + counts.feed_forward + counts.norms + counts.head
    assert parts == counts.total
    assert counts.active == counts.total


def test_forward_flops_are_two_per_weight_plus_attention():
    config = get_preset("gpt2-real")
    flops = flops_per_token(config)
    counts = count_parameters(config)
    # 2 FLOPs per multiplied weight (blocks + LM head) + 4 * layers * d_attn * context (Kaplan et al.)
    matmul_weights = counts.total - counts.embeddings - counts.norms
    assert abs(counts.matmul - matmul_weights) < 0.001 * matmul_weights  # biases are the difference
    assert flops.sequence_term == 4 * 12 * 768 * 1024
    assert flops.training == 3 * flops.forward


def test_sliding_window_caps_the_attention_flops():
    full, windowed = get_preset("llama-30m"), get_preset("mistral-30m")
    assert flops_per_token(windowed).sequence_term * 4 == flops_per_token(full).sequence_term  # 256 of 1024


def test_kv_cache_bytes_count_only_kv_heads():
    config = tiny_config(n_kv_heads=1)  # head size 8
    assert cache_bytes_per_token(config, 2) == [2 * 1 * 8 * 2] * 2
    model = Transformer(config)
    cache = model.new_cache(batch_size=1)
    stored = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4
    assert stored == sum(cache_bytes_per_token(config, 4)) * config.context_length


def test_training_memory_is_16_bytes_per_parameter_plus_activations():
    config = get_preset("gpt2-tiny")
    params = count_parameters(config).total
    memory = training_memory(config, batch_size=4, context_length=64)
    assert memory.weights + memory.gradients + memory.optimizer == 16 * params
    checkpointed = training_memory(config, batch_size=4, context_length=64, gradient_checkpointing=True)
    assert 0 < checkpointed.activations < memory.activations
    assert training_memory(config, batch_size=8, context_length=64).activations == 2 * memory.activations


def test_inference_memory_is_weights_plus_full_context_cache():
    config = get_preset("llama-tiny")
    memory = inference_memory(config, dtype_bytes=2)
    assert memory.weights == 2 * count_parameters(config).total
    assert (
        memory.kv_cache == 256 * 6 * 2 * 4 * 32 * 2
    )  # context * layers * (K,V) * kv heads * head dim * bf16


def test_cli_model_info_prints_the_total_of_a_preset(capsys):
    assert main(["model", "info", "picodac"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 4,626,480" in out
    for words in ("embeddings", "attention", "feed-forward", "norms", "head", "FLOPs per token", "KV cache"):
        assert words in out
    assert "train memory" in out and "run memory" in out


def test_cli_model_info_reads_a_run_directory(tmp_path, capsys):
    config = tiny_config()
    save_model(Transformer(config), tmp_path / "run" / "best")
    assert main(["model", "info", str(tmp_path / "run")]) == 0
    total = sum(p.numel() for p in Transformer(config).parameters())
    assert f"parameters: {total:,}" in capsys.readouterr().out


def test_cli_model_info_unknown_name_is_one_clear_error(capsys):
    assert main(["model", "info", "gpt2-rael"]) == 2
    assert "did you mean 'gpt2-real'" in capsys.readouterr().err


def test_cli_lists_presets(capsys):
    assert main(["model", "presets"]) == 0
    out = capsys.readouterr().out
    assert "llama-30m" in out and "163.04M" in out


def test_cli_model_info_shows_active_and_total_parameters_of_a_mixture_of_experts(capsys):
    assert main(["model", "info", "mixtral-tiny"]) == 0
    out = capsys.readouterr().out
    counts = count_parameters(get_preset("mixtral-tiny"))
    assert counts.active < counts.total / 2
    assert f"parameters: {counts.total:,}" in out and f"active per token {counts.active:,}" in out
    assert "moe: 8 experts of d_ff 896, top-2, 0 shared, dropless" in out
