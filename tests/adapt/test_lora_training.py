"""LoRA training: only the adapters learn, checkpoints hold only them, resume is exact, QLoRA works."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file

from fucina.adapt.lora import LoRALinear, adapter_state_dict
from fucina.compress.quantized_layers import Int8Linear
from fucina.model_dir import load_pretrained, model_kind, resolve_model_dir
from fucina.train.checkpoint import list_checkpoints, load_checkpoint
from fucina.train.config import config_from_dict
from fucina.train.loop import train
from train_helpers import run_cli, sft_config, write_config

LORA = {"rank": 4, "alpha": 8, "targets": "all-linear"}


def test_only_the_adapters_train_and_checkpoints_hold_only_them(tmp_path, base_run):
    base_weights = load_file(resolve_model_dir(base_run) / "model.safetensors")
    run = tmp_path / "lora"
    train(config_from_dict(sft_config(base_run, lora=LORA, optim={"lr": 1e-2})), run)

    assert load_file(resolve_model_dir(base_run) / "model.safetensors").keys() == base_weights.keys()
    model, _ = load_pretrained(run)
    assert model_kind(run) == "lora"
    adapters = adapter_state_dict(model)
    for name, tensor in model.state_dict().items():
        if ".lora." in name:
            continue
        stored = base_weights.get(name.replace(".base.", ".")) if name != "lm_head.weight" else None
        if stored is not None:
            assert torch.equal(tensor, stored), f"{name} changed: the base must stay frozen"
    assert all(adapters[n].abs().sum() > 0 for n in adapters if n.endswith(".B")), "some B never trained"

    steps = list_checkpoints(run / "checkpoints")
    checkpoint = load_checkpoint(steps[-1][1])
    assert set(checkpoint.model_state) == set(adapters)  # adapters only, not the base
    moments = checkpoint.trainer_state["optimizer"]["state"]
    assert len(moments) == len(adapters)  # one AdamW state per adapter tensor
    base_bytes = (resolve_model_dir(base_run) / "model.safetensors").stat().st_size
    assert (steps[-1][1] / "model.safetensors").stat().st_size < base_bytes / 3
    saved = json.loads((run / "best" / "config.json").read_text())["fucina_lora"]
    assert saved["rank"] == 4 and saved["targets"] == ["q", "k", "v", "o", "gate", "up", "down"]


def test_killed_lora_run_resumes_bit_identically(tmp_path, base_run):
    settings = {
        "lora": {**LORA, "dropout": 0.1},  # dropout: the restored RNG state matters too
        "train": {"max_steps": 8},
        "eval": {"every": 4},
        "checkpoint": {"every": 3, "keep_last": 5},
    }
    config = write_config(tmp_path, sft_config(base_run, **settings))
    straight = run_cli("train", str(config), "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    killed = run_cli("train", str(config), "--out", str(tmp_path / "resumed"), "--debug-kill-after-step", "5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_cli("train", str(config), "--out", str(tmp_path / "resumed"))
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(".lora." in name for name in a)
    assert all(torch.equal(a[name], b[name]) for name in a), "final adapters differ"
    state_a = load_checkpoint(list_checkpoints(tmp_path / "straight" / "checkpoints")[-1][1]).trainer_state
    state_b = load_checkpoint(list_checkpoints(tmp_path / "resumed" / "checkpoints")[-1][1]).trainer_state
    for index, moments in state_a["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, state_b["optimizer"]["state"][index][key])


def test_qlora_trains_adapters_on_an_int8_base(tmp_path, int8_base):
    int8_weights = load_file(int8_base / "model.safetensors")
    run = tmp_path / "qlora"
    result = train(config_from_dict(sft_config(int8_base, lora=LORA, optim={"lr": 1e-2})), run)
    assert result.steps == 8
    model, _ = load_pretrained(run)
    layer = model.blocks[0].mixer.qkv_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.base, Int8Linear)
    assert torch.equal(layer.base.weight, int8_weights["blocks.0.mixer.qkv_proj.weight"])  # frozen int8
    # Gradients crossed the dequantized base of block 1 to reach block 0's adapters.
    assert layer.lora["q"].B.abs().sum() > 0
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        kernel = model(ids)  # the int8 kernel, no gradients
    dequantized = model(ids)  # the dequantized path training takes
    assert torch.allclose(kernel, dequantized, atol=0.05), "int8 kernel and dequantized base disagree"


def test_generate_and_eval_run_a_lora_run_directory(tmp_path, base_run):
    run = tmp_path / "lora"
    train(config_from_dict(sft_config(base_run, lora={"rank": 2, "targets": ["q", "v"]})), run)
    result = run_cli("generate", "--model", str(run), "--raw", "--max-new-tokens", "5", "--seed", "1", "Il")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    moved = tmp_path / "elsewhere"
    (run / "best").rename(moved)  # the absolute reference still finds the base
    model, _ = load_pretrained(moved)
    assert isinstance(model.blocks[0].mixer.qkv_proj, LoRALinear)


def test_a_lora_directory_whose_base_is_gone_is_a_clear_error(tmp_path, lora_tokenizer_dir):
    from lora_helpers import base_dir, lora_dir

    from fucina.adapt.lora_config import LoRAConfig
    from fucina.errors import CheckpointError

    base = base_dir(tmp_path / "base", "llama")
    adapter = lora_dir(tmp_path / "adapter", base, LoRAConfig(rank=2, targets=["q"]))
    (base / "model.safetensors").rename(tmp_path / "gone.safetensors")
    try:
        load_pretrained(adapter)
    except CheckpointError as err:
        assert "base model of this LoRA adapter is missing" in str(err)
    else:
        raise AssertionError("loading without the base must fail")
    assert Path(adapter / "model.safetensors").stat().st_size < 20_000
