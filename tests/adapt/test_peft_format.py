"""PEFT both ways: fucina's adapters load in PEFT on fucina's HF export of the base, and back.

The loads run with every warning an error (deprecation notices aside), so a PEFT missing- or
unexpected-key warning fails the test; the logits must match fucina's within 1e-4 in float32.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager

import pytest
import torch
from lora_helpers import base_dir, lora_dir, token_batch

from fucina.adapt.lora_config import LoRAConfig
from fucina.adapt.merge import merge_lora_dir
from fucina.interop.hf_export import export_hf
from fucina.interop.source import ExportError, load_source
from fucina.model.io import load_model
from fucina.model_dir import load_pretrained
from train_helpers import run_cli

peft = pytest.importorskip("peft")  # in the dev extra: installed by `make test`
transformers = pytest.importorskip("transformers")

CASES = {
    "llama-all-linear": ("llama", "all-linear"),
    "llama-q-and-untied-head": ("llama", ["q", "lm_head"]),
    "mistral-k-v-gate": ("mistral", ["k", "v", "gate"]),
    "gpt2-all-linear-fused-c_attn": ("gpt2", "all-linear"),
    "gpt2-q-and-up": ("gpt2", ["q", "up"]),
}


@contextmanager
def key_warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", FutureWarning)  # transformers' own deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _hf_base(base, out):
    export_hf(load_source(base), out)
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_the_exported_adapter_with_fucinas_logits(tmp_path, case):
    architecture, targets = CASES[case]
    base = base_dir(tmp_path / "base", architecture)
    adapter = lora_dir(tmp_path / "adapter", base, LoRAConfig(rank=4, alpha=8, targets=targets))
    result = run_cli("export", "--model", str(adapter), "--format", "peft", "--out", str(tmp_path / "peft"))
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (architecture == "gpt2")
    hf = _hf_base(base, tmp_path / "hf")
    with key_warnings_are_errors():
        model = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    fucina_model, _ = load_pretrained(adapter)
    ids = token_batch()
    with torch.no_grad():
        theirs, ours = model(ids).logits, fucina_model(ids)
    assert (theirs - ours).abs().max() < 1e-4
    merge_lora_dir(adapter, tmp_path / "merged")
    merged = load_model(tmp_path / "merged")
    unloaded = model.merge_and_unload().eval()
    with torch.no_grad():
        assert (unloaded(ids).logits - merged(ids)).abs().max() < 1e-4


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_a_peft_adapter_trained_elsewhere_imports(tmp_path, architecture):
    base = base_dir(tmp_path / "base", architecture)
    hf = _hf_base(base, tmp_path / "hf")
    targets = ["q_proj", "v_proj", "down_proj"] if architecture == "llama" else ["c_attn", "mlp.c_proj"]
    settings = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_rslora=True, lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's Conv1D: PEFT switches fan_in_fan_out on, with a warning
        model = peft.get_peft_model(hf, settings)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(3):  # a few real training steps, so B is no longer zero
        ids = token_batch(10 + step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "peft")
    result = run_cli(
        "lora",
        "import",
        "--peft",
        str(tmp_path / "peft"),
        "--base",
        str(base),
        "--out",
        str(tmp_path / "lora"),
    )
    assert result.returncode == 0, result.stderr
    ours, _ = load_pretrained(tmp_path / "lora")
    ids = token_batch(3)
    model.eval()
    with torch.no_grad():
        assert (model(ids).logits - ours(ids)).abs().max() < 1e-4


def test_peft_export_refuses_an_adapted_tied_head(tmp_path):
    base = base_dir(tmp_path / "base", "llama", tie_embeddings=True)
    adapter = lora_dir(tmp_path / "adapter", base, LoRAConfig(rank=2, targets=["lm_head"]))
    from fucina.adapt.peft_format import export_peft

    with pytest.raises(ExportError, match="tied LM head"):
        export_peft(adapter, tmp_path / "peft")
