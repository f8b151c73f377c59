"""The model directory: resolving a run to its model, and loading each kind through the registry."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fucina import model_dir
from fucina.compress import Int8Linear
from fucina.errors import CheckpointError, ConfigError
from fucina.model.io import load_model
from fucina.model_dir import (
    BEST_DIR,
    FINAL_DIR,
    load_model_dir,
    load_pretrained,
    model_kind,
    register_loader,
    resolve_model_dir,
)

# Written before the model directory had one owner (see its README.md).
OLD = Path(__file__).parent / "fixtures" / "model_dir_v1"
EXPECTED = json.loads((OLD / "expected.json").read_text(encoding="utf-8"))


def _last_logits(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1, :8].tolist()


@pytest.mark.parametrize(("name", "kind"), [("run", "full"), ("quantized-int8", "quantized")])
def test_a_model_directory_written_before_the_change_loads_to_the_same_model(name, kind):
    model, tokenizer = load_pretrained(OLD / name)
    expected = EXPECTED[name]
    assert model_kind(OLD / name) == kind
    assert tokenizer.encode(EXPECTED["text"]) == expected["ids"]
    # The int8 kernels now quantize activations too (W8A8, issue 19): the stored weights are the same,
    # the products round differently, well inside what int8 itself costs.
    tolerance = 1e-5 if kind == "full" else 5e-4
    assert _last_logits(model, expected["ids"]) == pytest.approx(expected["last_logits"], abs=tolerance)
    quantized = any(isinstance(module, Int8Linear) for module in model.modules())
    assert quantized == (kind == "quantized")


def test_a_run_resolves_to_its_best_then_its_final_model(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(OLD / "run" / BEST_DIR, run / FINAL_DIR)
    assert resolve_model_dir(run) == run / FINAL_DIR
    shutil.copytree(OLD / "run" / BEST_DIR, run / BEST_DIR)
    assert resolve_model_dir(run) == run / BEST_DIR
    assert resolve_model_dir(run / FINAL_DIR) == run / FINAL_DIR


def test_a_directory_without_a_model_is_refused_naming_it(tmp_path):
    with pytest.raises(CheckpointError, match="holds no model"):
        resolve_model_dir(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        resolve_model_dir(tmp_path / "missing")


def test_a_registered_kind_loads_the_directories_it_detects(tmp_path, monkeypatch):
    monkeypatch.setattr(model_dir, "_LOADERS", dict(model_dir._LOADERS))
    marked = shutil.copytree(OLD / "run" / BEST_DIR, tmp_path / "marked")
    (marked / "HALF").touch()

    def load_half(directory, device, dtype):
        return load_model(directory, device=device, dtype=torch.float16)

    register_loader("half", lambda directory: (directory / "HALF").is_file(), load_half)
    assert model_kind(marked) == "half"
    assert load_model_dir(marked).token_embedding.weight.dtype == torch.float16
    assert model_kind(OLD / "run") == "full"
    assert load_model_dir(OLD / "run").token_embedding.weight.dtype == torch.float32


def test_the_full_kind_cannot_be_replaced():
    with pytest.raises(ConfigError, match="built-in"):
        register_loader("full", lambda directory: True, load_model)


def test_loading_a_quantized_model_needs_no_import_of_the_quantization_code():
    script = (
        "import sys\n"
        "import fucina.model_dir as m\n"
        "assert 'fucina.compress' not in sys.modules, 'model_dir imports the compression code'\n"
        f"model, _ = m.load_pretrained({str(OLD / 'quantized-int8')!r})\n"
        "print(sorted({type(x).__name__ for x in model.modules()}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Int8Linear" in result.stdout
