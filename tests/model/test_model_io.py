"""Saving and loading a model: exact round trip, clear errors for anything broken."""

from __future__ import annotations

import json

import pytest
import torch

from fucina.errors import CheckpointError
from fucina.model.io import load_model, save_model
from tiny_models import tiny_model


def test_round_trip_restores_every_weight_exactly(tmp_path):
    model = tiny_model(positions="rope", n_kv_heads=2, tie_embeddings=False, mlp="swiglu")
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config == model.config
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    ids = torch.randint(0, 97, (2, 10))
    with torch.inference_mode():
        assert torch.equal(loaded(ids), model(ids))


def test_tied_head_is_stored_once_and_tied_again_on_load(tmp_path):
    model = tiny_model(tie_embeddings=True)
    save_model(model, tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.token_embedding.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_config_json_holds_the_version_and_the_full_config(tmp_path):
    model = tiny_model(sliding_window=3)
    save_model(model, tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data.pop("fucina_model_version") == 1
    assert data == model.config.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files


def test_load_in_bf16_gives_bf16_weights(tmp_path):
    save_model(tiny_model(), tmp_path)
    assert load_model(tmp_path, dtype=torch.bfloat16).blocks[0].mixer.qkv_proj.weight.dtype == torch.bfloat16


def test_missing_directory_or_file_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="model directory not found"):
        load_model(tmp_path / "nowhere")
    save_model(tiny_model(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_model(tmp_path)


def test_truncated_weights_raise_checkpoint_error(tmp_path):
    save_model(tiny_model(), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated"):
        load_model(tmp_path)


def test_garbage_weights_raise_checkpoint_error(tmp_path):
    save_model(tiny_model(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path)


def test_config_that_does_not_match_the_weights_is_refused(tmp_path):
    save_model(tiny_model(), tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "d_ff": 128}))
    with pytest.raises(
        CheckpointError, match=r"ffn\.\w+\.weight has shape \(\d+, \d+\) but .*config\.json implies"
    ):
        load_model(tmp_path)
    path.write_text(json.dumps({**data, "n_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing \d+ tensors \(blocks\.2\."):
        load_model(tmp_path)


def test_unknown_config_key_is_named(tmp_path):
    save_model(tiny_model(), tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "n_head": 4}))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown key 'model\.n_head'"):
        load_model(tmp_path)


def test_saving_over_a_model_replaces_it(tmp_path):
    save_model(tiny_model(seed=0), tmp_path)
    newer = tiny_model(seed=1)
    save_model(newer, tmp_path)
    assert torch.equal(load_model(tmp_path).token_embedding.weight, newer.token_embedding.weight)
