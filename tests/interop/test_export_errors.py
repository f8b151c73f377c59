"""Wrong inputs to an export give one clear FucinaError and leave every existing file as it was."""

from __future__ import annotations

import dataclasses

import pytest
from export_helpers import ARCHITECTURES, architecture_model_dir, random_model, write_model_dir

from fucina.cli.main import main
from fucina.fsutil import OutputExistsError
from fucina.interop.gguf import export_gguf
from fucina.interop.hf_export import export_hf
from fucina.interop.source import ExportError, load_source


def test_a_model_without_tokenizer_is_refused_naming_the_directory(tmp_path):
    model_dir = write_model_dir(tmp_path / "model", random_model(ARCHITECTURES["llama"][0]), tokenizer=None)
    with pytest.raises(ExportError, match=r"model has no tokenizer\.json"):
        load_source(model_dir)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"ffn": "moe", "moe_num_experts": 2, "moe_top_k": 1}, "feed-forward moe"),
        ({"mixer": "mamba"}, "mixer mamba"),
    ],
)
def test_gguf_refuses_moe_and_mamba_models_and_writes_nothing(tmp_path, overrides, reason):
    source = load_source(architecture_model_dir(tmp_path / "model", "llama", **overrides))
    with pytest.raises(ExportError, match=reason):
        export_gguf(source, tmp_path / "m.gguf")
    with pytest.raises(ExportError, match=reason):
        export_hf(source, tmp_path / "hf")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "hf").exists()


def test_gguf_refuses_picodac_which_llama_cpp_has_no_architecture_for(tmp_path):
    source = load_source(architecture_model_dir(tmp_path / "model", "picodac"))
    with pytest.raises(ExportError, match="llama.cpp has no architecture"):
        export_gguf(source, tmp_path / "m.gguf")


def test_an_existing_output_is_refused_and_left_untouched(tmp_path):
    source = load_source(architecture_model_dir(tmp_path / "model", "llama"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    (tmp_path / "m.gguf").write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="already exists"):
        export_hf(source, tmp_path / "hf")
    with pytest.raises(OutputExistsError, match="already exists"):
        export_gguf(source, tmp_path / "m.gguf")
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]
    assert (tmp_path / "m.gguf").read_bytes() == b"old"
    with pytest.raises(OutputExistsError, match="model being read"):
        export_hf(source, tmp_path / "model", overwrite=True)


def test_overwrite_replaces_an_earlier_export_only_when_asked(tmp_path):
    source = load_source(architecture_model_dir(tmp_path / "model", "llama"))
    (tmp_path / "m.gguf").write_bytes(b"old")
    export_gguf(source, tmp_path / "m.gguf", quant="f32", overwrite=True)
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"


def test_the_cli_reports_an_export_error_in_one_line(tmp_path, capsys):
    config = dataclasses.replace(ARCHITECTURES["llama"][0], mixer="mamba")
    model_dir = write_model_dir(tmp_path / "model", random_model(config), tokenizer=None)
    code = main(["export", "--model", str(model_dir), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "tokenizer.json" in err and "\n" not in err
    assert not (tmp_path / "m.gguf").exists()


def test_a_config_transformers_rejects_is_an_export_error_and_writes_nothing(tmp_path):
    """LlamaConfig validates hidden size against heads even when head_dim is given (a pruned model's shape)."""
    source = load_source(
        architecture_model_dir(tmp_path / "model", "llama", n_heads=3, n_kv_heads=1, head_dim=16)
    )
    with pytest.raises(ExportError, match="LlamaConfig refuses this model"):
        export_hf(source, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
